"""`cdmctl eval`: generate images for a prompt set, score them with metric plug-ins, summarise and compare.

A result folder (`--out`) holds:

    generation.json          settings the images were made with (model, steps, seed, prompts digest, ...)
    student.json             the student's own description of its sampling (schedule, shift)
    images/000012-000.png    prompt 12, sample 0
    manifest-rank00000.jsonl one line per image: image, index, sample, prompt, seed (one file per rank)
    score_config.json        the options each metric was computed with
    scores.jsonl             one line per (image, metric): per-image scores
    set_scores.json          set metrics (FID): value, image count, options
    summary.json/.md         per metric: mean, std (sample std over images), n; set metrics: value

Both phases resume: generation skips images that are on disk and in a manifest; scoring skips
(image, metric) pairs already in scores.jsonl and set metrics already computed on the same images.

Seeds: image (prompt i, sample j) uses `seed + i * num_per_prompt + j`, and the sampler draws its
noise from a generator of that seed alone, so an image never depends on batch size, GPU count or
order. Ranks split prompts by `i % world_size == rank`: disjoint, and together every prompt.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from cdmctl.errors import UserError
from cdmctl.outputs import reporting_disk_full

IMAGES = "images"
SETTINGS = "generation.json"
STUDENT = "student.json"
MANIFEST_PREFIX = "manifest-rank"
SCORES = "scores.jsonl"
SET_SCORES = "set_scores.json"
SCORE_CONFIG = "score_config.json"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
PHASES = ("generate", "score", "all")

Sampler = Callable[[list[str], list[int]], Sequence[Image.Image]]
Progress = Callable[[str, int, int], None]  # (label, done, total)


# ----------------------------------------------------------------------------- seeds and ranks


def image_seed(base_seed: int, prompt_index: int, sample: int, num_per_prompt: int) -> int:
    """The seed of image `sample` of prompt `prompt_index`: fixed by its position, nothing else."""
    return int(base_seed) + int(prompt_index) * int(num_per_prompt) + int(sample)


def rank_indices(n_prompts: int, rank: int, world_size: int) -> list[int]:
    """Prompt indices of one rank: i % world_size == rank (disjoint across ranks; their union is all)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of {world_size} processes", "launch with accelerate or torchrun")
    return list(range(rank, n_prompts, world_size))


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from the variables `accelerate launch` and `torchrun` set; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def image_name(prompt_index: int, sample: int) -> str:
    return f"{IMAGES}/{prompt_index:06d}-{sample:03d}.png"


