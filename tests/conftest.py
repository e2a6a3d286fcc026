"""Shared fixtures: one tiny random-weight SD3 pipeline folder per session, and a private model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per worker: torch's default would oversubscribe the cores


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Built-in models (`builtin:tiny-sd3`) are built into a per-session cache, never into ~/.cache."""
    old = os.environ.get("CDMCTL_CACHE")
    os.environ["CDMCTL_CACHE"] = str(tmp_path_factory.mktemp("cdmctl-cache"))
    yield
    if old is None:
        os.environ.pop("CDMCTL_CACHE", None)
    else:
        os.environ["CDMCTL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline folder of the real diffusers classes (seed 0, 32 px default). Treat as read-only."""
    from cdmctl.backbones.tiny import write_tiny_sd3

    return write_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_longcat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LongCat-Image pipeline folder of the real diffusers/transformers classes (seed 0). Read-only."""
    from cdmctl.backbones.tiny.longcat import write_tiny_longcat

    return write_tiny_longcat(tmp_path_factory.mktemp("tiny-longcat") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory: pytest.TempPathFactory):
    """family -> its tiny pipeline folder (real classes, seed 0), written once per session by the family's own
    writer (`python -m cdmctl.backbones.tiny FAMILY DIR`). Read-only."""
    from cdmctl.backbones.tiny import write_tiny

    folders: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in folders:
            folders[family] = write_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}") / "pipe")
        return folders[family]

    return get
