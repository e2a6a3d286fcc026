"""Per-GPU memory of every shipped preset at its real size: DDP vs FSDP2 at 1/2/4/8 GPUs, and where each fits.

    python benchmarks/scale_memory.py                       # the computed tables (CPU, a few minutes, no downloads)
    python benchmarks/scale_memory.py sd3-4nfe              # some presets
    torchrun --nproc_per_node 8 benchmarks/scale_memory.py --measure --strategy fsdp2 --train full   # on GPUs

**Computed** (no GPU needed): every network is built on the `meta` device from its real config
(cdmctl.backbones.architectures, with sources) and its weights counted; the memory of each state is then what
cdmctl keeps for it:

- weights: student and fake teacher (TBCM: the student only) float32 masters, the frozen teacher in bf16 (full); LoRA: the frozen bf16
  base once under DDP (the three module trees share it), and per tree under FSDP2 (each tree is sharded on its
  own: 3 x base / N with `parallel.teacher: shard`, base + 2 x base / N with `replicate`), plus float32 adapters
  for the student and the fake teacher;
- gradients: float32, of one network at a time (the student's and the fake teacher's updates do not overlap and
  gradients are freed after each step);
- optimizer: AdamW's two float32 moments of both trained networks (TBCM: one); EMA: float32 copy of the student's trained
  weights (`optim.ema_device: cpu` moves it off the GPU);
- communication: DDP's gradient buckets (a float32 copy of each trained network's gradients, allocated once);
  FSDP2's transient whole weights of two blocks in bf16 (the current one and the prefetched next), the root
  module's weights (not resharded after forward) and one block's whole float32 gradients before reduce-scatter.
- activations: one sample's tensors saved for backward in the student's forward, measured on the meta step
  (benchmarks/real_size.py `activation_bytes`), times the samples per GPU of the student update (TBCM: every
  rollout point of every prompt, route_steps - 1 per prompt; its JVP runs without a graph: it saves nothing for
  backward, and its transient memory is not counted);
- CUDA context and allocator slack: a flat CONTEXT per GPU. The text encoders run only while the prompt-embedding
  cache is built, then are freed; the VAE stays (sample grids).

**Loading** (`parallel.load: rank0`, the default; `loading`): only rank 0 reads the files (the pipeline in bf16,
in host memory first); every other rank builds the text encoders and the VAE on `meta` and receives them whole,
straight into its GPU, where they encode its share of the prompt cache. DDP: rank 0 moves the transformer to its
GPU and builds the networks there; every other rank builds them on `meta` and receives each tensor whole. FSDP2: rank 0 loads it into host memory and builds the networks there
(whole: the same bytes as one GPU's weights); every rank then shards the networks on `meta` and fills them one
tensor at a time (rank 0 broadcasts it, each rank keeps its shard): a GPU holds its shards plus one whole tensor in
flight (float32), never a whole network. Per GPU while loading: the larger of (text encoders + VAE [+ the bf16
transformer on DDP's rank 0]) and (the networks' weights as placed + VAE [+ the tensor in flight]); a setup fits a
card only if this and the training total both do.

**Measured** (`--measure`, under torchrun on GPUs): the real networks of the shape (random weights), prepared by
cdmctl's own `parallel.prepare_networks`, one full TTUR cycle of the engine (two fake-teacher updates, one
student update, EMA), and `torch.cuda.max_memory_allocated` of the largest rank. Each run appends a line to
benchmarks/results/scale_memory_measured.jsonl, which the table prints beside the computed total.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # runnable as a plain script from a checkout
        sys.path.insert(0, str(path))

MEASURED = ROOT / "benchmarks" / "results" / "scale_memory_measured.jsonl"
GIB = 2**30
LORA_RANK = 64  # the presets' default (model.lora.rank)

CONTEXT = 1.5 * GIB  # CUDA context and allocator slack per GPU (not counted by the formula; typically 1-3 GiB)
CARDS_GB = (24, 48, 80)
GPUS = (1, 2, 4, 8)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def arch_parts(name: str) -> dict[str, Any]:
    """The networks of a real architecture (cdmctl.backbones.architectures, with its sources), built on meta."""
    from cdmctl.backbones.architectures import ARCHITECTURES, build, meta_backbone, weight_count

    arch = ARCHITECTURES[name]
    backbone = meta_backbone(arch)
    return {"transformer": backbone.transformer, "blocks": tuple(backbone.block_classes()),
            "targets": backbone.lora_target_modules(),
            "text": sum(weight_count(build(p)) for p in arch.text_encoders), "vae": weight_count(build(arch.vae))}


def sd3_parts() -> dict[str, Any]:
    return arch_parts("sd3-medium")


def longcat_parts() -> dict[str, Any]:
    return arch_parts("longcat-image")


def lora_params(transformer: torch.nn.Module, targets: list[str]) -> int:
    """Parameters of a rank-LORA_RANK adapter on `targets`, as peft adds it (cdmctl.networks.add_lora)."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    module = inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets),
                                     copy.deepcopy(transformer))  # fmt: skip
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)