# ----------------------------------------------------------------------------- small file helpers


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the work it records is simply redone


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as stored in score_config.json (objects such as an injected network by type name)."""
    return json.loads(json.dumps(options, sort_keys=True, default=lambda o: f"<{type(o).__name__}>"))


# ----------------------------------------------------------------------------- generation


@dataclass
class GenerateResult:
    generated: int  # images made by this call (this rank)
    skipped: int  # images of this rank already done
    total: int  # images of this rank


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """All ranks' manifest lines of images that exist on disk, one per image, by (prompt index, sample)."""
    out = Path(out)
    rows: dict[str, dict[str, Any]] = {}
    for shard in sorted(out.glob(f"{MANIFEST_PREFIX}*.jsonl")):
        for row in _read_jsonl(shard):
            if (out / row.get("image", "")).is_file():
                rows[row["image"]] = row
    return sorted(rows.values(), key=lambda r: (r["index"], r["sample"]))


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write generation.json, or check that the images already there were made with the same settings."""
    old = _read_json(out / SETTINGS, None)
    if old is None:
        _write_atomic(out / SETTINGS, json.dumps(settings, indent=2) + "\n")
    elif old != settings:
        keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise UserError(
            f"{out} holds images generated with other settings ({', '.join(keys)})",
            "use another --out folder, or delete this one to start again",
        )


@dataclass
class EmbeddingSettings:
    """Whether `eval` samples from the on-disk prompt-embedding cache, and where it lives (None: the default)."""

    enabled: bool = True
    root: str | None = None


def eval_ranks(rank: int, world_size: int) -> Any:
    """The embedding cache's view of the eval processes (accelerate's process group when there are several)."""
    from cdmctl.embedcache import Ranks

    if world_size == 1:
        return Ranks()
    import torch

    state = process_state()

    def any_true(flag: bool) -> bool:
        total = torch.tensor([float(flag)], device=state.device)
        torch.distributed.all_reduce(total)
        return bool(total.item() > 0)

    return Ranks(rank, world_size, state.wait_for_everyone, any_true)


def use_embedding_cache(student: Any, prompts: Sequence[str], settings: EmbeddingSettings, ranks: Any,
                        batch_size: int) -> str | None:  # fmt: skip
    """Make `student` (opened with or without its text encoders) sample `prompts` from the embedding cache,
    encoding it first (every rank its share) when its text encoders, text length, dtype and prompt list have none,
    and free the text encoders: a complete cache never needs them loaded. The key is training's, so a run's own
    prompts reuse the run's cache. Returns a line for the user; None when the cache is off or the student's pipeline
    is of no known family (it then encodes prompt strings, its text encoders loaded)."""
    import time

    import torch

    from cdmctl.embedcache import default_root, key_fields, open_or_build

    if not settings.enabled or student.adapter is None:
        student.load_text_encoders()
        return None
    fields = key_fields(student.adapter.family, student.text_source, student.text_revision,
                        student.max_sequence_length, student.dtype, prompts)  # fmt: skip
    encoder: list[Any] = []  # the adapter over the pipeline's text encoders, made on the first batch to encode

    def encode(batch: list[str]) -> Any:
        if not encoder:
            student.load_text_encoders()
            encoder.append(student.text_encoder())
        return encoder[0].encode_prompts(batch).to("cpu")

    start = time.perf_counter()
    cache, built = open_or_build(default_root(settings.root), fields, prompts, encode, ranks, batch_size=batch_size)
    encoder.clear()
    rows = {prompt: i for i, prompt in enumerate(prompts)}
    student.use_embeddings(lambda chunk: cache.conditioning(torch.tensor([rows[p] for p in chunk])))
    verb = f"encoded {len(prompts)} prompts in {time.perf_counter() - start:.1f} s" if built else \
        f"reused the cache of {len(prompts)} prompts"  # fmt: skip
    return f"prompt embeddings: {verb} ({cache.folder})"


def _student_sampler(model: str, out: Path, prompts: Sequence[str], *, steps: int | None, sigmas: list[float] | None,
                     height: int | None, width: int | None, batch_size: int, checkpoint: str | int, ema: bool,
                     device: str | None, dtype: str | None, embeddings: EmbeddingSettings, ranks: Any,
                     note: Callable[[str], None] | None, scheduler: str | None = None,
                     shift: float | None = None) -> Sampler:  # fmt: skip
    from cdmctl.openmodel import open_model

    student = open_model(model, checkpoint=checkpoint, ema=ema, device=device, dtype=dtype,
                         text_encoders=not embeddings.enabled)  # fmt: skip
    student.use_sampler(scheduler, shift)
    _write_atomic(out / STUDENT, json.dumps(student.describe(steps, sigmas), indent=2, default=str) + "\n")
    line = use_embedding_cache(student, prompts, embeddings, ranks, batch_size)
    if line and note is not None and ranks.rank == 0:
        note(line)

    def sample(prompts: list[str], seeds: list[int]) -> Sequence[Image.Image]:
        return student.sample(prompts, seeds, steps=steps, sigmas=sigmas, height=height, width=width, batch_size=batch_size)

    return sample


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half PNG
        raise
    os.replace(tmp, path)  # a PNG on disk is always complete


def run_generate(
    model: str,
    prompts: Sequence[str],
    out: str | Path,
    *,
    steps: int | None = None,
    sigmas: list[float] | None = None,
    seed: int = 0,
    num_per_prompt: int = 1,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    checkpoint: str | int = "latest",
    ema: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    prompt_source: str | None = None,
    sampler: Sampler | None = None,
    progress: Progress | None = None,
    embeddings: EmbeddingSettings = EmbeddingSettings(),
    note: Callable[[str], None] | None = None,
    scheduler: str | None = None,
    shift: float | None = None,
) -> GenerateResult:
    """Generate this rank's missing images into `out`; `sampler(prompts, seeds)` defaults to the student, which
    samples from the embedding cache unless `embeddings` says not to; `scheduler` and `shift` replace its sampler
    (`Student.use_sampler`)."""
    from cdmctl.prompt_sets import prompts_digest

    if num_per_prompt < 1 or batch_size < 1:
        raise UserError("--num-per-prompt and --batch-size must be at least 1", "use e.g. --batch-size 4")
    if not prompts:
        raise UserError("no prompts to generate", "check --prompts")
    out = Path(out)
    settings = {
        "model": str(model), "checkpoint": str(checkpoint), "ema": bool(ema), "steps": steps, "sigmas": sigmas,
        "seed": int(seed), "num_per_prompt": int(num_per_prompt), "height": height, "width": width,
        "prompts": prompt_source, "n_prompts": len(prompts), "prompts_sha256": prompts_digest(list(prompts)),
        # only when chosen: folders made before these options existed still resume
        **({"scheduler": scheduler} if scheduler is not None else {}), **({"shift": shift} if shift is not None else {}),
    }  # fmt: skip
    _check_settings(out, settings)
    done = {row["image"] for row in read_manifest(out)}
    mine = [(i, j) for i in rank_indices(len(prompts), rank, world_size) for j in range(num_per_prompt)]
    jobs = [(i, j) for i, j in mine if image_name(i, j) not in done]
    result = GenerateResult(generated=0, skipped=len(mine) - len(jobs), total=len(mine))
    from cdmctl.embedcache import Ranks

    # every rank builds its share of the cache, so with several a rank with nothing left to draw still takes part
    ranks = eval_ranks(rank, world_size) if sampler is None and embeddings.enabled else None
    if not (ranks.any_true(bool(jobs)) if ranks is not None else jobs):
        return result
    if sampler is None:
        sampler = _student_sampler(model, out, prompts, steps=steps, sigmas=sigmas, height=height, width=width,
                                   batch_size=batch_size, checkpoint=checkpoint, ema=ema, device=device, dtype=dtype,
                                   embeddings=embeddings, ranks=ranks or Ranks(rank, world_size), note=note,
                                   scheduler=scheduler, shift=shift)  # fmt: skip
    if not jobs:
        return result
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    with (out / f"{MANIFEST_PREFIX}{rank:05d}.jsonl").open("a", encoding="utf-8") as manifest:
        for chunk in _batches(jobs, batch_size):
            seeds = [image_seed(seed, i, j, num_per_prompt) for i, j in chunk]
            images = list(sampler([prompts[i] for i, _ in chunk], seeds))
            if len(images) != len(chunk):
                raise RuntimeError(f"sampler returned {len(images)} images for {len(chunk)} prompts")
            for (i, j), image, s in zip(chunk, images, seeds):
                _save_png(image, out / image_name(i, j))
                row = {"image": image_name(i, j), "index": i, "sample": j, "prompt": prompts[i], "seed": s}
                manifest.write(json.dumps(row, ensure_ascii=False) + "\n")
            manifest.flush()
            result.generated += len(chunk)
            if progress is not None:
                progress("generate", result.skipped + result.generated, result.total)
    return result


# ----------------------------------------------------------------------------- scoring


def parse_metric_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """['pickscore.model=ID', 'fid.size=299'] -> {'pickscore': {'model': 'ID'}, 'fid': {'size': 299}}.

    Values are read as JSON when they parse (numbers, true/false, null), else kept as strings.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        match = re.fullmatch(r"([\w.-]+?)\.(\w+)=(.*)", item.strip())
        if not match:
            raise UserError(f"cannot read --metric-option '{item}'", "write METRIC.OPTION=VALUE, e.g. pickscore.model=yuvalkirstain/PickScore_v1")
        metric, key, raw = match.groups()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(metric, {})[key] = value
    return options


