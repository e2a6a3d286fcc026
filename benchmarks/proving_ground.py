"""Proving ground benchmark: distill the trained toy SD3 teacher with every method and ablation, score vs ground truth.

    python benchmarks/proving_ground.py --jobs 2                      # full: every variant x 3 seeds (~1.5 h on 2 cores)
    python benchmarks/proving_ground.py --seeds 1 --iterations 100 --variants cdm ddmd   # a quick look
    python benchmarks/proving_ground.py --ground toy-sd3-coupled --variants cdm ddmd --seeds 2   # the second ground

Every run is `cdmctl.run.distill` on the `demo` preset (the toy teacher's hyper-parameters; TBCM variants: on
`demo-tbcm`) with the variant's overrides and its seed; its EMA student is then sampled at 1, 2, 4 and 8 steps
with its family's sampler and levels (plain Euler on the shifted uniform levels; TBCM: sCM's consistency sampler on
the authors' TrigFlow levels; `inference.time_shift` as the preset says) (paired noise: every model sees the same
starting noise) and scored by `cdmctl.proving.metrics`. The teacher is the reference at the same step counts and at
50 steps, without and with guidance, and with every training-free sampler of `FREE` (rows `teacher-<sampler>`,
diffusers' schedulers through `cdmctl.samplers`); `teacher-best` is, per step count, the free row of best
precision: the row a student must beat.

    python benchmarks/proving_ground.py --teacher-only --reuse old_runs.jsonl   # new teacher rows, runs kept
Writes `<out>/proving_ground.{json,md,png}` (the second ground, `--ground toy-sd3-coupled`:
`proving_ground_hard.{json,md,png}`, same schema; the PNG needs matplotlib: the `plot` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

STEPS = [1, 2, 4, 8]
REFERENCE_STEPS = 50
# name -> (label, preset overrides on top of `demo`)
FIXED = ["method.schedule.kind=fixed"]
# The demo recipe of release 0.2.0 (time-shifted schedule, CA at 0.1, constant learning rates), on which every
# CDM-family row below except `cdm` was measured: they keep it, so that rerunning a row reproduces it.
DEMO_0_2 = ["method.schedule.time_shift=true", "method.losses.ca=1", "optim.lr_schedule=constant",
            "method.normaliser_floor=0.1"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "cdm": ("CDM, the shipped demo (unshifted schedule, DM+CDM, cosine lr)", []),
    "cdm-floor0.1": ("CDM, the demo with the loss normaliser's floor at 0.1 (before 0.03)", ["method.normaliser_floor=0.1"]),
    "cdm-0.2": ("CDM, the 0.2.0 demo (shifted schedule, CA+DM+CDM, constant lr)", []),
    "cdm-fixed": ("CDM, fixed schedule", ["method.name=cdm-fixed", *FIXED]),
    "ddmd": ("D-DMD (CA+DM, fixed)", ["method.name=ddmd", *FIXED, "method.losses.cdm=0"]),
    # DMD2's guided DM needs a CFG scale >= 1: the teacher's own best sampling guidance (proving.json)
    "dmd2": ("DMD2 w/o GAN (guided DM g=1.5, fixed)", ["method.name=dmd2", *FIXED, "method.losses.ca=0",
                                                        "method.losses.dm=0", "method.losses.cdm=0",
                                                        "method.losses.guided_dm=1", "method.guidance=1.5"]),
    "cdm-no-cdm": ("CDM w/o CDM loss (CA+DM, dynamic)", ["method.losses.cdm=0"]),
    "cdm-no-dm": ("CDM w/o DM loss (CA+CDM)", ["method.losses.dm=0"]),
    "cdm-no-ca": ("CDM w/o CA loss (DM+CDM)", ["method.losses.ca=0"]),
    "cdm-gaussian": ("CDM, gaussian perturbation", ["method.cdm_perturbation=gaussian"]),
    "cdm-none": ("CDM, no perturbation", ["method.cdm_perturbation=none"]),
    "cdm-full-traj": ("CDM, full-trajectory target", ["method.cdm_target=full-trajectory"]),
    # the paper's schedule: every inner level through the shift (coverage 0), the pre-0.2 demo range
    "cdm-paper-schedule": ("CDM, paper schedule (coverage 0, [0.05, 0.95] uniform)",
                           ["method.schedule.coverage=0", "method.schedule.level_range=[0.05,0.95]",
                            "method.schedule.inner=uniform"]),
    # the shipped schedule's neighbours: less coverage (more levels through the shift, near 1), shorter schedules
    "cdm-coverage0.92": ("CDM, coverage 0.92", ["method.schedule.coverage=0.92"]),
    "cdm-coverage0.85": ("CDM, coverage 0.85", ["method.schedule.coverage=0.85"]),
    "cdm-length12": ("CDM, schedule length [1, 12]", ["method.schedule.length=[1,12]"]),
    "cdm-coupled": ("CDM, coupled teacher level (sc = se)", ["method.cdm_teacher_level=coupled"]),
    "cdm-ttur5": ("CDM, ttur ratio 5 (the pre-0.2 demo's)", ["method.ttur_ratio=5"]),
    # cheaper and leaner iterations (the performance issue): one simulation per TTUR cycle; a LoRA fake teacher
    # over the frozen teacher (it cannot take the student merge, so its control is CDM without the merge)
    "cdm-per-cycle": ("CDM, one simulation per TTUR cycle", ["method.simulation=per-cycle"]),
    # one fake step per student step: per student update the cheapest CDM that keeps the [1, 28] schedule; run it
    # with --iterations 400 for the shipped demo's 400 student updates
    "cdm-ttur1": ("CDM, ttur ratio 1, 400 iterations (the demo's 400 student updates)", ["method.ttur_ratio=1"]),
    "cdm-no-merge": ("CDM, no student merge into the fake (merge_decay 1)", ["method.merge_decay=1"]),
    "cdm-fake-lora": ("CDM, LoRA fake teacher (rank 8 of 64, no merge)",
                      ["model.fake_teacher=lora", "model.lora.rank=8", "model.lora.alpha=16", "method.merge_decay=1"]),
    "cdm-fake-lora32": ("CDM, LoRA fake teacher (rank 32, fake lr 1e-3, no merge)",
                        ["model.fake_teacher=lora", "model.lora.rank=32", "model.lora.alpha=64", "method.merge_decay=1",
                         "optim.fake_lr=1e-3"]),
    # the open anomaly of D-DMD on the fixed schedule: is the normaliser floor (0.1) to blame?
    "ddmd-floor": ("D-DMD, normaliser floor 0.01", ["method.name=ddmd", *FIXED, "method.losses.cdm=0",
                                                     "method.normaliser_floor=0.01"]),
    # TBCM, the second method family: its own base preset (demo-tbcm), students sampled with sCM's consistency sampler
    "tbcm": ("TBCM (demo-tbcm: sCM on teacher rollouts, guidance 1)", []),
    "tbcm-guided": ("TBCM, rollouts at guidance 1.5", ["method.tbcm.guidance=[1.5]"]),
    "tbcm-autograd": ("TBCM, torch.func.jvp instead of the finite difference", ["method.tbcm.jvp=autograd"]),
}
VARIANTS = {v: (label, over if v in ("cdm", "cdm-floor0.1") or v.startswith("tbcm") else [*DEMO_0_2, *over])
            for v, (label, over) in VARIANTS.items()}  # fmt: skip
BASE_PRESET = {v: "demo-tbcm" for v in VARIANTS if v.startswith("tbcm")}  # every other variant is on `demo`
# training-free teacher samplers (cdmctl.samplers name, time shift; None: the toy's own, 6), guidance 1
FREE: list[tuple[str, float | None]] = [("euler", None), ("euler", 1.0), ("dpmpp-2m", 1.0), ("unipc", 1.0),
                                        ("x0-renoise", 1.0)]
BEST = "teacher-best"
STEMS = {"toy-sd3": "proving_ground", "toy-sd3-coupled": "proving_ground_hard"}  # ground -> result file stem
METRIC_LABELS = {"precision": "precision (higher is better)", "coverage": "mode coverage (higher is better)",
                 "mmd2": "MMD^2 (lower is better)", "adherence": "prompt adherence (higher is better)"}


def quiet_process(log: Path | None) -> None:
    """One CPU thread per worker; the run's own progress lines go to its log file."""
    import torch

    torch.set_num_threads(1)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.close(fd)


