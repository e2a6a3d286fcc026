"""Seconds, memory and samples per student update: cdmctl's engine against the CDM reference code's iteration.

Performance claims are measured, not asserted. This script times one *student-update period* (k = ttur_ratio
iterations: k simulations, k fake-teacher updates, one student update) of two implementations, in the same
process, on the same networks, optimizers and random draws:

- **ours**: the real engine path, `cdmctl.engine.loop.Distiller` over `cdmctl.engine.roles.Roles`, assembled
  as `cdmctl/run.py` does it (accelerate, bf16 autocast on CUDA / float32 on CPU, float32 masters for the
  student and the fake teacher, bf16 frozen teacher, gradient checkpointing, student EMA).
- **reference-style**: the same math (`cdmctl.engine.losses`, the same loss terms and draws) scheduled the
  way the public CDM reference code schedules it, i.e. with the defects docs/method.md lists: every simulation
  runs all n steps on every sample (no early stop); the CA and the DM student forwards are two forwards on
  identical inputs and the CDM student forward is a third; the teacher's CFG pair is two calls; the DM and
  CDM teacher calls and fake calls are not batched together.

Both use the same drawn schedule (fixed 4-step, or the same dynamic draws: iteration numbers and seeds are
identical) and alternate period by period, so drift on the device affects both alike. Networks are a real
`SD3Transformer2DModel` with random weights (`--size medium`: SD3-Medium's transformer config) and random
conditioning of the real shapes: no text encoders, no VAE, no downloads.

    python benchmarks/iteration_speed.py --size small                      # CPU smoke run, seconds
    python benchmarks/iteration_speed.py --size medium --resolution 512 1024 --batch 4   # one GPU

Prints a table and writes a markdown report (default benchmarks/results/iteration_speed.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from cdmctl.backbones.base import Conditioning  # noqa: E402
from cdmctl.config.load import load_preset  # noqa: E402
from cdmctl.engine import losses as L  # noqa: E402
from cdmctl.engine.cost import CostCounter  # noqa: E402
from cdmctl.engine.ema import StudentEMA  # noqa: E402
from cdmctl.engine.loop import Distiller  # noqa: E402
from cdmctl.engine.roles import Call, Roles  # noqa: E402
from cdmctl.engine.schedules import sample_record_index  # noqa: E402
from cdmctl.engine.simulate import Trajectory  # noqa: E402
from cdmctl.engine.step import (  # noqa: E402
    Batch,
    Draws,
    StudentPrediction,
    ca_term,
    cdm_point,
    matching_term,
)
from cdmctl.networks import adamw, build_networks  # noqa: E402
from cdmctl.parallel import mixed_precision  # noqa: E402
from cdmctl.runprompts import batch_maker  # noqa: E402

# SD3-Medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json): 2.0B params.
SIZES: dict[str, dict[str, Any]] = {
    "medium": {
        "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                        "pos_embed_max_size": 192},
        "text_length": 333,  # 77 (CLIP) + 256 (T5) tokens, SD3's default max_sequence_length
        "resolution": 512,
    },
    "small": {  # a few layers: a CPU smoke run of the same code path
        "transformer": {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2,
                        "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 64,
                        "caption_projection_dim": 64, "pooled_projection_dim": 32, "out_channels": 16,
                        "pos_embed_max_size": 32},
        "text_length": 24,
        "resolution": 128,
    },
}  # fmt: skip
PRESETS = {"fixed": ROOT / "presets" / "sd3-cdm-fixed.yaml", "dynamic": ROOT / "presets" / "sd3-4nfe.yaml"}
NETWORKS = ("student", "teacher", "fake")


# -- models and inputs --------------------------------------------------------------------------------------


def sd3_backbone(size: str, device: torch.device):
    """The package's SD3Backbone over a random-weight SD3Transformer2DModel and SD3's scheduler (shift 3).

    Text encoders and VAE are absent: the conditioning is random, and only `vae.config.block_out_channels`
    (the latent scale factor 8) is read. `velocity` and `shift` are the training code's own.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from cdmctl.backbones.sd3 import SD3Backbone

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 2B random parameters on a CPU take minutes
        transformer = SD3Transformer2DModel(**SIZES[size]["transformer"])
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    parts = {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
             "text_encoder": None, "text_encoder_2": None, "text_encoder_3": None,
             "tokenizer": None, "tokenizer_2": None, "tokenizer_3": None}  # fmt: skip
    return SD3Backbone(parts, source="random-init", device=device)