def prepare_metrics(names: Sequence[str], options: dict[str, dict[str, Any]] | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """[(MetricSpec, resolved options)]: unknown metrics or options and missing extras fail here, before any work."""
    import cdmctl.metrics  # noqa: F401  (registers the plug-ins)
    from cdmctl.metrics.base import canonical_name, get_metric

    names = list(dict.fromkeys(canonical_name(n) for n in names))  # aliases (dpgbench -> dpg) count once
    if not names:
        raise UserError("no metrics given", "pass e.g. --metrics pickscore hpsv2")
    options = {canonical_name(k): v for k, v in (options or {}).items()}
    stray = sorted(set(options) - set(names))
    if stray:
        raise UserError(f"options given for metrics not requested: {', '.join(stray)}", "add them to --metrics or drop the options")
    specs = [get_metric(name) for name in names]
    for spec in specs:
        spec.check_installed()
    prepared = [(spec, spec.resolve_options(options.get(spec.name))) for spec in specs]
    for spec, opts in prepared:
        spec.check_weights(opts)  # weights an offline machine lacks: refused before generation, not after
    return prepared


class LazyImages(Sequence):
    """The images of `paths`, each opened (as RGB) only when indexed: FID over 10K images stays in memory bounds."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_open(p) for p in self.paths[index]]
        return _open(self.paths[index])


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _free(scorer: Any) -> None:
    del scorer
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _forget(out: Path, names: set[str]) -> None:
    """Drop stored results of metrics `names` (for --rescore)."""
    kept = [r for r in _read_jsonl(out / SCORES) if r.get("metric") not in names]
    _write_atomic(out / SCORES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    sets = {k: v for k, v in _read_json(out / SET_SCORES, {}).items() if k not in names}
    _write_atomic(out / SET_SCORES, json.dumps(sets, indent=2) + "\n")


def _record_config(out: Path, prepared: list[tuple[Any, dict[str, Any]]], rescore: bool) -> None:
    config = _read_json(out / SCORE_CONFIG, {})
    changed = {spec.name for spec, opts in prepared if spec.name in config and config[spec.name] != _jsonable(opts)}
    if changed and not rescore:
        name = min(changed)
        raise UserError(
            f"{out} has '{name}' scores computed with other options ({config[name]})",
            "pass --rescore to discard them and score again, or use the same options",
        )
    if rescore:
        _forget(out, {spec.name for spec, _ in prepared})
    config.update({spec.name: _jsonable(opts) for spec, opts in prepared})
    _write_atomic(out / SCORE_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _score_images(out: Path, spec: Any, opts: dict[str, Any], rows: list[dict[str, Any]], device: str,
                  batch_size: int, progress: Progress | None) -> int:  # fmt: skip
    done = {r["image"] for r in _read_jsonl(out / SCORES) if r.get("metric") == spec.name}
    pending = [r for r in rows if r["image"] not in done]
    if not pending:
        return 0
    scorer = spec.factory(device=device, **opts)
    with (out / SCORES).open("a", encoding="utf-8") as handle:
        for n, chunk in enumerate(_batches(pending, batch_size), start=1):
            values = scorer.score([_open(out / r["image"]) for r in chunk], [r["prompt"] for r in chunk])
            if len(values) != len(chunk):
                raise RuntimeError(f"metric {spec.name} returned {len(values)} scores for {len(chunk)} images")
            for row, value in zip(chunk, values):
                handle.write(json.dumps({"image": row["image"], "metric": spec.name, "score": float(value)}) + "\n")
            handle.flush()
            if progress is not None:
                progress(spec.name, min(n * batch_size, len(pending)), len(pending))
    _free(scorer)
    return len(pending)


def _score_set(out: Path, spec: Any, opts: dict[str, Any], rows: list[dict[str, Any]], device: str) -> int:
    from cdmctl.prompt_sets import prompts_digest

    sets = _read_json(out / SET_SCORES, {})
    key = {"options": _jsonable(opts), "images_sha256": prompts_digest([r["image"] for r in rows])}
    old = sets.get(spec.name)
    if old and {k: old.get(k) for k in key} == key:
        return 0
    scorer = spec.factory(device=device, **opts)
    value = scorer.score_set(LazyImages([out / r["image"] for r in rows]), [r["prompt"] for r in rows])
    _free(scorer)
    sets[spec.name] = {"value": float(value), "n": len(rows), **key}
    _write_atomic(out / SET_SCORES, json.dumps(sets, indent=2) + "\n")
    return len(rows)


def run_score(
    out: str | Path,
    metrics: Sequence[str],
    options: dict[str, dict[str, Any]] | None = None,
    *,
    device: str | None = None,
    batch_size: int = 8,
    rescore: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score the images in `out` with `metrics` (resuming), then write and return the summary."""
    prepared = prepare_metrics(metrics, options)
    out = Path(out)
    rows = read_manifest(out)
    if not rows:
        raise UserError(f"no generated images in {out}", "run `cdmctl eval --phase generate` (or --phase all) first")
    if batch_size < 1:
        raise UserError(f"--score-batch-size must be at least 1, got {batch_size}", "use e.g. 8")
    _record_config(out, prepared, rescore)
    device = device or default_device()
    for spec, opts in prepared:
        if spec.per_image:
            _score_images(out, spec, opts, rows, device, batch_size, progress)
        else:
            _score_set(out, spec, opts, rows, device)
    return summarize(out)


# ----------------------------------------------------------------------------- summary and comparison


def _per_image_scores(out: Path, images: set[str]) -> dict[str, list[float]]:
    latest: dict[tuple[str, str], float] = {}
    for row in _read_jsonl(out / SCORES):
        if row.get("image") in images:
            latest[(row["image"], row["metric"])] = float(row["score"])
    values: dict[str, list[float]] = {}
    for (_, metric), value in latest.items():
        values.setdefault(metric, []).append(value)
    return values


def _better(name: str) -> bool:
    from cdmctl.metrics.base import REGISTRY

    spec = REGISTRY.get(name)
    return True if spec is None else spec.higher_is_better


def summarize(out: str | Path) -> dict[str, Any]:
    """Aggregate `out`'s scores into summary.json and summary.md; returns the summary."""
    import cdmctl.metrics  # noqa: F401  (higher_is_better of each registered metric)

    out = Path(out)
    settings = _read_json(out / SETTINGS, {})
    rows = read_manifest(out)
    config = _read_json(out / SCORE_CONFIG, {})
    metrics: dict[str, Any] = {}
    for name, values in _per_image_scores(out, {r["image"] for r in rows}).items():
        finite = [v for v in values if math.isfinite(v)]
        metrics[name] = {
            "mean": statistics.fmean(finite) if finite else float("nan"),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite, default=float("nan")), "max": max(finite, default=float("nan")),
            "n": len(finite), "nonfinite": len(values) - len(finite),
            "per_image": True, "higher_is_better": _better(name), "options": config.get(name),
        }  # fmt: skip
    for name, record in _read_json(out / SET_SCORES, {}).items():
        metrics[name] = {"value": record["value"], "n": record["n"], "per_image": False,
                         "higher_is_better": _better(name), "options": record.get("options")}  # fmt: skip
    expected = int(settings.get("n_prompts", 0)) * int(settings.get("num_per_prompt", 1))
    summary = {
        "model": settings.get("model") or out.name, "folder": str(out), "n_images": len(rows),
        "expected_images": expected, "complete": len(rows) >= expected, "settings": settings,
        "student": _read_json(out / STUDENT, None), "metrics": dict(sorted(metrics.items())),
    }  # fmt: skip
    _write_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=2, default=str) + "\n")
    _write_atomic(out / SUMMARY_MD, summary_markdown(summary))
    return summary


