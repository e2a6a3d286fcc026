"""Peak host memory per process while several processes start a run: every rank reading the weights itself
(`parallel.load every-rank`, the earlier behaviour) against rank 0 reading them and the others receiving them
(`parallel.load rank0`, DDP), and that under FSDP2 (`rank0-fsdp2`: each rank receives only its shards).

A random-weight SD3 pipeline folder of the real diffusers classes, with a transformer of a few hundred MB, is written
once; then 2 CPU processes (torchrun, gloo) each load the backbone and build the three networks exactly as `distill`
does (`load_backbone` under `transformer_at` and `parts_from_rank0`, `build_networks`, `handover`, and under
FSDP2 `prepare_networks`, which fills the sharded networks). Each process reports its
resident-set high-water mark (VmHWM in /proc/self/status) after its imports, after loading the backbone, and after
the networks hold their weights.

On a GPU node the weights a receiving rank gets go straight into GPU memory; on these CPU processes the training
device is host memory, so a receiving rank still ends up holding its own copy there. The column that carries over to
GPU nodes is what loading itself costs each rank ("loading": after loading minus after imports).

    python benchmarks/loading_memory.py              # ~1-2 min on 2 CPU cores; writes benchmarks/results/loading_memory.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

# SD3Transformer2DModel arguments: 4 joint blocks of width 768, ~85M parameters (~340 MB in float32)
TRANSFORMER = {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 12, "caption_projection_dim": 768}
MODES = ("every-rank", "rank0", "rank0-fsdp2")


def high_water_mib() -> float:
    """This process's peak resident set so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(model: Path, train: str, load: str, out: Path) -> None:
    """One rank's start-up, as DistillRun does it; writes its high-water marks to out/rank<r>.json. `load` is a
    `parallel.load` value, or rank0-fsdp2 (rank0 under FSDP2: the networks sharded, then filled)."""
    import contextlib

    import torch

    from cdmctl.backbones import load_backbone
    from cdmctl.backbones.loading import parts_from_rank0, transformer_at, transformer_placement
    from cdmctl.config import load_preset
    from cdmctl.networks import adamw, build_networks
    from cdmctl.parallel import (DDP, FSDP2, build_accelerator, handover, prepare_networks, receive_weights,
                                 wrap_blocks)  # fmt: skip

    marks = {"imports": high_water_mib()}
    strategy, load = (FSDP2, "rank0") if load == "rank0-fsdp2" else (DDP, load)
    preset = load_preset("sd3-4nfe", [f"model.pretrained={model}", f"model.train={train}", "model.precision=fp32",
                                      f"parallel.load={load}", f"parallel.strategy={strategy}"])  # fmt: skip
    acc = build_accelerator(preset, out, strategy)
    once, main = load == "rank0", acc.is_main_process
    others = parts_from_rank0(lambda parts: receive_weights(acc, parts), empty=not main) if once else contextlib.nullcontext()
    with transformer_at(transformer_placement(once, main, acc.is_fsdp2)), others:
        backbone = load_backbone("sd3", str(model), dtype=torch.float32, device=acc.device)
    marks["loaded"] = high_water_mib()
    wrap_blocks(acc, backbone.block_classes())
    params = sum(p.numel() for p in backbone.transformer.parameters())  # before LoRA adds its adapters
    student, teacher, fake = build_networks(backbone, preset, torch.float32)
    weights = handover(acc, load, [student, teacher, fake])
    if acc.is_fsdp2:  # the networks sharded on meta, then filled shard by shard
        opts = adamw(student, 1e-4, preset), adamw(fake, 1e-4, preset)
        prepare_networks(acc, preset.parallel.teacher, student, teacher, fake, *opts, "accelerator", weights)
    marks["networks"] = high_water_mib()
    record = {"rank": acc.process_index, "marks_mib": marks, "transformer_params": params}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    acc.end_training()


def run(model: Path, train: str, load: str, processes: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="cdmctl-loadmem-") as tmp:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--nproc_per_node", str(processes), str(Path(__file__).resolve()), "--worker",
               str(model), train, load, tmp]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode:
            raise RuntimeError(result.stderr[-3000:])
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(processes)]


def report(rows: list[dict], command: str, weights_mib: float) -> str:
    lines = ["# Peak host memory per process at start-up: every rank loads vs rank 0 loads", "",
             f"Command: `{command}`. 2 CPU processes (torchrun, gloo); an SD3 pipeline folder of random weights whose "
             f"transformer holds {weights_mib:.0f} MiB (float32). VmHWM (peak resident set) of each process after its "
             "imports, after loading the backbone, and after the three networks hold their weights; 'loading' is the "
             "second minus the first: what reading the weights costs that rank. On GPUs a receiving rank's weights "
             "(the networks, the text encoders and the VAE) go to GPU memory, so there its host peak stays at 'after "
             "imports'; on these CPU processes the training device is host memory and the last two columns include "
             "the rank's own copy of what it received (under FSDP2: its shards of the networks).", "",
             "| train | parallel.load | rank | after imports (MiB) | after loading (MiB) | loading (MiB) | "
             "after networks (MiB) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        m = row["marks_mib"]
        lines.append(f"| {row['train']} | {row['load']} | {row['rank']} | {m['imports']:.0f} | {m['loaded']:.0f} | "
                     f"{m['loaded'] - m['imports']:.0f} | {m['networks']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(Path(argv[1]), argv[2], argv[3], Path(argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trains", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loading_memory")
    args = p.parse_args(argv)
    from cdmctl.backbones.tiny import write_tiny_sd3

    rows = []
    with tempfile.TemporaryDirectory(prefix="cdmctl-loadmem-model-") as tmp:
        model = write_tiny_sd3(Path(tmp) / "pipe", seed=0, transformer_config=TRANSFORMER)
        for train in args.trains:
            for load in MODES:
                for record in run(model, train, load, args.processes):
                    rows.append({"train": train, "load": load, **record})
                    print(json.dumps(rows[-1]), flush=True)
    weights_mib = rows[0]["transformer_params"] * 4 / 2**20
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/loading_memory.py", *argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    text = report(rows, command, weights_mib)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
