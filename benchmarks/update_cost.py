"""Forward-equivalents per sample per student update, from the engine's own cost counter, for every method
and the cheaper-iteration options, side by side with Decoupled DMD (the comparison of the performance target).

A forward of one sample through one network counts 1, its backward 2 (a gradient-checkpointed backward also
recomputes its forward: not counted, the same for every method). The counts depend only on the schedule, the
recorded indices and the method, not on the network, so the real engine (`Distiller` over `Roles`, the presets'
method sections) runs on the pure-torch toy backbone: a few seconds per configuration on a CPU. Dynamic schedules
are random: each row is the mean over `--updates` student updates, with the spread over `--seeds` seeds.

    python benchmarks/update_cost.py                 # every row, 3 seeds x 200 student updates (~1 min on a CPU)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from cdmctl.backbones.tiny.toy import ToyBackbone  # noqa: E402
from cdmctl.config.load import load_preset  # noqa: E402
from cdmctl.engine.loop import Distiller  # noqa: E402
from cdmctl.engine.roles import Roles  # noqa: E402
from cdmctl.engine.step import Batch, Draws  # noqa: E402
from cdmctl.networks import adamw, build_networks  # noqa: E402

BASELINE = "D-DMD (sd3-ddmd)"
# label -> (preset, overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    BASELINE: ("sd3-ddmd", []),
    "DMD2 w/o GAN (sd3-dmd2)": ("sd3-dmd2", []),
    "CDM, fixed schedule (sd3-cdm-fixed)": ("sd3-cdm-fixed", []),
    "CDM (sd3-4nfe, as shipped)": ("sd3-4nfe", []),
    "CDM, one simulation per TTUR cycle": ("sd3-4nfe", ["method.simulation=per-cycle"]),
    "CDM, LoRA fake teacher": ("sd3-4nfe", ["model.fake_teacher=lora", "method.merge_decay=1"]),
    "CDM, per-cycle + LoRA fake teacher": ("sd3-4nfe", ["method.simulation=per-cycle", "model.fake_teacher=lora",
                                                        "method.merge_decay=1"]),
    "CDM, ttur_ratio 1 (one fake step per student update)": ("sd3-4nfe", ["method.ttur_ratio=1"]),
    "CDM, schedule length [1, 12] (quality: see README)": ("sd3-4nfe", ["method.schedule.length=[1,12]"]),
    "CDM, length [1, 12] + per-cycle": ("sd3-4nfe", ["method.schedule.length=[1,12]", "method.simulation=per-cycle"]),
}
COMMON = ["model.pretrained=toy", "model.resolution=32", "model.precision=fp32", "model.gradient_checkpointing=false",
          "model.lora.rank=4", "optim.ema=false"]  # fmt: skip


class OneProcess:
    """What the Distiller asks of accelerate, for one CPU process."""

    device, process_index, num_processes = torch.device("cpu"), 0, 1

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unwrap_model(self, module):
        return module


def distiller(preset_name: str, overrides: list[str], batch: int, seed: int) -> Distiller:
    preset = load_preset(preset_name, [*COMMON, *overrides, f"train.seed={seed}"])
    toy = ToyBackbone(shift=3.0, seed=seed)
    student, teacher, fake = build_networks(toy, preset, torch.float32)
    roles = Roles(toy, student, teacher, fake)
    prompts = toy.encode_prompts([f"prompt {i}" for i in range(64)])

    def make_batch(draws: Draws) -> Batch:
        idx = draws.rows("prompts", batch, lambda g, n: torch.randint(64, (n,), generator=g))
        noise = draws.rows("sim-noise", batch, lambda g, n: torch.randn((n, *toy.latent_shape(32, 32)), generator=g))
        return Batch(prompts.index(idx), toy.encode_prompts([""]).expand(batch), noise)

    return Distiller(OneProcess(), roles, preset.method, preset.optim, adamw(student, 1e-5, preset),
                     adamw(fake, 1e-5, preset), None, make_batch, lambda s, steps: toy.shift(s, 32, 32, steps), seed)  # fmt: skip


PARTS = ("simulation", "student", "teacher", "fake")


def forward_equivalents(d: Distiller, updates: int, batch: int) -> dict[str, float]:
    """Mean (forward + 2 backward) samples per sample per student update, over `updates` updates: in total and
    by part (the simulation is the student's forwards without gradient: its forwards minus its backwards)."""
    before = d.cost.totals_record()
    for _ in range(updates * d.method.ttur_ratio):
        d.iteration()
    after = d.cost.totals_record()
    n = {k[len("cost/total_"):]: after[k] - before.get(k, 0) for k in after}
    parts = {"simulation": n["student_fwd"] - n["student_bwd"], "student": 3 * n["student_bwd"],
             "teacher": n["teacher_fwd"], "fake": n["fake_fwd"] + 2 * n["fake_bwd"]}  # fmt: skip
    parts = {k: v / (updates * batch) for k, v in parts.items()}
    return {"total": sum(parts.values()), **parts}


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    results = {}
    for label, (preset, overrides) in ROWS.items():
        results[label] = [forward_equivalents(distiller(preset, overrides, args.batch, seed), args.updates, args.batch)
                          for seed in range(args.seeds)]  # fmt: skip
        print(f"{label}: {statistics.mean(r['total'] for r in results[label]):.2f}", flush=True)
    return results


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    base = statistics.mean(r["total"] for r in results[BASELINE])
    lines = ["# Cost of one student update: forward-equivalents per sample", "",
             f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`; {args.seeds} seeds x "
             f"{args.updates} student updates per row, batch {args.batch}; forward = 1, backward = 2 per sample "
             "and network (the engine's CostCounter). Target of the performance issue: CDM <= 1.3x D-DMD.", "",
             "By part (means): simulation = the student's forwards without gradient; student = its forward and "
             "backward with gradient; teacher = the frozen teacher's forwards; fake = the fake teacher's forwards "
             "(its update's and the student loss's) and its update's backward.", "",
             "| configuration | forward-equivalents / sample / student update (mean ± std over seeds) | vs D-DMD | "
             "simulation | student | teacher | fake |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, rows in results.items():
        values = [r["total"] for r in rows]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        parts = " | ".join(f"{statistics.mean(r[p] for r in rows):.2f}" for p in PARTS)
        lines.append(f"| {label} | {mean:.2f} ± {std:.2f} | {mean / base:.2f}x | {parts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--updates", type=int, default=200, help="student updates per seed and row")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "update_cost.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = report(measure(args), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