def toy_context(per_prompt: int, ground: str = "toy-sd3"):
    """(backbone, ground truth, prompt conditioning, empty-prompt conditioning) of the ground's toy teacher."""
    from cdmctl.backbones import ensure_builtin
    from cdmctl.proving import teacher
    from cdmctl.proving.grounds import GROUNDS

    backbone = teacher.load(ensure_builtin(ground))
    gt = GROUNDS[ground].truth()
    return backbone, gt, backbone.encode_prompts(gt.prompts), backbone.encode_prompts([""])


def free_name(sampler: str, shift: float | None, own: float | None = None) -> str:
    """teacher-<sampler>, with -shift<k> unless it samples without a shift (k = 1); None is the teacher's own
    shift `own` (default: the first toy's)."""
    from cdmctl.proving.grounds import GROUNDS

    k = (own or GROUNDS["toy-sd3"].shift) if shift is None else shift
    return f"teacher-{sampler}" + ("" if k == 1 else f"-shift{k:g}")


def distill_and_score(job: dict) -> dict:
    """One (variant, seed): distill through the real run path, then score the EMA student at every step count."""
    quiet_process(Path(job["workdir"]) / "run.log")
    from cdmctl.backbones import ensure_builtin
    from cdmctl.config import load_preset
    from cdmctl.config.schema import sampling_of
    from cdmctl.engine.checkpoint import load_weights
    from cdmctl.proving import evaluate
    from cdmctl.run import distill

    overrides = [
        *VARIANTS[job["variant"]][1],
        f"model.pretrained={ensure_builtin(job['ground'])}",  # a folder, not builtin:...: no demo figure per run
        "eval.enabled=false",  # the scores below are this benchmark's; in-training evaluation needs builtin:<ground>
        f"train.seed={job['seed']}", f"train.iterations={job['iterations']}",
        "run.sample_every=0", "run.checkpoint_every=0", "run.log_every=50",
        *job["extra"],
    ]
    preset = load_preset(BASE_PRESET.get(job["variant"], "demo"), overrides)
    start = time.perf_counter()
    result = distill(preset, out=str(Path(job["workdir"]) / "run"), live=False)
    seconds = time.perf_counter() - start
    backbone, gt, cond, null = toy_context(job["per_prompt"], job["ground"])
    backbone.transformer.load_state_dict(load_weights(result.checkpoint, "ema" if preset.optim.ema else "student"))
    sampler, rule, time_shift = sampling_of(preset.model_dump(mode="json"))
    scores = evaluate.evaluate(backbone, backbone.transformer, gt, cond, null, STEPS, preset.model.resolution,
                               per_prompt=job["per_prompt"], seed=job["eval_seed"], sampler=sampler, rule=rule,
                               time_shift=time_shift, levels=preset.inference.levels)  # fmt: skip
    return {"variant": job["variant"], "seed": job["seed"], "train_seconds": round(seconds, 1),
            "metrics": {str(k): v for k, v in scores.items()}}  # fmt: skip


