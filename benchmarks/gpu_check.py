"""Every family at its real size on one GPU, random weights: seconds, samples/s, peak memory and MFU per student update.

    python benchmarks/gpu_check.py                          # one H100 (80 GB), under 8 minutes, no downloads
    python benchmarks/gpu_check.py --families sd3 zimage    # some families
    python benchmarks/gpu_check.py --tiny --families sd3 zimage --out /tmp/check   # CPU, tiny pipelines, seconds

What runs is `cdmctl distill`'s own assembly: the preset is loaded with `load_preset` and `--set`-style overrides, and
`cdmctl.run.DistillRun` builds the accelerator, the embedding cache, the networks (full or LoRA, gradient
checkpointing, float32 masters, bf16 teacher), the optimizers, the EMA and the Distiller. Only the backbone differs:
the real transformer and VAE of the preset's model (cdmctl.backbones.architectures), built on the GPU with their
classes' random initialisation in bf16, and prompts encoded as conditioning of the real shapes (zeros, full length)
instead of text encoders. `--tiny` runs the same on the tiny pipelines (builtin:tiny-<family>, float32, CPU).

Per item, one student update (the preset's `ttur_ratio` iterations) is run first under FlopCounterMode (warm-up; it
gives the FLOPs of the update), then timed again on the same iteration numbers (the same drawn schedules, so the
same FLOPs): seconds per student update, samples/s (per-GPU batch / seconds), peak GPU memory over the whole item
(optimizer states included) and MFU (FLOPs / seconds / 989 TFLOP/s, an H100's bf16 dense peak). The preset as
shipped comes first; what does not fit falls back to a LoRA fake teacher with the EMA on the CPU, then to LoRA, then
to batch 1, and the row says which fitted (or "does not fit" with each attempt's reason). Each family's CDM preset
also gets 4-step sampling ms/image at its resolution (the run's SampleGrid: its sampler and VAE decode, 2 images).
SD3 adds its 48 GB configuration (fake-teacher LoRA, EMA on the CPU, batch 4, the process capped at 48 GB) and
`model.compile` on beside off.

The time budget (--budget-s) is checked before every item and every timed repeat; items not reached are rows with
status "skipped: budget", and a watchdog writes the results and ends the process when the budget runs out mid-item.
Writes OUT.md and OUT.json (default benchmarks/results/gpu_check) after every item.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time

START = time.monotonic()  # the budget counts from here: torch's and diffusers' imports included

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # runnable as a plain script from a checkout
        sys.path.insert(0, str(path))

from cdmctl.run import DistillRun  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM bf16 dense tensor cores
GIB = 2**30
FIXED = "{kind: fixed, levels: [1.0, 0.75, 0.5, 0.25], time_shift: true}"
# Decoupled DMD beside a family's CDM preset where no ddmd preset ships: the ddmd presets differ from theirs in these
DDMD = ("method.name=ddmd", "method.losses={ca: 1, dm: 1, cdm: 0, guided_dm: 0}", f"method.schedule={FIXED}")
# family -> (its CDM preset, its ddmd preset or None: the CDM preset with DDMD); the order is the run's order
FAMILIES: dict[str, tuple[str, str | None]] = {
    "sd3": ("sd3-4nfe", "sd3-ddmd"),
    "flux2-klein": ("flux2-klein-4nfe", None),
    "zimage": ("zimage-4nfe", "zimage-ddmd"),
    "longcat": ("longcat-4nfe", "longcat-ddmd"),
    "qwenimage": ("qwenimage-4nfe", None),
    "sd35m": ("sd35m-4nfe", None),  # SD3.5 last: the sd3 adapter, already checked on SD3-Medium
    "sd35l": ("sd35l-4nfe", None),
}
# what replaces the preset's setup when it does not fit, in order (label, overrides)
FULL_FALLBACKS = (("fake-teacher LoRA, EMA on the CPU", ("model.fake_teacher=lora", "optim.ema_device=cpu")),
                  ("LoRA, EMA on the CPU", ("model.train=lora", "optim.ema_device=cpu")))  # fmt: skip
LORA_FALLBACKS = (("EMA on the CPU", ("optim.ema_device=cpu",)),)
CARD_48GB = 48e9  # bytes a 48 GB card offers (44.7 GiB)
TINY = ("model.resolution=32", "model.precision=fp32", "model.lora.rank=4", "model.lora.alpha=8",
        "method.schedule.length=[1, 4]")  # fmt: skip


@dataclass
class Item:
    """One row: a preset with overrides, measured in the first setup of `ladder` that fits."""

    name: str
    family: str
    preset: str
    overrides: tuple[str, ...] = ()
    ladder: tuple[tuple[str, tuple[str, ...], int], ...] = ()  # (label, overrides, per-GPU batch)
    sampling: bool = False
    cap_bytes: float | None = None  # a smaller card: the process may allocate no more than this
    compile: bool = False


@dataclass
class Budget:
    """Seconds left of --budget-s, counted from the process start."""

    seconds: float

    def left(self) -> float:
        return self.seconds - (time.monotonic() - START)


@dataclass
class Results:
    """The rows so far, written after every item and by the watchdog (one lock: the two never interleave)."""

    args: argparse.Namespace
    rows: list[dict[str, Any]] = field(default_factory=list)
    current: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows.append(row)
            self.current = None
            write(self.args, self.rows)


def items(families: list[str], batch: int, tiny: bool) -> list[Item]:
    """The check's rows in the order they run: SD3's first (the 48 GB setup and compile beside them)."""
    from cdmctl.config.load import load_preset

    out = []
    for family in families:
        cdm, ddmd = FAMILIES[family]
        lora = load_preset(cdm).model.train == "lora"
        ladder = (("as shipped", (), batch),) + tuple((label, o, batch) for label, o in
                                                     (LORA_FALLBACKS if lora else FULL_FALLBACKS))  # fmt: skip
        ladder += ((ladder[-1][0] + ", batch 1", ladder[-1][1], 1),) if batch > 1 else ()
        out.append(Item(cdm, family, cdm, ladder=ladder, sampling=True))
        out.append(Item(ddmd or f"{cdm} as ddmd", family, ddmd or cdm, () if ddmd else DDMD, ladder))
        if family == "sd3":
            setup = ("fake-teacher LoRA, EMA on the CPU", FULL_FALLBACKS[0][1], 4)
            out.append(Item(f"{cdm} 48 GB", family, cdm, ladder=(setup,), cap_bytes=None if tiny else CARD_48GB))
            out.append(Item(f"{cdm} compiled", family, cdm, ("model.compile=true",), ladder[:1], compile=True))
    return out


class RandomWeightsRun(DistillRun):
    """`cdmctl distill`'s run whose backbone is the preset's real architecture with random weights on the
    accelerator, and whose prompts are encoded as conditioning of the real shapes (no text encoders, no downloads)."""

    def load_backbone(self, compute: torch.dtype) -> Any:
        from cdmctl.backbones.architectures import for_model, meta_backbone
        from real_size import ShapeBank

        arch = for_model(self.preset.model.pretrained)
        backbone = meta_backbone(arch, self.accelerator.device, compute)
        bank = ShapeBank(arch.conditioning, size=1)
        backbone.encode_prompts = lambda prompts: bank.conditioning(torch.zeros(len(prompts), dtype=torch.long))
        return backbone


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_update(distiller: Any, device: torch.device, count_flops: bool) -> tuple[float, int | None, list[int]]:
    """One student update from iteration 0 (the same draws every time): seconds, FLOPs (when counted), schedule n."""
    from torch.utils.flop_counter import FlopCounterMode

    from iteration_speed import period

    counter = FlopCounterMode(display=False) if count_flops else None
    with counter if counter is not None else contextlib.nullcontext():
        seconds, _, records = period(distiller, 0, device)
    return seconds, counter.get_total_flops() if counter else None, [int(r["level/n"]) for r in records]


def sampling_ms(run: Any) -> float:
    """ms per image of the run's sample grid (its prompts at once, the inference steps, VAE decode), after a warm-up."""
    module = run.accelerator.unwrap_model(run.roles.student_module)
    device = run.accelerator.device
    run.grid.images(module, run.forward_context)
    sync(device)
    tick = time.perf_counter()
    run.grid.images(module, run.forward_context)
    sync(device)
    return 1000 * (time.perf_counter() - tick) / len(run.grid.noise)