def shapes(parts: dict[str, Any]) -> dict[str, int]:
    t = parts["transformer"]
    blocks = [m for m in t.modules() if isinstance(m, parts["blocks"])]
    in_blocks = sum(map(count, blocks))
    from cdmctl.backbones.architectures import weight_count

    # P: trained values; buffers (SD3's fixed position table) are held by every copy but get no gradient or moments
    return {"P": count(t), "buffers": weight_count(t) - count(t), "A": lora_params(t, parts["targets"]), "block": max(map(count, blocks)),
            "root": count(t) - in_blocks, "text": parts["text"], "vae": parts["vae"],
            "largest": max(p.numel() for p in t.parameters())}  # fmt: skip


def per_gpu(s: dict[str, int], train: str, strategy: str, n: int, teacher: str = "shard",
            nets: int = 2) -> dict[str, float]:  # fmt: skip
    """Bytes per GPU of each state (see the module docstring), for n GPUs; `nets` trained networks (the CDM family:
    student and fake teacher; TBCM: the student only)."""
    P, A = s["P"], s["A"]
    trained = P if train == "full" else A  # per trained network
    shard = n if strategy == "fsdp2" else 1
    if train == "full":
        teacher_bytes = 2 * P / (shard if teacher == "shard" else 1)
        weights = nets * 4 * P / shard + teacher_bytes
    else:
        base = (nets + 1) * 2 * P / shard if teacher == "shard" else 2 * P + nets * 2 * P / shard
        weights = (2 * P if strategy != "fsdp2" else base) + nets * 4 * A / shard
    weights += s.get("buffers", 0) * (4 * nets + 2 if train == "full" else 2)  # per copy; the LoRA trees share one
    out = {"weights": weights, "gradients": 4 * trained / shard, "optimizer": nets * 8 * trained / shard,
           "ema": 4 * trained / shard}  # fmt: skip
    if strategy == "ddp" and n > 1:
        out["communication"] = nets * 4 * trained  # DDP buckets of every trained network
    elif strategy == "fsdp2":
        out["communication"] = 2 * 2 * s["block"] + 2 * s["root"] + 4 * s["block"]
    else:
        out["communication"] = 0.0
    out["total"] = sum(out.values())
    return out


def loading(s: dict[str, int], train: str, strategy: str, n: int, nets: int = 2) -> dict[str, float]:
    """Bytes while loading with `parallel.load: rank0` (module docstring): per GPU and host per process, for rank 0
    and for every other rank. One process (n = 1) is rank 0 of DDP."""
    parts, vae, read = 2 * (s["text"] + s["vae"]), 2 * s["vae"], 2 * s["P"]  # bf16 as read from the files
    sharded = strategy == "fsdp2"
    placed = per_gpu(s, train, strategy, n, nets=nets)["weights"] + vae + (4 * s["largest"] if sharded else 0)
    whole_trees = per_gpu(s, train, "ddp", 1, nets=nets)["weights"]  # FSDP2's rank 0 builds the networks in host memory
    return {"gpu_rank0": CONTEXT + max(parts + (0 if sharded else read), placed),
            "gpu_other": CONTEXT + max(parts, placed),
            "host_rank0": max(parts + read, whole_trees if sharded else 0),
            "host_other": 0.0}  # received straight into the GPU: no weights in host memory


