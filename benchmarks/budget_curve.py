"""Budget curves: quality against iterations and against compute, on each proving ground, beside the teacher's
training-free best.

    python benchmarks/budget_curve.py --ground toy-sd3 --variants cdm ddmd --seeds 2 --budgets 400 800 1600 3200
    python benchmarks/budget_curve.py --ground toy-sd3-coupled --variants cdm --seeds 2

Each (variant, seed) is one `cdmctl.run.distill` run to the longest budget on the `demo` preset (TBCM: `demo-tbcm`)
with the ground's teacher, checkpointing at every budget; each checkpoint's EMA student is sampled at 1/2/4/8
steps at the levels its preset samples at (and, for comparison, at the other choice of time shift) and scored
against the exact ground truth. Cumulative forward-equivalents (forward 1, backward 2 per sample, every network)
come from the run's own cost counters. One line per finished run goes to `<out>/<stem>.runs.jsonl`: a cut-off
invocation rerun with the same arguments skips the runs already there (in a fresh checkout, without that file, the
runs of the committed `<stem>.json`). Writes `<stem>.json` (`summary[variant]
[iterations][steps][metric] = [mean, std]` over seeds, plus `teacher` rows), `<stem>.md` and `<stem>.png`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proving_ground import DEMO_0_2, FREE, free_name, mean_std, quiet_process  # noqa: E402

STEPS = [1, 2, 4, 8]
# Every variant's overrides on top of today's `demo` (schedule without the time shift, no CA, cosine learning rates)
# reproduce exactly what its results were measured with; DEMO_0_2 (proving_ground.py) is release 0.2.0's demo recipe.
FIXED_DDMD = ["method.name=ddmd", "method.schedule.kind=fixed", "method.losses.cdm=0"]
# name -> (label, base preset, overrides on top of it)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "cdm": ("CDM, the shipped demo (unshifted schedule, DM+CDM, cosine lr)", "demo", []),
    "cdm-ca-dm": ("the demo without the CDM loss (DM only, dynamic)", "demo", ["method.losses.cdm=0"]),
    # the demo before its normaliser floor went from 0.1 to 0.03 (the CDM share at 3,200 was measured on it)
    "cdm-floor0.1": ("CDM, the demo with the normaliser floor at 0.1 (before 0.03)", "demo", ["method.normaliser_floor=0.1"]),
    "cdm-floor0.1-dm": ("the floor-0.1 demo without the CDM loss (DM only)", "demo",
                        ["method.normaliser_floor=0.1", "method.losses.cdm=0"]),
    "ddmd": ("D-DMD (CA+DM, fixed 4-step), the 0.2.0 demo's settings", "demo", [*DEMO_0_2, *FIXED_DDMD]),
    "tbcm": ("TBCM (demo-tbcm)", "demo-tbcm", []),
    "cdm-0.2": ("CDM, the 0.2.0 demo (shifted schedule, CA+DM+CDM, constant lr)", "demo", DEMO_0_2),
    # one lever at a time from the 0.2.0 demo (the schedule without the time shift: sampled unshifted too)
    "cdm-unshifted": ("0.2.0 demo, schedule without the time shift", "demo", DEMO_0_2[1:]),
    "cdm-no-ca": ("0.2.0 demo without the CA loss", "demo", [DEMO_0_2[0], *DEMO_0_2[2:]]),
    "cdm-unshifted-no-ca": ("0.2.0 demo, unshifted schedule, no CA (constant lr)", "demo", DEMO_0_2[2:]),
    # a 1-step student: D-DMD at the single level 1.0 (the reference run), without CA, decayed
    "ddmd-1step": ("D-DMD trained for 1 step (fixed level 1.0), no CA, cosine", "demo",
                   [*FIXED_DDMD, "method.schedule.levels=[1.0]", "inference.steps=1"]),
    "tbcm-guided": ("TBCM, rollouts at guidance 1.5", "demo-tbcm", ["method.tbcm.guidance=[1.5]"]),
    "tbcm-lr1e-5": ("TBCM at the authors' learning rate 1e-5", "demo-tbcm", ["optim.student_lr=1e-5"]),
    # demo-tbcm before its learning rate went from 5e-5 to the authors' 1e-5 (cosine, 2-step level 0.406)
    "tbcm-lr5e-5": ("TBCM, demo-tbcm at lr 5e-5 (before 1e-5)", "demo-tbcm", ["optim.student_lr=5e-5"]),
    # the drift after 400 iterations at lr 5e-5: decay the learning rate (and a larger batch: 128 points per update)
    "tbcm-cosine": ("TBCM, cosine lr decay to 10%", "demo-tbcm", ["optim.lr_schedule=cosine", "optim.student_lr=5e-5"]),
    "tbcm-b8-cosine": ("TBCM, batch 8, cosine lr decay to 10%", "demo-tbcm",
                       ["optim.lr_schedule=cosine", "train.batch_size=8", "optim.student_lr=5e-5"]),
    "tbcm-b16-cosine": ("TBCM, batch 16, cosine lr decay to 10%", "demo-tbcm",
                        ["optim.lr_schedule=cosine", "train.batch_size=16", "optim.student_lr=5e-5"]),
    # one lever at a time from today's demo, aimed at the 4-step MMD^2 gap (error inside the modes)
    "cdm-no-merge": ("demo without merging the student into the fake teacher", "demo", ["method.merge_decay=1"]),
    "cdm-batch32": ("demo at batch 32", "demo", ["train.batch_size=32"]),
    "cdm-batch64": ("demo at batch 64", "demo", ["train.batch_size=64"]),
    "cdm-ttur4": ("demo, 4 fake-teacher updates per student update", "demo", ["method.ttur_ratio=4"]),
    "cdm-lr-floor0": ("demo, cosine decay to 0", "demo", ["optim.lr_floor=0"]),
    "cdm-fake-lr1e-4": ("demo, fake-teacher lr 1e-4", "demo", ["optim.fake_lr=1e-4"]),
    "cdm-fake-lr1e-3": ("demo, fake-teacher lr 1e-3", "demo", ["optim.fake_lr=1e-3"]),
    # the student's own pace: only more iterations moved the 4-step MMD^2, so a faster student learning rate
    "cdm-lr1e-4": ("demo, student lr 1e-4", "demo", ["optim.student_lr=1e-4"]),
    "cdm-lr2e-4": ("demo, student lr 2e-4", "demo", ["optim.student_lr=2e-4"]),
    "cdm-lr2e-4-fake1e-3": ("demo, student lr 2e-4, fake-teacher lr 1e-3", "demo",
                            ["optim.student_lr=2e-4", "optim.fake_lr=1e-3"]),
    "cdm-shift": ("demo, schedule through the teacher's time shift (sampled shifted too)", "demo",
                  ["method.schedule.time_shift=true"]),
    "cdm-ca1": ("demo with CA at scale 1 (the teacher's guidance 2)", "demo", ["method.losses.ca=1", "method.guidance=1.0"]),
    # the loss normaliser max(mean|x0r - x0|, floor): at low levels (where the toy's 0.02 in-mode noise is seen) the
    # distance is below the floor 0.1, so those samples pull weakly; a lower floor makes each sample's pull scale-free
    "cdm-nfloor0.01": ("demo, loss normaliser floor 0.01", "demo", ["method.normaliser_floor=0.01"]),
    # (0.03 became the demo's own floor: this variant is `cdm` now, kept to reproduce budget_curve_levers3200)
    "cdm-nfloor0.03": ("demo, loss normaliser floor 0.03", "demo", ["method.normaliser_floor=0.03"]),
    # cheaper updates (issue 26, benchmarks/update_cost.py: 1.91x D-DMD as shipped): one fake step per student update
    # (1.29x; twice the student updates per iteration: compare at equal cost), one simulation per TTUR cycle (1.58x),
    # and that with schedules of at most 12 levels (1.26x)
    "cdm-ttur1": ("demo, ttur_ratio 1 (one fake step per student update)", "demo", ["method.ttur_ratio=1"]),
    "cdm-per-cycle": ("demo, one simulation per TTUR cycle", "demo", ["method.simulation=per-cycle"]),
    "cdm-len12-per-cycle": ("demo, schedules of 1-12 levels, one simulation per TTUR cycle", "demo",
                            ["method.schedule.length=[1,12]", "method.simulation=per-cycle"]),
    # the toy's in-mode noise is 0.02 RMS: levels clamped at >= 0.02 barely see it (every level of the iteration)
    "cdm-clamp0.005": ("demo, every level clamped to [0.005, 0.98]", "demo", ["method.level_clamp=[0.005,0.98]"]),
}  # fmt: skip


def ground_settings(ground: str) -> list[str]:
    from cdmctl.backbones import ensure_builtin

    return [f"model.pretrained={ensure_builtin(ground)}"]  # a folder: no before/after figure per run


def preset_for(job: dict):
    from cdmctl.config import load_preset

    _, base, overrides = VARIANTS[job["variant"]]
    budgets = job["budgets"]
    return load_preset(base, [
        *overrides, *ground_settings(job["ground"]),
        f"train.seed={job['seed']}", f"train.iterations={max(budgets)}",
        f"run.checkpoint_every={min(budgets)}", f"run.keep_checkpoints={max(budgets) // min(budgets) + 1}",
        "run.sample_every=0", "run.log_every=50", "eval.enabled=false", *job["extra"],
    ])  # fmt: skip


def cumulative_cost(metrics_file: Path) -> dict[int, float]:
    """iteration -> forward-equivalent samples so far (forward 1, backward 2), from the run's metrics.jsonl."""
    out = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        totals = {k: v for k, v in rec.items() if k.startswith("cost/total_")}
        if "iteration" in rec and totals:
            fwd = sum(v for k, v in totals.items() if k.endswith("_fwd"))
            bwd = sum(v for k, v in totals.items() if k.endswith("_bwd"))
            out[int(rec["iteration"])] = fwd + 2 * bwd
    return out