def score_teacher(job: dict) -> dict:
    """The teacher at every student step count and at 50 steps, with guidance `job['guidance']`."""
    quiet_process(Path(job["workdir"]) / "teacher.log")
    from cdmctl.proving import evaluate, teacher

    backbone, gt, cond, null = toy_context(job["per_prompt"], job["ground"])
    start = time.perf_counter()
    scores = evaluate.evaluate(backbone, backbone.transformer, gt, cond, null, [*STEPS, REFERENCE_STEPS],
                               teacher.RESOLUTION, job["guidance"], job["per_prompt"], job["eval_seed"])  # fmt: skip
    return {"variant": f"teacher-g{job['guidance']:g}", "guidance": job["guidance"],
            "seconds": round(time.perf_counter() - start, 1), "metrics": {str(k): v for k, v in scores.items()}}


def score_free(job: dict) -> dict:
    """The teacher with training-free sampler `job['sampler']` at shift `job['shift']`, guidance 1."""
    quiet_process(Path(job["workdir"]) / "teacher.log")
    from cdmctl.proving import evaluate, teacher

    backbone, gt, cond, null = toy_context(job["per_prompt"], job["ground"])
    start = time.perf_counter()
    scores = evaluate.evaluate(backbone, backbone.transformer, gt, cond, null, [*STEPS, REFERENCE_STEPS],
                               teacher.RESOLUTION, 1.0, job["per_prompt"], job["eval_seed"], scheduler=job["sampler"],
                               shift=job["shift"])  # fmt: skip
    name = free_name(job["sampler"], job["shift"], own_shift(job["ground"]))
    return {"variant": name, "sampler": job["sampler"], "shift": job["shift"],
            "guidance": 1.0, "seconds": round(time.perf_counter() - start, 1),
            "metrics": {str(k): v for k, v in scores.items()}}  # fmt: skip