def measure(item: Item, overrides: tuple[str, ...], batch: int, args: argparse.Namespace, budget: Budget) -> dict:
    """The item in one setup: build the run as `cdmctl distill` does, one counted update, timed repeats, sampling."""
    from cdmctl.config.load import load_preset

    preset = load_preset(item.preset, [*base_overrides(item, args), *overrides, f"train.batch_size={batch}"])
    folder = Path(tempfile.mkdtemp(prefix=item.name.replace(" ", "-") + "-", dir=args.work))
    run = (DistillRun if args.tiny else RandomWeightsRun)(preset, folder)
    device = run.accelerator.device
    try:
        warm, flops, lengths = one_update(run.distiller, device, count_flops=not item.compile)
        times = []
        while len(times) < args.repeats and budget.left() > 1.5 * (times[-1] if times else warm):
            times.append(one_update(run.distiller, device, count_flops=False)[0])
        row = {"warmup_s": round(warm, 3), "seconds_per_update": min(times) if times else None,
               "timed_updates": len(times), "schedule_lengths": lengths, "flops_per_update": flops,
               "nonfinite_updates": run.distiller.counters.nonfinite}  # fmt: skip
        cuda = device.type == "cuda"
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2) if cuda else None
        if item.sampling and budget.left() > 2 * (row["seconds_per_update"] or warm):
            row["sampling_ms_per_image"] = round(sampling_ms(run), 1)
            row["sampling"] = f"{preset.inference.steps} steps, {preset.model.resolution} px"
        return row
    finally:
        run.accelerator.free_memory()


