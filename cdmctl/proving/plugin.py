"""The proving grounds as a cdmctl plugin: `builtin:toy-sd3`, `builtin:toy-sd3-coupled`, the demo's before/after
report and the ground-truth metrics (precision, coverage, mmd2, adherence) that training's evaluation can use on the
first toy teacher."""

from __future__ import annotations

from functools import partial
from pathlib import Path


def shipped_teacher(name: str, folder: Path) -> None:
    """A trained toy teacher: its shipped pipeline folder, copied."""
    from cdmctl.proving.grounds import GROUNDS
    from cdmctl.proving.teacher import install_shipped

    install_shipped(folder, GROUNDS[name])


def shipped_digest(name: str) -> str:
    from cdmctl.proving.grounds import GROUNDS
    from cdmctl.proving.teacher import shipped_digest

    return shipped_digest(GROUNDS[name])


def builder(name: str):
    build = partial(shipped_teacher, name)
    build.digest = partial(shipped_digest, name)  # shipped weights change with a retrain: part of the cache key
    return build


def before_after_report(run) -> str | None:
    """A run on the toy teacher gets its before/after figure; other runs get nothing."""
    from cdmctl.proving.demo import is_toy_teacher, write_before_after

    if not is_toy_teacher(run.preset.model.pretrained):
        return None
    return f"before/after figure written to {write_before_after(run)}"


def ground_truth_of(preset):
    """The exact ground truth of the proving ground whose built-in teacher the preset distils; None for other models."""
    from cdmctl.proving.grounds import GROUNDS

    name = preset.model.pretrained.removeprefix("builtin:")
    return GROUNDS[name].truth() if preset.model.pretrained.startswith("builtin:") and name in GROUNDS else None


def check_ground_truth(preset, prompts: list[str]) -> None:
    """The exact metrics need a proving ground's teacher (`builtin:<ground>`: the scorer below knows its ground
    truth), its own prompts and 2 samples per prompt (MMD is pairwise)."""
    from cdmctl.errors import UserError
    from cdmctl.proving.grounds import GROUNDS

    gt = ground_truth_of(preset)
    if gt is None:
        raise UserError("eval.metrics names a ground-truth metric (precision, coverage, mmd2, adherence), which only "
                        f"the proving grounds' teachers have ({', '.join('builtin:' + g for g in GROUNDS)})",
                        "use an image metric such as clipscore or pickscore for this model")  # fmt: skip
    unknown = sorted(set(prompts) - set(gt.prompts))
    if unknown:
        raise UserError(f"eval.prompts holds '{unknown[0]}', which the toy's ground truth does not know",
                        "use eval.prompts: builtin:toy")  # fmt: skip
    if preset.eval.samples_per_prompt < 2:
        raise UserError("the ground-truth metrics need eval.samples_per_prompt >= 2", "set eval.samples_per_prompt: 8")


def score_ground_truth(preset, latents, prompts: list[str]) -> dict[str, float]:
    """The exact metrics of final latents [N, C, h, w] of `prompts` [N] against the preset's ground truth."""
    import torch

    from cdmctl.proving import metrics

    gt = ground_truth_of(preset)
    index = {p: i for i, p in enumerate(gt.prompts)}
    ref, ref_idx = metrics.reference_set(gt)
    return metrics.score(gt, latents, torch.tensor([index[p] for p in prompts]), ref, ref_idx)


def register() -> None:
    """Entry point `cdmctl.plugins: proving` (pyproject.toml)."""
    from cdmctl.backbones import register_builtin
    from cdmctl.plugins import register_run_report

    from cdmctl.proving.grounds import GROUNDS
    from cdmctl.trainingeval import LatentMetrics, register_latent_metrics

    for name in GROUNDS:
        register_builtin(name, builder(name))
    register_run_report(before_after_report)
    # the names and directions only: importing cdmctl.proving.metrics would import torch at plugin load
    directions = {"precision": True, "coverage": True, "mmd2": False, "adherence": True}
    register_latent_metrics(LatentMetrics(directions, check_ground_truth, score_ground_truth))
