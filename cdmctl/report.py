"""`cdmctl report`: plots of one or more runs' training curves and evaluated scores, a summary table and sheets of
the evaluation samples across checkpoints, from what the run folders hold (metrics.jsonl, evals/, best.json)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cdmctl.errors import UserError

TRAINING_GROUPS = ("loss/", "grad_norm/", "lr/")  # the training curves plotted, one panel per key
SCORE = re.compile(r"^eval/(?P<metric>[^@]+)@(?P<steps>\d+)$")


@dataclass
class Run:
    name: str
    folder: Path
    records: list[dict[str, Any]]
    best: dict[str, Any] | None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(iterations, values) of every record that has `key`."""
        points = [(int(r["iteration"]), float(r[key])) for r in self.records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    def training_cost(self, iteration: int) -> int | None:
        """Samples through all networks (forward and backward, `cost/total_*`) up to `iteration`."""
        logged = [r for r in self.records if "cost/total_student_fwd" in r and r["iteration"] <= iteration]
        if not logged:
            return None
        return int(sum(v for k, v in logged[-1].items() if k.startswith("cost/total_")))


def load_run(folder: str | Path) -> Run:
    from cdmctl.runlog import read_metrics
    from cdmctl.trainingeval import read_best

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"run folder {folder} not found", "give folders written by `cdmctl distill`")
    records = [r for r in read_metrics(path) if "iteration" in r]
    if not records:
        raise UserError(f"{folder} has no metrics.jsonl records", "give the folder of a run that has logged")
    return Run(path.resolve().name, path, records, read_best(path))


def unique_names(runs: list[Run]) -> None:
    """Runs in folders of the same name are told apart by their parent folder."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.folder.resolve().parent.name}/{run.name}"


def write_report(folders: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write training.png, scores.png (if any run evaluated), summary.md and one sheet per evaluated run into
    `out`; returns the files written."""
    if importlib.util.find_spec("matplotlib") is None:
        from cdmctl.distribution import install_extra

        raise UserError("cdmctl report needs matplotlib, which is not installed", install_extra("plot"))
    runs = [load_run(f) for f in folders]
    unique_names(runs)
    out = Path(out)
    if out.is_file():
        raise UserError(f"--out {out} is a file", "give a folder")
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    written = [plot_training(runs, out / "training.png")]
    if score_keys(runs):
        written.append(plot_scores(runs, out / "scores.png"))
    summary = out / "summary.md"
    summary.write_text(summary_markdown(runs))
    written.append(summary)
    written += [p for run in runs if (p := sample_sheet(run, out / f"samples-{slug(run.name)}.png"))]
    return written


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def panels(count: int, width: float = 5.0, height: float = 3.4):
    import matplotlib.pyplot as plt

    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def plot_training(runs: list[Run], path: Path) -> Path:
    """One panel per training curve (losses, grad norms, learning rates), one line per run."""
    keys = [k for k in dict.fromkeys(k for run in runs for k in run.keys()) if k.startswith(TRAINING_GROUPS)]
    if not keys:
        raise UserError("the runs have no training curves in metrics.jsonl", "give folders of runs that have logged")
    fig, axes = panels(len(keys))
    for ax, key in zip(axes, keys):
        for run in runs:
            x, y = run.series(key)
            if x:
                ax.plot(x, y, label=run.name, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if key.startswith("loss/") or key.startswith("grad_norm/"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path, "training curves")


def score_keys(runs: list[Run]) -> dict[str, list[tuple[str, int]]]:
    """metric -> [(key, steps)] over every run's evaluated scores."""
    found: dict[str, list[tuple[str, int]]] = {}
    for key in dict.fromkeys(k for run in runs for k in run.keys()):
        match = SCORE.match(key)
        if match:
            found.setdefault(match["metric"], []).append((key, int(match["steps"])))
    return found


def direction(metric: str) -> str:
    from cdmctl.plugins import load_plugins
    from cdmctl.trainingeval import higher_is_better

    load_plugins()
    try:
        return "higher is better" if higher_is_better(metric) else "lower is better"
    except UserError:
        return ""


def plot_scores(runs: list[Run], path: Path) -> Path:
    """One panel per metric, one line per run and step count; the best checkpoint marked."""
    metrics = score_keys(runs)
    fig, axes = panels(len(metrics))
    for ax, (metric, keys) in zip(axes, metrics.items()):
        for run in runs:
            for key, steps in sorted(keys, key=lambda k: k[1]):
                x, y = run.series(key)
                if x:
                    ax.plot(x, y, marker="o", markersize=3, label=f"{run.name}, {steps} steps")
            best = run.best or {}
            if best.get("select", "").startswith(f"{metric}@"):
                ax.plot([best["iteration"]], [best["value"]], marker="*", markersize=12, color="black", linestyle="")
        ax.set_title(f"{metric} ({direction(metric)})" if direction(metric) else metric)
        ax.set_xlabel("iteration")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path, "evaluated scores (star: the best checkpoint)")


def save(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_rows(run: Run) -> list[dict[str, Any]]:
    """Per evaluated score: best value, its iteration, last value, training cost to reach the best."""
    rows = []
    for metric, keys in score_keys([run]).items():
        higher = direction(metric) != "lower is better"
        for key, steps in sorted(keys, key=lambda k: k[1]):
            x, y = run.series(key)
            if not x:
                continue
            i = max(range(len(y)), key=lambda k: y[k] if higher else -y[k])
            rows.append({"run": run.name, "score": f"{metric}@{steps}", "best": y[i], "iteration": x[i],
                         "last": y[-1], "cost": run.training_cost(x[i])})  # fmt: skip
    return rows


def summary_markdown(runs: list[Run]) -> str:
    lines = ["# Run report", "", "| run | score | best | at iteration | last | training cost to the best (samples) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    notes = [""]
    for run in runs:
        for row in summary_rows(run):
            cost = "-" if row["cost"] is None else f"{row['cost']:,}"
            lines.append(f"| {row['run']} | {row['score']} | {row['best']:.4g} | {row['iteration']} | "
                         f"{row['last']:.4g} | {cost} |")  # fmt: skip
        best = run.best
        kept = f"best checkpoint: iteration {best['iteration']} ({best['select']} {best['value']:.4g})" if best \
            else "no best checkpoint (eval.select not set)"  # fmt: skip
        notes.append(f"- {run.name}: {run.records[-1]['iteration']} iterations; {kept}")
    return "\n".join(lines + notes) + "\n"


def sample_sheet(run: Run, path: Path) -> Path | None:
    """The evaluation grids across checkpoints: one row per evaluation, one column per step count."""
    grids = sorted(run.folder.glob("evals/step-*/steps-*.png"))
    if not grids:
        return None
    import matplotlib.pyplot as plt
    from PIL import Image

    iterations = sorted({int(g.parent.name.split("-")[1]) for g in grids})
    steps = sorted({int(g.stem.split("-")[1]) for g in grids})
    fig, axes = plt.subplots(len(iterations), len(steps), figsize=(3 * len(steps), 3 * len(iterations)), squeeze=False)
    for r, it in enumerate(iterations):
        for c, n in enumerate(steps):
            ax, grid = axes[r][c], run.folder / "evals" / f"step-{it:07d}" / f"steps-{n}.png"
            ax.set_xticks([])
            ax.set_yticks([])
            if grid.is_file():
                with Image.open(grid) as image:
                    ax.imshow(image.convert("RGB"))
            if r == 0:
                ax.set_title(f"{n} steps")
            if c == 0:
                ax.set_ylabel(f"iteration {it}")
    return save(fig, path, f"{run.name}: evaluation samples")