def base_overrides(item: Item, args: argparse.Namespace) -> list[str]:
    """What every item sets: the check's own prompt file and embedding cache, two sample prompts, no evaluation;
    on --tiny the family's tiny pipeline at CPU size."""
    out = [*item.overrides, f"data.prompts={args.prompts}", f"data.embedding_cache={args.work / 'embeddings'}",
           "data.sample_prompts=[a red cube, a blue ball]", "eval.enabled=false"]  # fmt: skip
    if args.tiny:
        from cdmctl.config.load import load_preset

        out += [f"model.pretrained=builtin:tiny-{load_preset(item.preset).model.backbone}", *TINY]
    return out


def free(device_is_cuda: bool) -> None:
    gc.collect()
    if device_is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_item(item: Item, args: argparse.Namespace, budget: Budget, flops_of: dict[tuple, int]) -> dict[str, Any]:
    """The item's row: the first setup of its ladder that fits (out-of-memory: the next), or why none did."""
    cuda = torch.cuda.is_available() and not args.tiny
    row: dict[str, Any] = {"item": item.name, "family": item.family, "preset": item.preset,
                           "overrides": list(item.overrides), "attempts": []}  # fmt: skip
    for label, overrides, batch in item.ladder:
        if budget.left() < args.item_min_s:
            return {**row, "status": "skipped: budget", "reason": f"{budget.left():.0f} s left"}
        free(cuda)
        if cuda and item.cap_bytes:
            torch.cuda.set_per_process_memory_fraction(min(1.0, item.cap_bytes / torch.cuda.get_device_properties(0).total_memory))
        try:
            measured = measure(item, overrides, batch, args, budget)
        except Exception as e:
            if out_of_memory(e):
                row["attempts"].append(f"{label}, batch {batch}: out of memory ({str(e).splitlines()[0][:160]})")
                continue
            # one broken item must not cost the others their turn on the GPU
            return {**row, "status": "error", "config": label, "batch": batch, "reason": f"{type(e).__name__}: {e}"[:400]}
        finally:
            if cuda and item.cap_bytes:
                torch.cuda.set_per_process_memory_fraction(1.0)
        return finished({**row, **measured, "config": label, "batch": batch}, item, flops_of)
    return {**row, "status": "does not fit", "fits": False, "reason": "; ".join(row["attempts"])}


def out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or a CUDA library's allocation failure (cuBLAS, cuDNN) said in a RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def finished(row: dict[str, Any], item: Item, flops_of: dict[tuple, int]) -> dict[str, Any]:
    """Samples/s and MFU from the timing; a compiled run takes its FLOPs from the uncompiled one of its setup."""
    method = tuple(o for o in item.overrides if not o.startswith("model.compile"))
    key = (item.preset, method, row["config"], row["batch"])
    if row["flops_per_update"] is not None:
        flops_of[key] = row["flops_per_update"]
    row["flops_per_update"] = flops_of.get(key)
    seconds = row["seconds_per_update"]
    status = "ok" if seconds else "skipped: budget"
    row.update(status=status, fits=True, reason="" if seconds else "no time left for a timed update after the warm-up")
    if seconds:
        row["samples_per_s"] = round(row["batch"] / seconds, 3)
        if row["flops_per_update"]:
            row["mfu"] = round(row["flops_per_update"] / seconds / H100_BF16_DENSE, 4)
    return row