def metric_value(record: dict[str, Any]) -> float:
    """The headline number of one metric record: mean for per-image metrics, value for set metrics."""
    return float(record["mean"] if record.get("per_image", True) else record["value"])


def summary_markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"# Evaluation of {summary['model']}",
        "",
        (
            f"- images: {summary['n_images']} of {summary['expected_images']}"
            f" ({s.get('n_prompts')} prompts x {s.get('num_per_prompt')}, prompts: {s.get('prompts')},"
            f" sha256 {str(s.get('prompts_sha256'))[:12]})"
        ),
        f"- steps: {s.get('steps') or 'student default'}, seed: {s.get('seed')}, size: {s.get('height')}x{s.get('width')}",
        "",
        "| metric | value | std | n | better |",
        "|---|---|---|---|---|",
    ]
    for name, m in summary["metrics"].items():
        std = f"{m['std']:.4g}" if m.get("per_image") else ""
        lines.append(f"| {name} | {metric_value(m):.4f} | {std} | {m['n']} | {'higher' if m['higher_is_better'] else 'lower'} |")
    return "\n".join(lines) + "\n"


def compare(folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per result folder: {'label', 'folder', 'n_images', 'metrics': {name: record}}."""
    rows = []
    for folder in folders:
        folder = Path(folder)
        if (folder / SUMMARY_JSON).is_file():
            summary = _read_json(folder / SUMMARY_JSON, {})
        elif read_manifest(folder):
            summary = summarize(folder)
        else:
            raise UserError(f"{folder} holds no evaluation results", "run `cdmctl eval --out FOLDER` first, or check the path")
        rows.append({"label": str(summary.get("model") or folder.name), "folder": str(folder),
                     "n_images": summary.get("n_images", 0), "metrics": summary.get("metrics", {})})  # fmt: skip
    labels = [r["label"] for r in rows]
    for row in rows:  # the same model in two folders (e.g. two step counts): tell them apart by folder
        if labels.count(row["label"]) > 1:
            row["label"] = f"{row['label']} ({Path(row['folder']).name})"
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row["metrics"]))


def _cells(rows: Sequence[dict[str, Any]], name: str) -> tuple[list[str], int | None]:
    """Formatted values of one metric column, and the index of the best row (None if fewer than 2 values)."""
    cells, values = [], []
    for i, row in enumerate(rows):
        record = row["metrics"].get(name)
        if record is None:
            cells.append("-")
            continue
        value = metric_value(record)
        std = f" ± {record['std']:.3g}" if record.get("per_image") and record.get("n", 0) > 1 else ""
        cells.append(f"{value:.4g}{std}")
        if math.isfinite(value):
            values.append((value if record.get("higher_is_better", True) else -value, i))
    return cells, (max(values)[1] if len(values) > 1 else None)


def render_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """A rich Table: one row per model, one column per metric (mean ± std; set metrics: value), best in bold."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    table.add_column("images", justify="right")
    columns = _columns(rows)
    body = [[row["label"], str(row["n_images"])] for row in rows]
    for name in columns:
        higher = next(r["metrics"][name].get("higher_is_better", True) for r in rows if name in r["metrics"])
        table.add_column(f"{name} {'↑' if higher else '↓'}", justify="right")
        cells, best = _cells(rows, name)
        for i, cell in enumerate(cells):
            body[i].append(f"[bold]{cell}[/bold]" if i == best else cell)
    for line in body:
        table.add_row(*line)
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = _columns(rows)
    lines = ["| model | images | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    body = [[row["label"], str(row["n_images"])] for row in rows]
    for name in columns:
        for i, cell in enumerate(_cells(rows, name)[0]):
            body[i].append(cell)
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body]) + "\n"