def sampling_choices(preset) -> dict[str, bool]:
    """label -> time_shift: the preset's own sampling levels first, then the other choice."""
    own = bool(preset.inference.time_shift)
    return {"own": own, "other": not own}


def score_student(job: dict, preset, checkpoint: Path, context) -> dict:
    from cdmctl.config.schema import sampling_of
    from cdmctl.engine.checkpoint import load_weights
    from cdmctl.proving import evaluate

    backbone, gt, cond, null = context
    backbone.transformer.load_state_dict(load_weights(checkpoint, "ema" if preset.optim.ema else "student"))
    sampler, rule, _ = sampling_of(preset.model_dump(mode="json"))  # TBCM: sCM's sampler on TrigFlow levels
    out = {}
    for label, shift in sampling_choices(preset).items():
        if sampler != "euler" and label == "other":
            continue  # TBCM students sample on the authors' unshifted TrigFlow levels: no shift to choose
        scores = evaluate.evaluate(backbone, backbone.transformer, gt, cond, null, STEPS, preset.model.resolution,
                                   per_prompt=job["per_prompt"], seed=job["eval_seed"], sampler=sampler,
                                   time_shift=shift, rule=rule, levels=preset.inference.levels)  # fmt: skip
        out[label] = {str(k): v for k, v in scores.items()}
    return out


