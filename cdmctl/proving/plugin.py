"""The proving ground as a cdmctl plugin: `builtin:toy-sd3` and the demo's before/after report."""

from __future__ import annotations

from pathlib import Path


def toy_sd3(folder: Path) -> None:
    """The trained toy teacher: its shipped pipeline folder, copied."""
    from cdmctl.proving.teacher import install_shipped

    install_shipped(folder)


def _toy_sd3_digest() -> str:
    from cdmctl.proving.teacher import shipped_digest

    return shipped_digest()


toy_sd3.digest = _toy_sd3_digest  # shipped weights change with a retrain: part of the cache key


def before_after_report(run) -> str | None:
    """A run on the toy teacher gets its before/after figure; other runs get nothing."""
    from cdmctl.proving.demo import is_toy_teacher, write_before_after

    if not is_toy_teacher(run.preset.model.pretrained):
        return None
    return f"before/after figure written to {write_before_after(run)}"


def register() -> None:
    """Entry point `cdmctl.plugins: proving` (pyproject.toml)."""
    from cdmctl.backbones import register_builtin
    from cdmctl.plugins import register_run_report

    register_builtin("toy-sd3", toy_sd3)
    register_run_report(before_after_report)
