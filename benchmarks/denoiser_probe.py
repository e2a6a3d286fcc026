"""Probe a proving-ground student's denoiser level by level: precision of its clean estimate on noised ground truth.

    python benchmarks/denoiser_probe.py RUN_DIR [RUN_DIR ...] [--levels 0.947 0.857 0.667 0.462]

For each level s (the levels the network sees, after the shift) ground-truth samples are noised,
x_s = (1 - s) x0 + s eps, and the model's clean estimate x_s - s v(x_s, s) is scored against the ground truth
(precision: share within tau of one of its prompt's modes). The teacher is the first row. A student that
trains at a level keeps or improves the teacher's estimate there; one that does not may lose it. Each RUN_DIR
is a `cdmctl distill` run folder on `builtin:toy-sd3` (its latest checkpoint, EMA weights when kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def clean_estimate_precision(backbone, module, gt, cond, levels, per_prompt: int = 16, seed: int = 0) -> list[float]:
    from cdmctl.proving import metrics

    ref, ref_idx = metrics.reference_set(gt)
    x0, idx = gt.sample_per_prompt(per_prompt, torch.Generator().manual_seed(seed))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    rows, out = cond.index(idx), []
    with torch.no_grad():
        for s in levels:
            level = torch.full((len(x0),), float(s))
            xs = (1 - s) * x0 + s * eps
            est = xs - s * backbone.velocity(module, xs, level, rows).float()
            out.append(metrics.score(gt, est, idx, ref, ref_idx)["precision"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--levels", nargs="+", type=float, default=[0.977, 0.947, 0.857, 0.667, 0.462])
    p.add_argument("--per-prompt", type=int, default=16)
    args = p.parse_args(argv)
    import copy

    from cdmctl.backbones import ensure_builtin
    from cdmctl.engine import checkpoint as ckpt
    from cdmctl.proving import teacher
    from cdmctl.proving.groundtruth import GroundTruth

    torch.set_num_threads(1)
    backbone, gt = teacher.load(ensure_builtin("toy-sd3")), GroundTruth()
    cond = backbone.encode_prompts(gt.prompts)
    print("levels      " + " ".join(f"{s:6.3f}" for s in args.levels))
    rows = [("teacher", backbone.transformer)]
    for run in args.runs:
        student = copy.deepcopy(backbone.transformer)
        last = ckpt.list_checkpoints(run)[-1]
        names = ckpt.load_weights(last, "ema") if (last / "ema.safetensors").is_file() else ckpt.load_weights(last, "student")
        student.load_state_dict(names)
        rows.append((run.name if run.name != "run" else run.parent.name, student))
    for name, module in rows:
        precision = clean_estimate_precision(backbone, module.eval(), gt, cond, args.levels, args.per_prompt)
        print(f"{name:<11} " + " ".join(f"{v:6.2f}" for v in precision))


if __name__ == "__main__":
    main()