def distill_and_score(job: dict) -> dict:
    """One (variant, seed): distill to the longest budget, then score the checkpoint at every budget."""
    quiet_process(Path(job["workdir"]) / "run.log")
    from cdmctl.engine.checkpoint import list_checkpoints
    from cdmctl.proving.grounds import GROUNDS
    from cdmctl.proving.teacher import load
    from cdmctl.run import distill

    preset = preset_for(job)
    start = time.perf_counter()
    result = distill(preset, out=str(Path(job["workdir"]) / "run"), live=False)
    seconds = time.perf_counter() - start
    cost = cumulative_cost(result.metrics)
    backbone, gt = load(Path(preset.model.pretrained)), GROUNDS[job["ground"]].truth()
    context = (backbone, gt, backbone.encode_prompts(gt.prompts), backbone.encode_prompts([""]))
    at = {int(p.name.split("-")[1]): p for p in list_checkpoints(result.folder)}
    scores = {str(b): {"cost": cost.get(b), **score_student(job, preset, at[b], context)}
              for b in job["budgets"] if b in at}  # fmt: skip
    return {"variant": job["variant"], "seed": job["seed"], "ground": job["ground"], "train_seconds": round(seconds, 1),
            "budgets": scores}  # fmt: skip


def score_teacher(job: dict) -> dict:
    """Every training-free sampler of the proving-ground benchmark (`FREE`: diffusers' schedulers through
    cdmctl.samplers) on the ground's teacher at 1/2/4/8 and 50 steps, guidance 1."""
    quiet_process(Path(job["workdir"]) / "teacher.log")
    from cdmctl.backbones import ensure_builtin
    from cdmctl.proving import evaluate
    from cdmctl.proving.grounds import GROUNDS
    from cdmctl.proving.teacher import RESOLUTION, load

    ground = GROUNDS[job["ground"]]
    backbone, gt = load(ensure_builtin(ground.name)), ground.truth()
    cond, null = backbone.encode_prompts(gt.prompts), backbone.encode_prompts([""])
    rows = {}
    for name, shift in FREE:
        scores = evaluate.evaluate(backbone, backbone.transformer, gt, cond, null, [*STEPS, 50], RESOLUTION,
                                   per_prompt=job["per_prompt"], seed=job["eval_seed"], scheduler=name,
                                   shift=shift)  # fmt: skip
        label = free_name(name, shift, ground.shift).removeprefix("teacher-")
        rows[label] = {str(k): v for k, v in scores.items()}
    return {"variant": "teacher", "seed": None, "ground": job["ground"], "rows": rows}