# One GPU, full fine-tune: the memory switches (README "Performance"). The peak is the optimizer step's: resident
# state, one network's float32 gradients, and torch AdamW's foreach temporary (about one float32 copy of the
# network it steps). For the shipped settings this gives 71.8 GiB for SD3-Medium, against 72.5 GiB measured on an
# H100 at 512 and 1024 px, batch 4 (benchmarks/results/iteration_speed.md): activations under gradient
# checkpointing stay below that peak at those sizes. bitsandbytes' 8-bit AdamW keeps 2 bytes of moments per
# parameter and updates tensor by tensor (no foreach temporary). A LoRA fake teacher's adapter grows with its rank
# (on the proving ground rank 8 of the toy's width 64 collapsed, rank 32 held: which rank SD3-Medium needs is not
# shown, hence two ranks).
SWITCHES = {  # label -> (fake teacher: "full" or its LoRA rank, EMA on the GPU, optimizer)
    "sd3-4nfe as shipped (full fake teacher, EMA on the GPU, AdamW)": ("full", True, "adamw"),
    "optim.ema_device: cpu": ("full", False, "adamw"),
    "model.fake_teacher: lora (rank 64)": (64, True, "adamw"),
    "model.fake_teacher: lora (rank 64) + optim.ema_device: cpu": (64, False, "adamw"),
    "model.fake_teacher: lora (rank 256) + optim.ema_device: cpu": (256, False, "adamw"),
    "rank 256 + optim.ema_device: cpu + optim.optimizer: adamw-8bit": (256, False, "adamw-8bit"),
}


def one_gpu(s: dict[str, int], fake: str | int, ema_on_gpu: bool, optimizer: str) -> dict[str, float]:
    """Bytes at the optimizer-step peak of a one-GPU full fine-tune (see SWITCHES)."""
    P = s["P"]
    fake_params = P if fake == "full" else s["A"] * fake / LORA_RANK  # adapters: r * (in + out) per layer
    moments = 8 if optimizer == "adamw" else 2
    out = {"weights": 4 * P + 2 * P + 4 * fake_params + (10 if fake == "full" else 6) * s.get("buffers", 0), "gradients": 4 * P,
           "optimizer": moments * (P + fake_params), "ema": 4 * P if ema_on_gpu else 0.0,
           "step temporary": 4 * P if optimizer == "adamw" else 0.0}  # fmt: skip
    out["total"] = sum(out.values())
    return out


def one_gpu_table(s: dict[str, int], budget_gb: float = 48.0) -> list[str]:
    keys = ("weights", "gradients", "optimizer", "ema", "step temporary", "total")
    lines = ["| SD3-Medium, full fine-tune, one GPU | " + " | ".join(keys) + f" | under {budget_gb:g} GB? |",
             "|" + "---|" * (len(keys) + 2)]
    for label, switches in SWITCHES.items():
        m = one_gpu(s, *switches)
        fits = "yes" if m["total"] < budget_gb * 1e9 else "no"
        lines.append(f"| {label} | " + " | ".join(f"{m[k] / GIB:.1f}" for k in keys) + f" | {fits} |")
    return lines


def measured() -> list[dict[str, Any]]:
    if not MEASURED.is_file():
        return []
    return [json.loads(line) for line in MEASURED.read_text().splitlines() if line.strip()]


def trained_networks(method: Any) -> int:
    """Networks with gradients and optimizer state: the student and the fake teacher (TBCM: the student only)."""
    return 1 if method.family == "tbcm" else 2


def student_rows(method: Any) -> int:
    """Samples per prompt in the student's forward with gradient (engine.step.predict_student: [xt; xe] for CDM;
    TBCM: every point of the teacher's rollout but its start, engine.tbcm.teacher_rollout)."""
    if method.family == "tbcm":
        return method.tbcm.route_steps - 1
    w = method.losses
    main, cdm = bool(w.ca or w.dm or w.guided_dm), bool(w.cdm)
    shared = main and cdm and method.cdm_perturbation == "none"
    return int(main or shared) + int(cdm and not shared)


