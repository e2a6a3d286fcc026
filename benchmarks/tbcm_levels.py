"""TBCM's 2-step sampling level: a finished student sampled at [pi/2, t1] for several intermediate TrigFlow times t1
(the authors' scheduler: t1 = 1.0), on the first proving ground, against the teacher with the same sampler.

    python benchmarks/tbcm_levels.py RUN_FOLDER [RUN_FOLDER ...] --checkpoint 800

Each run folder is a `demo-tbcm` run (e.g. a budget_curve.py `--workdir` run); its EMA student at `--checkpoint`
is sampled in 2 steps with sCM's consistency sampler (x0 prediction, then fresh noise at the next level), the
levels unshifted, at every t1 of `--t1`, for each eval seed (paired noise; a second eval seed shows how much of a
difference is the evaluation's own noise). `teacher` rows: the untrained teacher with the same sampler and levels
(the training-free x0 + fresh-noise sampler at that t1). The level in flow space is sin t1 / (sin t1 + cos t1),
what `inference.levels` takes. Writes benchmarks/results/tbcm_levels.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "tbcm_levels"


def flow_level(t: float) -> float:
    """TrigFlow time t as the flow level inference.levels takes (the engine's conversion)."""
    import torch

    from cdmctl.engine.trigflow import flow_level as convert

    return float(convert(torch.tensor(t, dtype=torch.float64)))


def score_rows(module, context, t1s: list[float], seeds: list[int], per_prompt: int) -> dict:
    from cdmctl.proving import evaluate

    backbone, gt, cond, null = context
    return {f"{t1:g}": {str(seed): evaluate.evaluate(backbone, module, gt, cond, null, [2], 16, per_prompt=per_prompt,
                                                     seed=seed, sampler="consistency", time_shift=False,
                                                     levels=[1.0, flow_level(t1)])[2]
                        for seed in seeds} for t1 in t1s}  # fmt: skip


def markdown(report: dict) -> str:
    seeds = report["eval_seeds"]
    lines = ["# TBCM: the 2-step sampling level", "", f"Command: `{report['command']}`", "",
             f"2-step precision / coverage / MMD^2, {report['per_prompt']} samples per prompt, eval seeds "
             f"{', '.join(map(str, seeds))}; levels [1, sin t1 / (sin t1 + cos t1)] unshifted; the authors' t1 = 1.0.", "",
             "| model | t1 (flow level) | " + " | ".join(f"eval seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]  # fmt: skip
    for name, rows in report["rows"].items():
        for t1, by_seed in rows.items():
            cells = [f"{m['precision']:.2f} / {m['coverage']:.2f} / {m['mmd2']:.3f}" for m in by_seed.values()]
            lines.append(f"| {name} | {t1} ({flow_level(float(t1)):.3f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="demo-tbcm run folders")
    p.add_argument("--checkpoint", type=int, default=800)
    p.add_argument("--t1", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.8, 1.0, 1.2])
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--per-prompt", type=int, default=16)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    import torch

    from cdmctl.backbones import ensure_builtin
    from cdmctl.engine.checkpoint import load_weights
    from cdmctl.proving import teacher
    from cdmctl.proving.grounds import GROUNDS

    torch.set_num_threads(1)
    backbone, gt = teacher.load(ensure_builtin("toy-sd3")), GROUNDS["toy-sd3"].truth()
    context = (backbone, gt, backbone.encode_prompts(gt.prompts), backbone.encode_prompts([""]))
    rows = {"teacher": score_rows(backbone.transformer, context, args.t1, args.eval_seeds, args.per_prompt)}
    original = {k: v.clone() for k, v in backbone.transformer.state_dict().items()}
    for run in args.runs:
        checkpoint = run / "checkpoints" / f"step-{args.checkpoint:07d}"
        backbone.transformer.load_state_dict(load_weights(checkpoint, "ema"))
        rows[f"{run.parent.name or run.name} @ {args.checkpoint}"] = score_rows(backbone.transformer, context, args.t1,
                                                                            args.eval_seeds, args.per_prompt)  # fmt: skip
        backbone.transformer.load_state_dict(original)
    report = {"command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "per_prompt": args.per_prompt, "eval_seeds": args.eval_seeds, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
