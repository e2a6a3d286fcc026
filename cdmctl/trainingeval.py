"""Evaluate the student while it trains (preset section `eval`): fixed prompts and seeds sampled through the student's
diffusers pipeline exactly as `cdmctl eval` samples a checkpoint, scored by the metric registry and by latent
metrics that plug in from above (the proving ground's ground truth); the selected score names the best checkpoint.

Records go to metrics.jsonl as `eval/METRIC@STEPS` at their iteration, with the evaluation's own cost
(`eval_cost/*`, apart from training's `cost/*`); grids of the first images to RUN/evals/step-N/steps-K.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from cdmctl.errors import UserError

if TYPE_CHECKING:
    import torch

    from cdmctl.config.schema import Preset

EVALS = "evals"  # RUN/evals/step-0000200/steps-4.png
BEST = "best.json"  # RUN/best.json: the selected score's best evaluation and its checkpoint
GRID_IMAGES = 16  # the grid of an evaluation shows the first sample of the first 16 prompts
PREFIX, COST = "eval/", "eval_cost/"


@dataclass(frozen=True)
class LatentMetrics:
    """Metrics computed on the final latents [N, ...] of prompts [N] (the proving ground's exact ones).

    `higher_is_better` names each metric `score(preset, latents, prompts)` returns; `check(preset, prompts)` raises
    UserError when they do not apply (another teacher, prompts the ground truth does not know), before any model
    loads."""

    higher_is_better: dict[str, bool]
    check: Callable[["Preset", list[str]], None]
    score: Callable[["Preset", "torch.Tensor", list[str]], dict[str, float]]


LATENT_METRICS: list[LatentMetrics] = []


def register_latent_metrics(metrics: LatentMetrics) -> None:
    """Plugins (cdmctl.plugins) register their latent metrics here."""
    LATENT_METRICS.append(metrics)


def latent_group(name: str) -> LatentMetrics | None:
    return next((g for g in LATENT_METRICS if name in g.higher_is_better), None)


def higher_is_better(name: str) -> bool:
    group = latent_group(name)
    if group is not None:
        return group.higher_is_better[name]
    from cdmctl.metrics import get_metric

    return get_metric(name).higher_is_better


def eval_prompts(preset: "Preset") -> list[str]:
    from cdmctl.prompt_sets import load_eval_prompts

    return load_eval_prompts(preset.eval.prompts, preset.eval.limit)


def check_eval(preset: "Preset") -> None:
    """Every bad `eval` value refused before any model loads: the prompt file or set, unknown or uninstalled
    metrics, latent metrics that do not apply to this teacher."""
    if not preset.eval.enabled:
        return
    from cdmctl.metrics import REGISTRY, get_metric
    from cdmctl.plugins import load_plugins

    load_plugins()
    prompts = eval_prompts(preset)
    for name in preset.eval.metrics:
        group = latent_group(name)
        if group is not None:
            group.check(preset, prompts)
            continue
        if name not in REGISTRY:
            latent = sorted(n for g in LATENT_METRICS for n in g.higher_is_better)
            raise UserError(f"unknown metric '{name}' in eval.metrics",
                            f"available: {', '.join(sorted(REGISTRY) + latent)}")  # fmt: skip
        get_metric(name).check_installed()


@dataclass
class Selection:
    """The selected score's best so far; its decline and the evaluations since it (for stop_after_decline)."""

    key: str  # eval/precision@4
    higher: bool
    threshold: float
    best: float | None = None
    best_iteration: int | None = None
    since_best: int = 0

    def update(self, value: float, iteration: int) -> tuple[bool, str | None]:
        """(improved, a warning when the score fell more than the threshold below its best)."""
        if self.best is None or (value > self.best if self.higher else value < self.best):
            self.best, self.best_iteration, self.since_best = value, iteration, 0
            return True, None
        self.since_best += 1
        fall = (self.best - value) if self.higher else (value - self.best)
        if fall > self.threshold:
            name = self.key[len(PREFIX):]
            return False, (f"{name} {value:.4g} has fallen {fall:.3g} below its best {self.best:.4g} "
                           f"(iteration {self.best_iteration}); export that one: --checkpoint best")  # fmt: skip
        return False, None


def selection_of(preset: "Preset") -> Selection | None:
    from cdmctl.config.schema import parse_selection

    if not preset.eval.enabled or preset.eval.select is None:
        return None
    metric, steps = parse_selection(preset.eval.select)
    return Selection(f"{PREFIX}{metric}@{steps}", higher_is_better(metric), preset.eval.decline_threshold)


def replay(selection: Selection | None, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """A resumed run's evaluation state from its (trimmed) metrics.jsonl: the selection as it was, and the
    evaluation cost totals so far."""
    totals: dict[str, float] = {}
    for record in records:
        if selection is not None and record.get(selection.key) is not None:
            selection.update(float(record[selection.key]), int(record["iteration"]))
        totals.update({k: v for k, v in record.items() if k.startswith(COST) and k.endswith("_total")})
    return totals


def write_best(folder: Path, selection: Selection, checkpoint: Path) -> Path:
    """RUN/best.json: which checkpoint holds the best selected score (export/generate/eval --checkpoint best)."""
    record = {"select": selection.key[len(PREFIX):], "value": selection.best, "iteration": selection.best_iteration,
              "checkpoint": checkpoint.relative_to(folder).as_posix()}  # fmt: skip
    path = folder / BEST
    tmp = path.with_name(f".{BEST}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_best(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / BEST
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class Evaluation:
    """One evaluation's outcome on every rank: its record, the grids per step count, the first images."""

    record: dict[str, Any]
    grids: dict[int, Path] = field(default_factory=dict)


class TrainingEvaluator:
    """Samples the (live) student through its family's pipeline at each step count and scores the samples.

    Built while the run's text encoders are still loaded: the prompts are encoded once and the pipeline samples
    from those embeddings, as `cdmctl eval` samples from its embedding cache. Under DDP/FSDP2 the prompts are
    split over the ranks (prompt i on rank i % world, as `cdmctl eval`), every rank making the same number of
    pipeline calls (a sharded student's forward is collective), and gathered; the main process scores.
    """

    def __init__(self, backbone: Any, preset: "Preset", source: str, rank: int, world: int):
        from cdmctl.studentload import sample_as_trained
        from cdmctl.openmodel import student_of

        self.preset, self.rank, self.world = preset, rank, world
        self.prompts = eval_prompts(preset)
        self.cond = backbone.encode_prompts(self.prompts).to("cpu")
        pipe = backbone.pipeline()
        sample_as_trained(pipe, type(backbone), preset.model_dump(mode="json"))
        info = {"resolution": preset.model.resolution, "max_sequence_length": preset.model.text_length,
                "base_model": source}  # fmt: skip
        self.student = student_of(pipe, "training", info, source)
        rows = {p: i for i, p in enumerate(self.prompts)}
        self.student.use_embeddings(lambda chunk: self.cond.index([rows[p] for p in chunk]))
        self.latent_groups = [g for g in LATENT_METRICS if set(g.higher_is_better) & set(preset.eval.metrics)]
        self.scorers: dict[str, Any] = {}  # image metrics, loaded on the main process at the first evaluation
        self.totals: dict[str, float] = {}

    def jobs(self) -> list[tuple[int, int] | None]:
        """This rank's (prompt, sample) pairs, padded with None to the longest rank's count."""
        from cdmctl.evaluate import rank_indices

        n = self.preset.eval.samples_per_prompt
        mine = [(i, j) for i in rank_indices(len(self.prompts), self.rank, self.world) for j in range(n)]
        longest = -(-len(self.prompts) // self.world) * n
        return mine + [None] * (longest - len(mine))

    def sample(self, module: Any, steps: int) -> list[tuple[int, int, Any, Any]]:
        """(prompt, sample, PIL image, final latents) of every job of every rank, in order."""
        import torch

        from cdmctl.evaluate import image_seed

        cfg = self.preset.eval
        jobs = self.jobs()
        real = [job or (0, 0) for job in jobs]  # padding runs prompt 0 (thrown away) to keep ranks in step
        seeds = [image_seed(cfg.seed, i, j, cfg.samples_per_prompt) for i, j in real]
        finals: list[torch.Tensor] = []

        def keep_final(pipe, step, timestep, kwargs):
            if step == pipe.num_timesteps - 1:
                finals.append(kwargs["latents"].detach().float().cpu())
            return kwargs

        self.student.pipe.register_modules(transformer=module)
        size = self.preset.model.resolution
        images = self.student.sample([self.prompts[i] for i, _ in real], seeds, steps=steps, height=size, width=size,
                                     batch_size=cfg.batch_size, extra={"callback_on_step_end": keep_final})  # fmt: skip
        latents = torch.cat(finals) if finals else [None] * len(images)
        mine = [(*job, image, final) for job, image, final in zip(jobs, images, latents) if job is not None]
        return sorted(gather(mine, self.world), key=lambda row: (row[0], row[1]))

    def evaluate(self, module: Any, iteration: int, folder: Path, main: bool) -> Evaluation:
        """Every step count sampled and scored; the record is the same on every rank."""
        start = time.perf_counter()
        scores: dict[str, float] = {}
        grids: dict[int, Path] = {}
        images = forwards = 0
        for steps in self.preset.eval.steps:
            rows = self.sample(module, steps)
            images, forwards = images + len(rows), forwards + len(rows) * steps  # the student's forwards
            if main:
                scores.update({f"{PREFIX}{k}@{steps}": v for k, v in self.score(rows).items()})
                grids[steps] = self.save_grid(rows, folder / EVALS / f"step-{iteration:07d}" / f"steps-{steps}.png")
        scores = broadcast(scores, self.world)
        seconds = time.perf_counter() - start
        for key, value in (("images", images), ("seconds", seconds), ("student_fwd", forwards)):
            self.totals[f"{COST}{key}_total"] = self.totals.get(f"{COST}{key}_total", 0) + value
        record = {"iteration": iteration, **scores, f"{COST}images": images, f"{COST}seconds": seconds,
                  **self.totals}  # fmt: skip
        return Evaluation(record, grids)

    def score(self, rows: list[tuple[int, int, Any, Any]]) -> dict[str, float]:
        """Each metric of eval.metrics over one step count's samples."""
        import statistics

        import torch

        prompts = [self.prompts[i] for i, _, _, _ in rows]
        out: dict[str, float] = {}
        for group in self.latent_groups:
            values = group.score(self.preset, torch.stack([lat for _, _, _, lat in rows]), prompts)
            out.update({k: v for k, v in values.items() if k in self.preset.eval.metrics})
        images = [img for _, _, img, _ in rows]
        for name in self.preset.eval.metrics:
            if latent_group(name) is not None:
                continue
            spec, scorer = self.scorer(name)
            out[name] = statistics.fmean(scorer.score(images, prompts)) if spec.per_image else \
                float(scorer.score_set(images, prompts))  # fmt: skip
        return out

    def scorer(self, name: str) -> tuple[Any, Any]:
        if name not in self.scorers:
            from cdmctl.evaluate import default_device, prepare_metrics

            ((spec, options),) = prepare_metrics([name])
            self.scorers[name] = (spec, spec.factory(default_device(), **options))
        return self.scorers[name]

    def save_grid(self, rows: list[tuple[int, int, Any, Any]], path: Path) -> Path:
        """The first sample of the first GRID_IMAGES prompts as one PNG."""
        from cdmctl.generate import images_tensor
        from cdmctl.runlog import save_grid

        first = [img for _, j, img, _ in rows if j == 0][:GRID_IMAGES]
        return save_grid(images_tensor(first), path)


def gather(rows: list[Any], world: int) -> list[Any]:
    """Every rank's rows on every rank (rank order)."""
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def broadcast(value: Any, world: int) -> Any:
    """The main process's `value` on every rank."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