def own_shift(ground: str) -> float:
    from cdmctl.proving.grounds import GROUNDS

    return GROUNDS[ground].shift


def run_job(job: dict) -> dict:
    return {"teacher": score_teacher, "free": score_free}.get(job["kind"], distill_and_score)(job)


def mean_std(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return [mean, std]


def summarize(runs: list[dict]) -> dict:
    """variant -> steps -> metric -> [mean, std] over seeds; plus `teacher-best` when there are free rows."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        out[variant] = {
            steps: {m: mean_std([r["metrics"][steps][m] for r in mine]) for m in mine[0]["metrics"][steps]}
            for steps in mine[0]["metrics"]
        }  # fmt: skip
    best = best_free(out)
    if best:
        out[BEST] = {steps: out[row][steps] for steps, row in best.items()}
    return out


def is_free(variant: str) -> bool:
    """A training-free teacher row (the teacher itself, any sampler or guidance), not the summary row."""
    return variant.startswith("teacher-") and variant != BEST


def best_free(summary: dict) -> dict[str, str]:
    """steps -> the training-free teacher row of best precision there (ties: lower MMD^2), when any sampler row
    beside teacher-g* exists."""
    rows = [k for k in summary if is_free(k)]
    if not any(not k.startswith("teacher-g") for k in rows):
        return {}
    steps = [n for n in summary[rows[0]] if all(n in summary[k] for k in rows)]
    return {n: max(rows, key=lambda k: (summary[k][n]["precision"][0], -summary[k][n]["mmd2"][0])) for n in steps}


def fmt(ms: list[float], metric: str) -> str:
    digits = 3 if metric == "mmd2" else 2
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(report: dict) -> str:
    s, floor, guidance = report["summary"], report["noise_floor"], report["settings"]["guidance"]
    lines = [
        f"# Proving ground ({report.get('ground', 'toy-sd3')}): distilling its trained toy SD3 teacher",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['settings']['seeds']} seeds per method unless the row says otherwise, "
        f"{report['settings']['iterations']} iterations each "
        f"(batch {report['settings']['batch_size']}), {report['settings']['per_prompt']} samples per prompt x "
        f"{report['ground_truth_prompts']} prompts per evaluation, mean ± std over seeds; the teacher is one "
        f"model (std 0). Precision radius tau = {report['tau']:.3f} RMS. Wall time {report['wall_seconds'] / 60:.1f} min "
        f"on {report['settings']['jobs']} parallel jobs ({report['machine']}).",
        "",
        *([report["note"], ""] if report.get("note") else []),
    ]
    teacher_rows = [("teacher, guidance 1", "teacher-g1"), (f"teacher, guidance {guidance:g}", f"teacher-g{guidance:g}")]
    teacher_rows += [(f"teacher, {k.removeprefix('teacher-')} (training-free)", k) for k in s
                     if is_free(k) and not k.startswith("teacher-g")]  # fmt: skip
    if BEST in s:
        which = ", ".join(f"{n}: {row.removeprefix('teacher-')}" for n, row in report["teacher_best"].items())
        teacher_rows.append((f"**best training-free teacher** ({which})", BEST))
        lines += ["Training-free teacher rows (guidance 1, no training): `teacher-<sampler>` is diffusers' scheduler "
                  f"of that name (`cdmctl.samplers`) at the toy's time shift (`-shift{own_shift(report.get('ground', 'toy-sd3')):g}`) or without a shift; "
                  "`x0-renoise` is x0 prediction plus fresh noise at the uniform TrigFlow levels (TBCM's sampler). "
                  f"`{BEST}` is, per step count, the free row of best precision: the bar a student must beat.", ""]
    for metric in ("precision", "coverage", "mmd2", "adherence"):
        lines += [f"## {METRIC_LABELS[metric]}", "",
                  f"noise floor (ground truth vs itself): {fmt(floor[metric], metric)}", "",
                  "| method | " + " | ".join(f"{n} steps" for n in STEPS) + f" | {REFERENCE_STEPS} steps |",
                  "|---|" + "---|" * (len(STEPS) + 1)]  # fmt: skip
        for label, key in teacher_rows:
            if key in s:
                cells = [fmt(s[key][str(n)][metric], metric) for n in [*STEPS, REFERENCE_STEPS]]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for key, (label, _) in VARIANTS.items():
            if key in s:
                seeds = sum(r["variant"] == key for r in report["runs"])
                label += "" if seeds == report["settings"]["seeds"] else f" ({seeds} seed{'s' * (seeds > 1)})"
                lines.append(f"| {label} | " + " | ".join(fmt(s[key][str(n)][metric], metric) for n in STEPS) + " | |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from cdmctl.distribution import install_extra

        print(f"matplotlib is not installed ({install_extra('plot')}): no PNG written", file=sys.stderr)
        return None
    s, floor = report["summary"], report["noise_floor"]
    metrics = ("precision", "coverage", "mmd2")
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 8))
    cmap = plt.get_cmap("tab10")
    xs = list(range(len(STEPS)))  # evenly spaced step counts 1, 2, 4, 8 (a log2 axis)
    for ax, metric in zip(axes, metrics):
        for i, key in enumerate(k for k in VARIANTS if k in s):
            mean = [s[key][str(n)][metric][0] for n in STEPS]
            std = [s[key][str(n)][metric][1] for n in STEPS]
            style = "-" if key in ("cdm", "cdm-fixed", "ddmd", "dmd2") else ":"
            ax.errorbar(xs, mean, yerr=std, label=VARIANTS[key][0], color=cmap(i % 10), linestyle=style,
                        marker="o", capsize=3)  # fmt: skip
        for key, color, style in (("teacher-g1", "gray", "--"), (BEST, "black", "-")):
            if key not in s:
                continue
            label = "best training-free teacher" if key == BEST else f"{key} (Euler at its own shift)"
            ax.plot(xs, [s[key][str(n)][metric][0] for n in STEPS], style, color=color, marker="s",
                    linewidth=2.5 if key == BEST else 1.5, label=label)  # fmt: skip
            ax.axhline(s[key][str(REFERENCE_STEPS)][metric][0], color=color, linestyle="-.", linewidth=1,
                       label=f"{label}, {REFERENCE_STEPS} steps")  # fmt: skip
        ax.axhspan(floor[metric][0] - floor[metric][1], floor[metric][0] + floor[metric][1], color="green",
                   alpha=0.15, label="ground-truth noise floor")  # fmt: skip
        ax.set_xticks(xs, [str(n) for n in STEPS])
        ax.set_xlabel("sampling steps")
        ax.set_title(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels: inside one it hides the curves
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle(f"Proving ground {report.get('ground', 'toy-sd3')}: {report['settings']['seeds']} seeds x {report['settings']['iterations']} iterations")
    fig.tight_layout(rect=(0, 0.3, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ground", default="toy-sd3", choices=list(STEMS), help="which proving ground (teacher, truth)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seeds-of", action="append", default=[], metavar="VARIANT=N",
                   help="a different number of seeds for one variant (repeatable)")
    p.add_argument("--iterations", type=int, default=None, help="default: the demo preset's train.iterations")
    p.add_argument("--per-prompt", type=int, default=32, help="samples per prompt in every evaluation")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra preset override for every run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--workdir", type=Path, default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--variant-first", action="store_true", help="run all seeds of a variant before the next")
    p.add_argument("--reuse", type=Path, action="append", default=[],
                   help="runs.jsonl of an earlier cut-off run: its finished jobs are kept, not redone (repeatable)")
    p.add_argument("--from-runs", type=Path, default=None, help="only write the report from a runs.jsonl file")
    p.add_argument("--wall-seconds", type=float, default=0.0, help="with --from-runs: the wall time to report")
    p.add_argument("--note", default="", help="a paragraph for the report (e.g. how its runs were made)")
    p.add_argument("--teacher-only", action="store_true",
                   help="score only the teacher rows (guidance and training-free samplers); runs come from --reuse")
    p.add_argument("--no-teacher", action="store_true", help="score only the students (e.g. recipe variants)")
    return p.parse_args(argv)


def job_variant(job: dict) -> str:
    if job["kind"] == "free":
        return free_name(job["sampler"], job["shift"], own_shift(job["ground"]))
    return f"teacher-g{job['guidance']:g}" if job["kind"] == "teacher" else job["variant"]


def reused(paths: list[Path]) -> list[dict]:
    """Finished jobs of earlier (cut-off) runs with the same settings: runs are deterministic, so not redone."""
    lines = [line for p in paths for line in p.read_text().splitlines() if line.strip()]
    return list({(r["variant"], r.get("seed")): r for r in map(json.loads, lines)}.values())


def seeds_of(args: argparse.Namespace, variant: str) -> int:
    for item in args.seeds_of:
        name, _, n = item.partition("=")
        if name == variant:
            return int(n)
    return args.seeds


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from cdmctl.backbones import ensure_builtin
    from cdmctl.config import load_preset
    from cdmctl.proving.demo import reference_guidance

    toy = ensure_builtin(args.ground)  # build the cache once, before the workers race for it
    demo = load_preset("demo", args.extra)
    iterations = args.iterations or demo.train.iterations
    guidance = reference_guidance(toy, demo.method.guidance)  # the teacher's own best sampling guidance
    started = time.perf_counter()
    if args.from_runs:  # report only, from the per-job lines of an earlier (perhaps cut-off) run
        results = [json.loads(line) for line in args.from_runs.read_text().splitlines() if line.strip()]
        return write_report(args, argv, results, iterations, demo, guidance, args.wall_seconds)
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cdmctl-pg-")))
        common = {"ground": args.ground, "per_prompt": args.per_prompt, "eval_seed": args.eval_seed}
        jobs = [{"kind": "teacher", "guidance": g, "workdir": str(work / f"teacher-g{g:g}"), **common}
                for g in dict.fromkeys([1.0, guidance])]  # fmt: skip
        jobs += [{"kind": "free", "sampler": name, "shift": shift, "workdir": str(work / f"free-{name}-{shift}"),
                  **common} for name, shift in FREE]  # fmt: skip
        runs = [{"kind": "run", "variant": v, "seed": seed, "iterations": iterations, "extra": args.extra,
                 "workdir": str(work / f"{v}-s{seed}"), **common}
                for seed in range(max(seeds_of(args, v) for v in args.variants))
                for v in args.variants if seed < seeds_of(args, v)]  # seed by seed: a cut-off run has every variant
        jobs = ([] if args.no_teacher else jobs) + ([] if args.teacher_only else runs)
        if args.variant_first:  # all seeds of the first variant first: the order of --variants is the priority
            jobs = [j for j in jobs if j["kind"] != "run"] + sorted(
                (j for j in jobs if j["kind"] == "run"), key=lambda j: (args.variants.index(j["variant"]), j["seed"]))
        results = reused(args.reuse)
        done = {(r["variant"], r.get("seed")) for r in results}
        jobs = [j for j in jobs if (job_variant(j), j.get("seed")) not in done]
        args.out.mkdir(parents=True, exist_ok=True)
        partial = args.out / f"{STEMS[args.ground]}.runs.jsonl"  # one line per finished job: a cut-off run keeps them
        partial.write_text("".join(json.dumps(r) + "\n" for r in results))
        with mp.get_context("spawn").Pool(max(1, min(args.jobs, len(jobs))), maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(run_job, jobs):
                results.append(r)
                with partial.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                took = r.get("train_seconds", r.get("seconds"))
                print(f"[{len(results) - len(done)}/{len(jobs)}] {r['variant']} seed {r.get('seed', '-')}: {took}s, "
                      f"4-step precision {r['metrics']['4']['precision']:.3f}", flush=True)  # fmt: skip
    report = write_report(args, argv, results, iterations, demo, guidance, time.perf_counter() - started)
    partial.unlink()
    return report


def write_report(args, argv, results, iterations, demo, guidance, seconds) -> dict:
    from cdmctl.proving import metrics
    from cdmctl.proving.grounds import GROUNDS

    gt, own = GROUNDS[args.ground].truth(), own_shift(args.ground)
    floor = metrics.noise_floor(gt, args.per_prompt)
    order = {f"teacher-g{g:g}": i for i, g in enumerate(dict.fromkeys([1.0, guidance]))}
    order.update({free_name(name, shift, own): len(order) + i for i, (name, shift) in enumerate(FREE)})
    order.update({v: len(order) + i for i, v in enumerate(VARIANTS)})
    results.sort(key=lambda r: (order[r["variant"]], r.get("seed", 0)))
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores",
        "ground": args.ground,
        "wall_seconds": round(seconds, 1),
        "settings": {"variants": args.variants, "seeds": args.seeds, "seeds_of": args.seeds_of, "iterations": iterations,
                     "batch_size": demo.train.batch_size, "per_prompt": args.per_prompt, "eval_seed": args.eval_seed,
                     "jobs": args.jobs, "guidance": guidance, "distill_guidance": demo.method.guidance,
                     "free_samplers": [{"row": free_name(n, k, own), "sampler": n, "shift": k} for n, k in FREE],
                     "extra_overrides": args.extra,
                     "overrides": {v: VARIANTS[v][1] for v in args.variants}},  # fmt: skip
        "note": args.note,
        "ground_truth_prompts": gt.num_prompts,
        "tau": metrics.default_tau(gt),
        "noise_floor": {k: list(v) for k, v in floor.items()},
        "summary": summarize(results),
        "teacher_best": best_free(summarize(results)),  # steps -> the free row `teacher-best` copies there
        "runs": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = STEMS[args.ground]
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    print(f"results written to {args.out}/{stem}.{{md,json,png}} in {report['wall_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
