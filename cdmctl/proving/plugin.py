"""The proving grounds as a cdmctl plugin: `builtin:toy-sd3`, `builtin:toy-sd3-coupled` and the demo's before/after
report."""

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


def register() -> None:
    """Entry point `cdmctl.plugins: proving` (pyproject.toml)."""
    from cdmctl.backbones import register_builtin
    from cdmctl.plugins import register_run_report

    from cdmctl.proving.grounds import GROUNDS

    for name in GROUNDS:
        register_builtin(name, builder(name))
    register_run_report(before_after_report)