def device_line(tiny: bool) -> str:
    if torch.cuda.is_available() and not tiny:
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GIB:.1f} GiB"
    return f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """OUT.json and OUT.md with every row so far."""
    data = {"command": args.command, "device": device_line(args.tiny), "torch": torch.__version__, "tiny": args.tiny,
            "budget_s": args.budget_s, "elapsed_s": round(time.monotonic() - START, 1),
            "mfu_peak_flops": H100_BF16_DENSE, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(data))


def cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def markdown(data: dict[str, Any]) -> str:
    lines = ["# GPU check: every family at its real size, random weights", "",
             f"- command: `{data['command']}`", f"- device: {data['device']}; torch {data['torch']}",
             f"- budget {data['budget_s']} s, {data['elapsed_s']} s used" + (" (tiny pipelines, CPU)" if data["tiny"] else ""),
             "- one student update = the preset's ttur_ratio iterations; MFU over 989 TFLOP/s (H100 bf16 dense); "
             "peak = torch.cuda.max_memory_allocated over the item; sampling: the run's sample grid, VAE decode "
             "included", "",
             "| item | setup | batch/GPU | s/update | samples/s | peak GiB | TFLOP/update | MFU | schedule n "
             "| sampling ms/image | status |", "|" + "---|" * 11]  # fmt: skip
    for r in data["rows"]:
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        tflop = r["flops_per_update"] / 1e12 if r.get("flops_per_update") else None
        lines.append(f"| {r['item']} | {cell(r.get('config'))} | {cell(r.get('batch'))} | "
                     f"{cell(r.get('seconds_per_update'), '{:.3f}')} | {cell(r.get('samples_per_s'))} | "
                     f"{cell(r.get('peak_gib'))} | {cell(tflop, '{:.4g}')} | {cell(r.get('mfu'), '{:.1%}')} | "
                     f"{cell(r.get('schedule_lengths'))} | {cell(r.get('sampling_ms_per_image'))} | {status} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def watchdog(results: Results, plan: list[Item], budget: Budget) -> threading.Timer:
    """At the end of the budget: the rows so far, the rest as skipped, written; then the process ends."""

    def expire() -> None:
        with results.lock:
            done = {r["item"] for r in results.rows}
            for item in plan:
                if item.name not in done:
                    why = "stopped mid-item" if item.name == results.current else "not reached"
                    results.rows.append({"item": item.name, "family": item.family, "preset": item.preset,
                                         "status": "skipped: budget", "reason": why})  # fmt: skip
            write(results.args, results.rows)
            print(f"budget of {budget.seconds:g} s spent: wrote {results.args.out}.md/.json", flush=True)
            os._exit(0)  # holding the lock: the main thread writes nothing after this

    timer = threading.Timer(max(budget.left(), 0.0), expire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--tiny", action="store_true", help="the tiny pipelines on the CPU, float32 (a test of the script)")
    p.add_argument("--budget-s", type=float, default=450, help="seconds for everything, start-up included")
    p.add_argument("--item-min-s", type=float, default=25, help="an item (or a fallback) starts only with this left")
    p.add_argument("--batch", type=int, default=2, help="per-GPU batch of each student update")
    p.add_argument("--repeats", type=int, default=2, help="timed student updates per item (the fastest is reported)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check", help="OUT.md, OUT.json")
    args = p.parse_args(argv)
    args.command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (the real sizes need one); --tiny checks the script on the CPU")
    from cdmctl.quiet import quiet_libraries

    quiet_libraries()
    budget = Budget(args.budget_s)
    plan = items(args.families, args.batch, args.tiny)
    results = Results(args)
    timer = watchdog(results, plan, budget)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        args.work = Path(work)
        args.prompts = args.work / "prompts.txt"
        args.prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
        flops_of: dict[tuple, int] = {}
        for item in plan:
            results.current = item.name
            row = run_item(item, args, budget, flops_of)
            if item.compile:
                from torch import _dynamo  # `import torch._dynamo` here would make `torch` local to main

                _dynamo.reset()  # the compiled blocks' code and their memory
            print(json.dumps(row, default=str), flush=True)
            results.add(row)
    timer.cancel()
    write(args, results.rows)
    print(markdown(json.loads(args.out.with_suffix(".json").read_text())))


if __name__ == "__main__":
    main()