def preset_memory(name: str, parts: dict[str, dict], acts: dict[tuple[str, str], dict]) -> dict[str, Any]:
    """Per-GPU bytes of `name` at 1/2/4/8 GPUs under DDP and FSDP2, activations included."""
    from real_size import activation_bytes

    from cdmctl.backbones.architectures import for_model
    from cdmctl.config.load import load_preset

    preset = load_preset(name)
    arch = for_model(preset.model.pretrained)
    if arch.name not in parts:
        parts[arch.name] = shapes(arch_parts(arch.name))
    key = (arch.name, preset.model.train)
    if key not in acts:  # one sample's saved activations, measured on the meta step (benchmarks/real_size.py)
        acts[key] = activation_bytes(name)
    s, act = parts[arch.name], acts[key]
    per_sample = act["checkpointing" if preset.model.gradient_checkpointing else "no_checkpointing"]
    rows, batch = {}, preset.train.batch_size
    nets, samples = trained_networks(preset.method), student_rows(preset.method)
    for strategy in ("ddp", "fsdp2"):
        for n in GPUS:
            if (strategy == "fsdp2" and n == 1) or batch % n:
                continue
            m = per_gpu(s, preset.model.train, strategy, n, nets=nets)
            m["activations"] = per_sample * samples * batch / n
            m["total"] += m["activations"] + CONTEXT
            rows[(strategy, n)] = {**m, **{f"load_{k}": v for k, v in loading(s, preset.model.train, strategy, n, nets).items()}}
    return {"preset": name, "arch": arch.name, "train": preset.model.train, "batch": batch,
            "resolution": preset.model.resolution, "rows": rows, "act": act, "per_sample": per_sample,
            "student_rows": samples, "params": s}  # fmt: skip


def load_peak(row: dict[str, float]) -> float:
    return max(row["load_gpu_rank0"], row["load_gpu_other"])