# ----------------------------------------------------------------------------- the whole command


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model).rstrip("/")).name or str(model)).strip("-.") or "model"


def default_out(models: Sequence[str]) -> Path:
    """Where results go without --out: evals/<model name> for one model, evals/ (one folder each) for several."""
    return Path("evals") / _slug(models[0]) if len(models) == 1 else Path("evals")


def model_dirs(out: str | Path, models: Sequence[str]) -> list[Path]:
    """`out` for one model; `out/<name>` per model for several (names made unique)."""
    out = Path(out)
    if len(models) == 1:
        return [out]
    names: list[str] = []
    for model in models:
        base = _slug(model)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return [out / name for name in names]


def process_state() -> Any:
    """accelerate's view of the launched processes. Without CUDA it must be asked for CPU processes, else each rank
    sees itself alone and its barriers return at once (a gloo group on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _barrier() -> None:
    process_state().wait_for_everyone()


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise UserError(f"unknown --phase '{phase}'", f"use one of {', '.join(PHASES)}")
    return phase


def run_eval(
    models: Sequence[str],
    prompts: str,
    metrics: Sequence[str],
    out: str | Path,
    *,
    phase: str = "all",
    metric_options: dict[str, dict[str, Any]] | None = None,
    limit: int | None = None,
    steps: int | None = None,
    sigmas: list[float] | None = None,
    seed: int = 0,
    num_per_prompt: int = 1,
    batch_size: int = 4,
    score_batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    checkpoint: str | int = "latest",
    ema: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    rescore: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    sampler_factory: Callable[[str], Sampler] | None = None,
    progress: Progress | None = None,
    embeddings: EmbeddingSettings = EmbeddingSettings(),
    note: Callable[[str], None] | None = None,
    scheduler: str | None = None,
    shift: float | None = None,
) -> list[dict[str, Any]]:
    """Generate and/or score every model; returns compare() rows (empty on ranks > 0 and for --phase generate).

    Metrics, their options and extras are checked first, so a missing extra costs no generation.
    With several processes every rank generates its share, then rank 0 scores.
    """
    check_phase(phase)
    if not models:
        raise UserError("no --model given", "pass --model FOLDER (repeat it to compare models)")
    if phase != "generate":
        prepare_metrics(metrics, metric_options)
    env_rank, env_world = dist_env()
    rank, world_size = env_rank if rank is None else rank, env_world if world_size is None else world_size
    folders = model_dirs(out, models)
    with reporting_disk_full(out):  # images, scores and summaries all fill a disk
        if phase != "score":
            from cdmctl.prompt_sets import load_eval_prompts

            prompt_list = load_eval_prompts(prompts, limit)
            for model, folder in zip(models, folders):
                run_generate(
                    model, prompt_list, folder, steps=steps, sigmas=sigmas, seed=seed, num_per_prompt=num_per_prompt,
                    batch_size=batch_size, height=height, width=width, rank=rank, world_size=world_size,
                    checkpoint=checkpoint, ema=ema, device=device, dtype=dtype, prompt_source=prompts,
                    sampler=sampler_factory(model) if sampler_factory else None, progress=progress,
                    embeddings=embeddings, note=note, scheduler=scheduler, shift=shift,
                )  # fmt: skip
            if world_size > 1:
                _barrier()
        if phase == "generate" or rank != 0:
            return []
        for folder in folders:
            run_score(folder, metrics, metric_options, device=device, batch_size=score_batch_size, rescore=rescore, progress=progress)
        return compare(folders)