def run_job(job: dict) -> dict:
    return score_teacher(job) if job["kind"] == "teacher" else distill_and_score(job)


def summarize(runs: list[dict]) -> dict:
    """variant -> iterations -> steps -> metric -> [mean, std] (own sampling; `<variant>@other-shift` the other)."""
    out: dict = {}
    for r in (r for r in runs if r["variant"] != "teacher"):
        for budget, rec in r["budgets"].items():
            for label in ("own", "other"):
                key = r["variant"] + ("" if label == "own" else "@other-shift")
                for steps, metrics in rec.get(label, {}).items():
                    cell = out.setdefault(key, {}).setdefault(budget, {}).setdefault(steps, {})
                    for m, v in metrics.items():
                        cell.setdefault(m, []).append(v)
                if rec.get(label) and rec.get("cost") is not None:
                    out[key][budget].setdefault("cost", []).append(rec["cost"])
    return {v: {b: {s: ({m: mean_std(vals) for m, vals in cell.items()} if s != "cost" else mean_std(cell))
                    for s, cell in per_b.items()} for b, per_b in per_v.items()} for v, per_v in out.items()}


def free_best(teacher_rows: dict) -> dict:
    """steps -> (sampler, metrics) of the training-free teacher row with the best precision (then lowest MMD^2)."""
    best = {}
    for name, by_steps in teacher_rows.items():
        for steps, m in by_steps.items():
            if steps == "50":
                continue
            key = (m["precision"], -m["mmd2"])
            if steps not in best or key > (best[steps][1]["precision"], -best[steps][1]["mmd2"]):
                best[steps] = (name, m)
    return best