def fits(mem: dict[str, Any], card_gb: float) -> str:
    """The smallest setup (fewest GPUs, DDP before FSDP2) whose per-GPU total, and per-GPU peak while loading, fit
    `card_gb`, with its flags; else the largest global batch 8 GPUs under FSDP2 hold."""
    for n in GPUS:
        for strategy in ("ddp", "fsdp2"):
            m = mem["rows"].get((strategy, n))
            if m is not None and max(m["total"], load_peak(m)) <= card_gb * 1e9:
                return f"{n} GPU" + (f"s, `parallel.strategy={strategy}`" if n > 1 else "")
    m = mem["rows"][("fsdp2", 8)]
    if load_peak(m) > card_gb * 1e9:
        return "not on 8 GPUs"
    static = m["total"] - m["activations"]
    per_prompt = mem["per_sample"] * mem["student_rows"]
    room = int((card_gb * 1e9 - static) // per_prompt) if card_gb * 1e9 > static else 0
    if room < 1:
        return "not on 8 GPUs"
    return f"8 GPUs, `parallel.strategy=fsdp2`, `train.batch_size={8 * room}`"


def preset_table(mems: list[dict[str, Any]]) -> list[str]:
    head = ["preset (train, global batch, px)", "transformer, LoRA adapter", "activations GiB/sample (ckpt / none)",
            "host GiB while loading: rank 0 DDP / FSDP2, other ranks", *(f"{c} GB cards" for c in CARDS_GB)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in mems:
        p = m["params"]
        adapter = f", {p['A'] / 1e6:.0f}M" if m["train"] == "lora" else ""
        lines.append(f"| {m['preset']} ({m['train']}, {m['batch']}, {m['resolution']}) | {p['P'] / 1e9:.2f}B{adapter} | "
                     f"{m['act']['checkpointing'] / GIB:.2f} / {m['act']['no_checkpointing'] / GIB:.1f} | "
                     f"{host_cell(m)} | " + " | ".join(fits(m, c) for c in CARDS_GB) + " |")  # fmt: skip
    return lines


def host_cell(m: dict[str, Any]) -> str:
    ddp, fsdp2 = m["rows"][("ddp", 2)], m["rows"][("fsdp2", 2)]
    return f"{ddp['load_host_rank0'] / GIB:.0f} / {fsdp2['load_host_rank0'] / GIB:.0f}, {ddp['load_host_other'] / GIB:.0f}"


def per_gpu_table(mems: list[dict[str, Any]]) -> list[str]:
    keys = ("weights", "gradients", "optimizer", "ema", "communication", "activations", "total")
    loads = ("load_gpu_rank0", "load_gpu_other", "load_host_rank0", "load_host_other")
    lines = ["| preset | strategy | GPUs | batch/GPU | " + " | ".join(keys) + " | loading: GPU rank 0 / others | "
             "loading: host rank 0 / others |", "|" + "---|" * (6 + len(keys))]  # fmt: skip
    for m in mems:
        for (strategy, n), row in m["rows"].items():
            g0, g1, h0, h1 = (row[k] / GIB for k in loads)
            lines.append(f"| {m['preset']} | {strategy if n > 1 else '-'} | {n} | {m['batch'] // n} | "
                         + " | ".join(f"{row[k] / GIB:.1f}" for k in keys)
                         + (f" | {g0:.1f} / {g1:.1f} | {h0:.0f} / {h1:.0f} |" if n > 1 else f" | {g0:.1f} | {h0:.0f} |"))  # fmt: skip
    return lines


def cross_check(parts: dict[str, dict], acts: dict) -> list[str]:
    """The formula against the one measured peak: SD3-Medium full FT, batch 4, 1024 px, one H100: 72.5 GiB."""
    step_peak = one_gpu(parts["sd3-medium"], "full", True, "adamw")["total"]
    act = acts[("sd3-medium", "full")]["checkpointing"] * 2 * 4  # [xt; xe] of 4 prompts
    return [f"**Cross-check** (SD3-Medium, full fine-tune, batch 4, 1024 px, one GPU): the optimizer-step peak by the "
            f"formula (weights, gradients, AdamW moments, EMA, foreach temporary) is {step_peak / GIB:.1f} GiB; the "
            f"student forward's activations ({act / GIB:.1f} GiB with checkpointing) live while the gradients and the "
            f"temporary do not, so the peak stays the step's. Measured: 72.5 GiB on an H100 "
            f"(benchmarks/results/iteration_speed.md), {72.5 - step_peak / GIB:+.1f} GiB from the formula."]


def report(presets: list[str] | None = None, out: Path | None = None) -> None:
    from real_size import real_presets

    parts: dict[str, dict] = {}
    acts: dict[tuple[str, str], dict] = {}
    names = presets or real_presets()
    mems: list[dict[str, Any]] = []
    for name in names:  # written after every preset: a slow machine keeps what it has computed
        mems.append(preset_memory(name, parts, acts))
        text = memory_report(mems, parts, acts, presets)
        if out is not None:
            out.with_suffix(".md").write_text(text)
            out.with_suffix(".json").write_text(json.dumps(
                [{**m, "rows": {f"{k[0]}-{k[1]}": v for k, v in m["rows"].items()}} for m in mems], indent=1,
                default=float))  # fmt: skip
    print(text)


def memory_report(mems: list[dict[str, Any]], parts: dict, acts: dict, presets: list[str] | None) -> str:
    lines = ["# Memory per GPU of every shipped preset at its real size", "",
             f"Command: `python benchmarks/scale_memory.py{' ' + ' '.join(presets) if presets else ''}` (CPU, no "
             "downloads; the networks are built on the meta device from cdmctl.backbones.architectures)", "",
             "Per GPU: the states of the module docstring (bf16 frozen teacher, float32 trained copies and AdamW "
             "moments, EMA on the GPU, FSDP2 with `parallel.teacher: shard`), plus the activations of the student's "
             "forward with gradient at the preset's batch per GPU (one sample's saved tensors measured on the meta "
             "step with the memory-efficient attention kernel, bf16, weights excluded; x2 for CDM's [xt; xe]), plus "
             f"{CONTEXT / GIB:.1f} GiB of CUDA context. No gradient accumulation exists, so a preset's global batch "
             "is split over the GPUs; where it does not fit 8 GPUs, the largest global batch that does is given. "
             "Loading (`parallel.load: rank0`): only rank 0 reads the weights (the other ranks hold none in host "
             "memory: they receive them straight into their GPUs); under FSDP2 it holds the networks "
             "in host memory and every GPU receives only its shards, so a GPU's peak while loading is its shards, the "
             "VAE and one tensor in flight (or the text encoders while the prompt cache is built); a setup fits only "
             "if that peak fits too.", "",
             *preset_table(mems), "", "## Per GPU, GiB", "", *per_gpu_table(mems), "",
             *(cross_check(parts, acts) if ("sd3-medium", "full") in acts else []), "",
             "## SD3-Medium full fine-tune on one 48 GB GPU (optimizer-step peak)", "",
             *one_gpu_table(parts.get("sd3-medium") or shapes(sd3_parts())), "",
             "Measured peaks (`--measure` under torchrun on GPUs): "
             + ("; ".join(f"{r['model']} {r['train']} {r['strategy']} x{r['processes']}: {r['peak_gib']:.1f} GiB "
                          f"({r['device']})" for r in measured()) or "none yet")]  # fmt: skip
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> None:
    """One TTUR cycle of the real engine on random weights of SD3-Medium's shape (or `--size small` on CPU for a
    smoke run), through cdmctl's own accelerator and sharding code; peak memory of the largest rank."""
    import tempfile

    from iteration_speed import SIZES, RandomPromptBank, sd3_backbone

    from cdmctl.config.load import load_preset
    from cdmctl.engine.ema import StudentEMA
    from cdmctl.engine.loop import Distiller, peak_memory
    from cdmctl.engine.roles import Roles
    from cdmctl.networks import adamw, build_networks
    from cdmctl.parallel import build_accelerator, effective_strategy, grad_clipper, prepare_networks, wrap_blocks
    from cdmctl.runprompts import batch_maker

    sets = [f"parallel.strategy={args.strategy}", f"model.train={args.train}", f"train.batch_size={args.batch}",
            f"parallel.teacher={args.teacher}", "method.ttur_ratio=2"]  # fmt: skip
    preset = load_preset("sd3-4nfe", sets)
    strategy = effective_strategy(preset.parallel.strategy)
    acc = build_accelerator(preset, Path(tempfile.mkdtemp()), strategy)
    backbone = sd3_backbone(args.size, acc.device)
    wrap_blocks(acc, backbone.block_classes())
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
    student, teacher, fake = build_networks(backbone, preset, compute)
    student_opt, fake_opt = adamw(student, 1e-5, preset), adamw(fake, 1e-5, preset)
    student, teacher, fake, student_opt, fake_opt = prepare_networks(acc, preset.parallel.teacher, student, teacher,
                                                                     fake, student_opt, fake_opt)  # fmt: skip
    roles = Roles(backbone, student, teacher, fake, autocast=acc.autocast, unwrap=acc.unwrap_model)
    ema = StudentEMA(acc.unwrap_model(student), preset.optim.ema_max_decay)
    res = args.resolution or SIZES[args.size]["resolution"]
    distiller = Distiller(acc, roles, preset.method, preset.optim, student_opt, fake_opt, ema,
                          make_batch=batch_maker(RandomPromptBank(args.size), args.batch // acc.num_processes,
                                                 backbone.latent_shape(res, res), acc.device),
                          shift=lambda s, steps: backbone.shift(s, res, res, steps).to(s.device), seed=0,
                          clip=grad_clipper(acc))  # fmt: skip
    for _ in range(2):
        distiller.iteration()
    peak = peak_memory(acc)
    if acc.is_main_process:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        row = {"model": "SD3-Medium" if args.size == "medium" else f"sd3-{args.size}", "train": args.train,
               "strategy": strategy, "processes": acc.num_processes, "teacher": args.teacher, "resolution": res,
               "batch": args.batch, "peak_gib": peak.get("memory/gb", float("nan")),
               "host_peak_gib": peak["memory/host_peak_gb"], "device": device}  # fmt: skip
        print(json.dumps(row))
        if torch.cuda.is_available() and args.size == "medium":
            MEASURED.parent.mkdir(parents=True, exist_ok=True)
            with MEASURED.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="measure one configuration (under torchrun on GPUs)")
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp2"], default="auto")
    p.add_argument("--train", choices=["full", "lora"], default="full")
    p.add_argument("--teacher", choices=["shard", "replicate"], default="shard")
    p.add_argument("--size", choices=["medium", "small"], default="medium", help="small: a CPU smoke run")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("presets", nargs="*", help="computed table: these presets (default every real one)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_memory")
    args = p.parse_args(argv)
    measure(args) if args.measure else report(args.presets, args.out)


if __name__ == "__main__":
    main()