class RandomPromptBank:
    """Stands in for run.PromptBank with cached embeddings: random [P, L, D] / [P, pooled], kept on the CPU."""

    def __init__(self, size: str, prompts: int = 32):
        cfg = SIZES[size]["transformer"]
        gen = torch.Generator().manual_seed(1)
        length, joint, pooled = SIZES[size]["text_length"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"]

        def encode(n: int) -> Conditioning:
            return Conditioning({"encoder_hidden_states": torch.randn(n, length, joint, generator=gen),
                                 "pooled_projections": torch.randn(n, pooled, generator=gen)})  # fmt: skip

        self.prompts = [f"prompt {i}" for i in range(prompts)]
        self.encoded, self.null = encode(prompts), encode(1)

    def __len__(self) -> int:
        return len(self.prompts)

    def conditioning(self, indices: torch.Tensor) -> Conditioning:
        return self.encoded.index(indices.cpu())


@dataclass
class Setup:
    """Everything both implementations share: one accelerator, one set of networks and optimizers."""

    accelerator: Any
    backbone: Any
    roles: Roles
    student_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    ema: StudentEMA
    bank: RandomPromptBank
    presets: dict[str, Any]


def build(args: argparse.Namespace) -> Setup:
    """Assemble networks as DistillRun does (build_networks, adamw, accelerate.prepare, Roles, EMA)."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=mixed_precision("bf16"))
    presets = {kind: load_preset(str(PRESETS[kind]), [f"train.batch_size={args.batch}"]) for kind in args.schedule}
    preset = next(iter(presets.values()))
    backbone = sd3_backbone(args.size, acc.device)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
    student, teacher, fake = build_networks(backbone, preset, compute)  # fp32 masters, bf16 teacher, checkpointing
    student_opt, fake_opt = adamw(student, preset.optim.student_lr, preset), adamw(fake, preset.optim.fake_lr, preset)
    student, fake, student_opt, fake_opt = acc.prepare(student, fake, student_opt, fake_opt)
    teacher.to(acc.device)
    roles = Roles(backbone, student, teacher, fake, autocast=acc.autocast, unwrap=acc.unwrap_model)
    ema = StudentEMA(acc.unwrap_model(student), preset.optim.ema_max_decay)
    return Setup(acc, backbone, roles, student_opt, fake_opt, ema, RandomPromptBank(args.size), presets)


def distiller(cls: type[Distiller], setup: Setup, kind: str, resolution: int, batch: int) -> Distiller:
    preset = setup.presets[kind]
    latent = setup.backbone.latent_shape(resolution, resolution)
    return cls(
        setup.accelerator, setup.roles, preset.method, preset.optim, setup.student_opt, setup.fake_opt, setup.ema,
        make_batch=batch_maker(setup.bank, batch, latent, setup.accelerator.device),
        shift=lambda s, steps: setup.backbone.shift(s, resolution, resolution, steps).to(s.device),
        seed=preset.train.seed,
    )


# -- the reference code's scheduling, over the same math ----------------------------------------------------


def _call(roles: Roles, module: torch.nn.Module, call: Call) -> torch.Tensor:
    """One network evaluation on one call's inputs (no concatenation with anything else)."""
    return roles._velocity(module, call.x, call.s, call.cond)


@torch.no_grad()
def full_simulation(roles: Roles, batch: Batch, levels: torch.Tensor, draws: Draws, cost: CostCounter) -> Trajectory:
    """Every sample through all n steps (the reference's loop), recording x_{i_b}, v_{i_b} on the way."""
    noise, n = batch.noise, len(levels)
    index = draws.rows("record", len(noise), lambda g, m: sample_record_index(g, m, n))  # the engine's own draw
    index = index.to(noise.device)
    grid = levels.double().cpu().tolist() + [0.0]
    x, xt, vt = noise.clone(), torch.empty_like(noise), torch.empty_like(noise)
    for i in range(n):
        s = torch.full((len(x),), grid[i], device=x.device, dtype=torch.float32)
        v = roles.student(x, s, batch.cond).to(x.dtype)
        hit = index == i
        xt[hit], vt[hit] = x[hit], v[hit]
        x = x + (grid[i + 1] - grid[i]) * v
    cost.add("student", forward=n * len(x))
    s_t = levels.to(device=noise.device, dtype=torch.float32)[index]
    x0t = xt - s_t.view(-1, *[1] * (noise.dim() - 1)) * vt
    return Trajectory(xt=xt, s_t=s_t, vt=vt, x0t=x0t, final=x, student_samples=n * len(x))


def reference_student_loss(roles: Roles, method, batch: Batch, traj: Trajectory, draws: Draws, cost: CostCounter):
    """CA + DM + CDM with three student forwards and one call per teacher / fake evaluation."""
    w = method.losses
    if w.guided_dm:
        raise ValueError("the reference-style loop covers the CDM losses (CA, DM, CDM), not guided DM")

    def student_x0(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = roles.student(x, s, batch.cond)
        cost.add("student", forward=len(x), backward=len(x))
        return L.clean_estimate(x, s, v)

    terms = []
    if w.ca:  # the reference: one student forward for CA ...
        x0_ca = student_x0(traj.xt, traj.s_t)
        terms.append(ca_term(method, batch, traj, StudentPrediction(x0_ca, None, None), draws))
    if w.dm:  # ... and another on identical inputs for DM
        x0_dm = student_x0(traj.xt, traj.s_t)
        terms.append(matching_term("dm", w.dm, method, batch, x0_dm, x0_dm, draws))
    if w.cdm:  # ... and a third, separate one at the CDM point
        xe, se, _ = cdm_point(method, traj, draws)
        x0e = student_x0(xe, se)
        target = traj.final if method.cdm_target == "full-trajectory" else x0e
        terms.append(matching_term("cdm", w.cdm, method, batch, x0e, target, draws))
    total = torch.zeros((), device=traj.xt.device)
    stats = {"level/s_t_mean": traj.s_t.mean().item()}
    for term in terms:
        with torch.no_grad():  # CFG pair: two teacher calls; DM and CDM: one teacher and one fake call each
            t_out = [_call(roles, roles.teacher_module, c) for c in term.teacher]
            f_out = [_call(roles, roles.fake_module, c) for c in term.fake]
        cost.add("teacher", forward=sum(len(c.x) for c in term.teacher))
        cost.add("fake", forward=sum(len(c.x) for c in term.fake))
        loss = term.finish(t_out, f_out)
        stats[f"loss/{term.name}"] = loss.item()
        total = total + term.weight * loss
    stats["loss/student"] = total.item()
    return total, stats


class ReferenceStyle(Distiller):
    """Distiller with the reference's scheduling: full simulations and the unbatched student update.

    The fake-teacher update, optimizer steps, clipping, merge and EMA are the engine's own (inherited).
    """

    def simulate(self, batch: Batch, levels: torch.Tensor, draws: Draws):
        return full_simulation(self.roles, batch, levels, draws, self.cost)

    def student_loss(self, batch: Batch, traj, draws: Draws):
        return reference_student_loss(self.roles, self.method, batch, traj, draws, self.cost)


# -- measurement --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One implementation on one configuration: per student-update figures."""

    name: str
    seconds: list[float] = field(default_factory=list)
    peak_gib: float = 0.0
    cost: dict[str, float] = field(default_factory=dict)
    schedule_lengths: list[list[int]] = field(default_factory=list)  # n of each simulation, per period
    resident_gib: float = 0.0  # allocated between updates (weights, optimizer states, EMA; no gradients)
    nonfinite: int = 0
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds) if self.seconds else math.nan


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def period(d: Distiller, start: int, device: torch.device) -> tuple[float, dict[str, float], list[dict]]:
    """k iterations from iteration `start` (a multiple of k): one student update. (seconds, cost, stats)."""
    d.counters.iteration = start
    cost: dict[str, float] = {}
    records = []
    sync(device)
    tick = time.perf_counter()
    for _ in range(d.method.ttur_ratio):
        stats = d.iteration()
        records.append(stats)
        for key, value in stats.items():
            if key.startswith("cost/"):
                cost[key] = cost.get(key, 0) + value
    sync(device)
    return time.perf_counter() - tick, cost, records


def free_memory(setup: Setup) -> None:
    setup.student_opt.zero_grad(set_to_none=True)
    setup.fake_opt.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(setup: Setup, kind: str, resolution: int, args: argparse.Namespace) -> list[Measured]:
    """Warm-up then `repeats` periods of each implementation, alternating, on the same iteration numbers."""
    device = setup.accelerator.device
    impls = [(Measured("ours"), distiller(Distiller, setup, kind, resolution, args.batch)),
             (Measured("reference-style"), distiller(ReferenceStyle, setup, kind, resolution, args.batch))]
    k = impls[0][1].method.ttur_ratio
    for j in range(args.warmup + args.repeats):
        for result, d in impls:
            if result.error:
                continue
            try:
                if device.type == "cuda":
                    resident = torch.cuda.memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, cost, records = period(d, j * k, device)
            except torch.OutOfMemoryError as e:
                result.error = f"out of memory ({str(e).splitlines()[0][:120]})"
                free_memory(setup)
                continue
            if j < args.warmup:
                continue
            result.seconds.append(seconds)
            result.schedule_lengths.append([int(r["level/n"]) for r in records])
            for key, value in cost.items():
                result.cost[key] = result.cost.get(key, 0) + value / args.repeats
            if device.type == "cuda":
                result.peak_gib = max(result.peak_gib, torch.cuda.max_memory_allocated(device) / 2**30)
                result.resident_gib = max(result.resident_gib, resident)
            result.nonfinite = d.counters.nonfinite
        print(f"  [{kind} {resolution}px] period {j}: "
              + ", ".join(f"{r.name} {r.seconds[-1]:.3f}s" for r, _ in impls if r.seconds and j >= args.warmup),
              flush=True)  # fmt: skip
    return [r for r, _ in impls]


def verify_same_losses(setup: Setup, kind: str, resolution: int, args: argparse.Namespace) -> tuple[str, float]:
    """From one saved state, one period of each implementation: their losses must agree (same math, same draws).

    Returns the loss with the largest relative difference, and that difference. Only for small models (it copies every network and optimizer).
    """
    roles = setup.roles
    saved = copy.deepcopy([roles.student_module.state_dict(), roles.fake_module.state_dict(),
                           setup.student_opt.state_dict(), setup.fake_opt.state_dict(), setup.ema.shadow])  # fmt: skip
    device = setup.accelerator.device
    losses = []
    for cls in (Distiller, ReferenceStyle):
        roles.student_module.load_state_dict(saved[0])
        roles.fake_module.load_state_dict(saved[1])
        setup.student_opt.load_state_dict(saved[2])
        setup.fake_opt.load_state_dict(saved[3])
        setup.ema.shadow = copy.deepcopy(saved[4])
        _, _, records = period(distiller(cls, setup, kind, resolution, args.batch), 0, device)
        losses.append({key: v for r in records for key, v in r.items() if key.startswith("loss/")})
    ours, ref = losses
    if set(ours) != set(ref):
        raise AssertionError(f"different loss terms: {sorted(ours)} vs {sorted(ref)}")
    return max(((key, abs(ours[key] - ref[key]) / max(abs(ours[key]), 1e-12)) for key in ours), key=lambda kv: kv[1])


# -- report -------------------------------------------------------------------------------------------------


def cost_text(cost: dict[str, float]) -> str:
    """'student 28/8, teacher 16, fake 16/8' (forward/backward samples per student update)."""
    parts = []
    for net in NETWORKS:
        fwd, bwd = cost.get(f"cost/{net}_fwd", 0), cost.get(f"cost/{net}_bwd", 0)
        parts.append(f"{net} {fwd:.4g}" + (f"/{bwd:.4g}" if bwd or net != "teacher" else ""))
    return ", ".join(parts)


def table(rows: list[tuple[str, int, list[Measured]]], cuda: bool) -> list[str]:
    header = ("| schedule | res | implementation | s / student update (median) | mean | peak GPU memory "
              "| samples fwd/bwd per student update | reference / ours (median, mean) |")  # fmt: skip
    lines = [header, "|" + "---|" * 8]
    for kind, res, results in rows:
        ours = results[0]
        for r in results:
            if r.error:
                lines.append(f"| {kind} | {res} | {r.name} | {r.error} | | | | |")
                continue
            ratio = ""
            if r is not ours and not ours.error:
                ratio = f"**{r.median / ours.median:.2f}x**, {r.mean / ours.mean:.2f}x"
            peak = f"{r.peak_gib:.1f} GiB" if cuda else "n/a (CPU)"
            lines.append(f"| {kind} | {res} | {r.name} | {r.median:.3f} | {r.mean:.3f} | {peak} "
                         f"| {cost_text(r.cost)} | {ratio} |")  # fmt: skip
    return lines


def environment(setup: Setup, args: argparse.Namespace) -> list[str]:
    import accelerate
    import diffusers

    device = setup.accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    count = sum(p.numel() for p in setup.backbone.transformer.parameters())
    params = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"
    mixed = setup.accelerator.mixed_precision
    text = f"[B, {SIZES[args.size]['text_length']}, {SIZES[args.size]['transformer']['joint_attention_dim']}]"
    return [
        (f"- device: {name}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
         f"accelerate {accelerate.__version__}, Python {platform.python_version()}"),
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        (f"- model: SD3Transformer2DModel `--size {args.size}` ({params} parameters, random weights), mixed "
         f"precision `{mixed}`, float32 student/fake masters, {'bf16' if mixed == 'bf16' else 'float32'} frozen "
         "teacher, gradient checkpointing on, AdamW, student EMA on the device"),
        (f"- per-GPU batch {args.batch}; conditioning random {text} + pooled; ttur_ratio k = 2, so one student "
         "update = 2 iterations (2 simulations, 2 fake updates, 1 student update)"),
        (f"- timing: {args.warmup} warm-up period(s), then median and mean of {args.repeats}; the two "
         "implementations alternate period by period on the same iteration numbers (same schedules, indices, "
         "noise); peak memory = torch.cuda.max_memory_allocated over each implementation's periods"),
    ]


def write_report(path: Path, setup: Setup, args: argparse.Namespace, rows, notes: list[str]) -> None:
    cuda = setup.accelerator.device.type == "cuda"
    lines = ["# Iteration speed: cdmctl engine vs. the CDM reference code's scheduling", "",
             *environment(setup, args), "", *table(rows, cuda), ""]  # fmt: skip
    lines += ["Samples: forward/backward samples through each network per student update (CostCounter of the "
              "engine; counted the same way in the reference-style loop; a gradient-checkpointed backward also "
              "recomputes its forward, not counted). Dynamic schedule lengths n of the two simulations of each "
              "timed period: "
              + "; ".join(f"{res}px {r[0].schedule_lengths}" for kind, res, r in rows if kind == "dynamic"),
              ""]  # fmt: skip
    if cuda:
        lines += ["Resident memory between updates (weights, AdamW states, EMA; gradients freed): "
                  + "; ".join(f"{kind} {res}px {r[0].resident_gib:.1f} GiB" for kind, res, r in rows if r[0].seconds),
                  ""]  # fmt: skip
    lines += [f"- {note}" for note in notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="medium", help="medium: SD3-Medium (GPU); small: CPU")
    p.add_argument("--resolution", type=int, nargs="+", help="image sizes in pixels (default 512 medium, 128 small)")
    p.add_argument("--batch", type=int, default=4, help="per-GPU batch size")
    p.add_argument("--schedule", nargs="+", choices=["fixed", "dynamic"], default=["fixed", "dynamic"])
    p.add_argument("--warmup", type=int, default=1, help="untimed periods per implementation and configuration")
    p.add_argument("--repeats", type=int, default=5, help="timed periods (student updates) per implementation")
    p.add_argument("--verify", action="store_true", help="first check both implementations give equal losses")
    p.add_argument("--max-seconds", type=float, default=0, help="skip configurations started after this (0: none)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "iteration_speed.md")
    args = p.parse_args(argv)
    args.resolution = args.resolution or [SIZES[args.size]["resolution"]]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    setup = build(args)
    print("\n".join(environment(setup, args)), flush=True)
    notes: list[str] = []
    if args.verify:
        key, worst = verify_same_losses(setup, args.schedule[0], args.resolution[0], args)
        notes.append(f"same-math check ({args.schedule[0]} schedule): from one saved state, every loss of one "
                     f"period agrees between the two implementations to {worst:.1e} relative ({key} the worst)")
        print(notes[-1], flush=True)
    rows = []
    for res in args.resolution:
        for kind in args.schedule:
            if args.max_seconds and time.perf_counter() - began > args.max_seconds:
                notes.append(f"{kind} at {res}px skipped: the --max-seconds {args.max_seconds:g} budget was spent")
                continue
            rows.append((kind, res, measure(setup, kind, res, args)))
            free_memory(setup)
            for line in table(rows[-1:], setup.accelerator.device.type == "cuda"):
                print(line, flush=True)
            write_report(args.out, setup, args, rows, notes)  # after each configuration: partial runs keep results
    bad = [f"{r.name} {kind} {res}px: {r.nonfinite}" for kind, res, rs in rows for r in rs if r.nonfinite]
    if bad:
        notes.append("non-finite (skipped) updates, which make timings optimistic: " + "; ".join(bad))
    write_report(args.out, setup, args, rows, notes)
    print("\n" + "\n".join(table(rows, setup.accelerator.device.type == "cuda")))
    print(f"\nwritten {args.out} in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