def seed_counts(runs: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        out[r["variant"]] = out.get(r["variant"], 0) + 1
    return out


def markdown(report: dict) -> str:
    s, teacher = report["summary"], report["teacher"]
    best = free_best(teacher)
    lines = [f"# Budget curves on the `{report['ground']}` proving ground", "", f"Command: `{report['command']}`", "",
             "Seeds per variant: " + ", ".join(f"{v} {n}" for v, n in seed_counts(report["runs"]).items())
             + f"; checkpoints at {report['settings']['budgets']} (a run's own budgets where it differs) "
             f"iterations, {report['settings']['per_prompt']} samples per prompt, eval seed "
             f"{report['settings']['eval_seed']}; mean ± std over seeds. `@other-shift`: the same checkpoints sampled "
             "at the other choice of time shift. Teacher rows: every training-free sampler (no training).", ""]
    lines += ["## Training-free teacher (precision / MMD^2)", "", "| sampler | " + " | ".join(f"{n} steps" for n in
              [*STEPS, 50]) + " |", "|---|" + "---|" * (len(STEPS) + 1)]  # fmt: skip
    for name, by_steps in teacher.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_steps[str(n)]['precision']:.2f} / {by_steps[str(n)]['mmd2']:.3f}"
                                                  for n in [*STEPS, 50]) + " |")  # fmt: skip
    lines += ["", "| best free | " + " | ".join(f"{best[str(n)][1]['precision']:.2f} ({best[str(n)][0]})"
                                              for n in STEPS) + " | |", ""]  # fmt: skip
    for metric, digits in (("precision", 2), ("coverage", 2), ("mmd2", 3)):
        lines += [f"## {metric}", "", "| variant | iterations | forward-equivalents | "
                  + " | ".join(f"{n} steps" for n in STEPS) + " |", "|---|---|---|" + "---|" * len(STEPS)]
        for v, per_b in s.items():
            for b, cell in sorted(per_b.items(), key=lambda kv: int(kv[0])):
                cost = f"{cell['cost'][0]:.3g}" if "cost" in cell else ""
                vals = " | ".join(f"{cell[str(n)][metric][0]:.{digits}f} ± {cell[str(n)][metric][1]:.{digits}f}"
                                  for n in STEPS)  # fmt: skip
                lines.append(f"| {v} | {b} | {cost} | {vals} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNG written", file=sys.stderr)
        return
    s, best = report["summary"], free_best(report["teacher"])
    metrics = ("precision", "coverage", "mmd2")
    fig, axes = plt.subplots(2, len(metrics), figsize=(6 * len(metrics), 9))
    cmap = plt.get_cmap("tab10")
    for row, axis in enumerate(("iterations", "forward-equivalents")):
        for ax, metric in zip(axes[row], metrics):
            for i, (v, per_b) in enumerate(s.items()):
                budgets = sorted(per_b, key=int)
                xs = [int(b) for b in budgets] if row == 0 else [per_b[b].get("cost", [float("nan")])[0] for b in budgets]
                for n, style in ((2, "--"), (4, "-")):
                    ys = [per_b[b][str(n)][metric][0] for b in budgets]
                    ax.plot(xs, ys, style, marker="o", color=cmap(i % 10), label=f"{v}, {n} steps")
            for n, style in ((2, "--"), (4, "-")):
                name, m = best[str(n)]
                ax.axhline(m[metric], color="black", linestyle=style, linewidth=1,
                           label=f"teacher free best, {n} steps ({name})")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel(axis)
            ax.set_title(metric + (" (lower is better)" if metric == "mmd2" else " (higher is better)"))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Budget curves, {report['ground']} ground ({report['settings']['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ground", default="toy-sd3", help="toy-sd3 or toy-sd3-coupled")
    p.add_argument("--variants", nargs="+", default=["cdm", "cdm-ca-dm", "ddmd", "tbcm"], choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--budgets", type=int, nargs="+", default=[400, 800, 1600, 3200])
    p.add_argument("--per-prompt", type=int, default=16)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra preset override for every run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default=None, help="result file name (default: budget_curve or budget_curve_<ground>)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs already in <stem>.runs.jsonl (variants with fewer seeds too)")
    return p.parse_args(argv)


def finished_runs(out: Path, stem: str) -> list[dict]:
    """The runs already done for `stem`: one per line of `<stem>.runs.jsonl` (gitignored, written as runs finish),
    or, in a checkout without it, the teacher rows and runs of the committed `<stem>.json` report."""
    lines = out / f"{stem}.runs.jsonl"
    if lines.exists():
        return [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
    report = out / f"{stem}.json"
    if not report.exists():
        return []
    data = json.loads(report.read_text())
    teacher = [{"variant": "teacher", "seed": None, "ground": data["ground"], "rows": data["teacher"]}]
    return (teacher if data["teacher"] else []) + data["runs"]


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from cdmctl.backbones import ensure_builtin

    ensure_builtin(args.ground)  # build the cache once, before the workers race for it
    stem = args.stem or ("budget_curve" if args.ground == "toy-sd3" else f"budget_curve_{args.ground}")
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / f"{stem}.runs.jsonl"
    results = finished_runs(args.out, stem)
    if results and not done_file.exists():  # a fresh checkout: continue from the committed report
        done_file.write_text("".join(json.dumps(r) + "\n" for r in results))
    done = {(r["variant"], r["seed"]) for r in results}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdmctl-budget-") as tmp:
        work = args.workdir or Path(tmp)
        common = {"ground": args.ground, "per_prompt": args.per_prompt, "eval_seed": args.eval_seed}
        jobs = [{"kind": "teacher", "variant": "teacher", "seed": None, "workdir": str(work / "teacher"), **common}]
        jobs += [{"kind": "run", "variant": v, "seed": seed, "budgets": sorted(args.budgets), "extra": args.extra,
                  "workdir": str(work / f"{v}-s{seed}"), **common}
                 for seed in range(args.seeds) for v in args.variants]  # fmt: skip
        jobs = [j for j in jobs if (j["variant"], j["seed"]) not in done and not args.report_only]
        with mp.get_context("spawn").Pool(max(1, min(args.jobs, len(jobs) or 1)), maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(run_job, jobs):
                results.append(r)
                with done_file.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"{r['variant']} seed {r['seed']} done", flush=True)
    teacher = next((r["rows"] for r in results if r["variant"] == "teacher"), {})
    runs = [r for r in results if r["variant"] != "teacher" and r["variant"] in args.variants and r["seed"] < args.seeds]
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores",
        "ground": args.ground,
        "settings": {"variants": args.variants, "seeds": args.seeds, "budgets": sorted(args.budgets),
                     "per_prompt": args.per_prompt, "eval_seed": args.eval_seed, "extra_overrides": args.extra,
                     "overrides": {v: VARIANTS[v][1:] for v in args.variants}},  # fmt: skip
        "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        "teacher": teacher,
        "teacher_best": {n: {"sampler": b[0], **b[1]} for n, b in free_best(teacher).items()},
        "summary": summarize(runs),
        "runs": runs,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    print(f"written {args.out}/{stem}.{{json,md,png}}")
    return report


if __name__ == "__main__":
    main()
