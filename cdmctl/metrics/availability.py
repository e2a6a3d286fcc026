"""Can a metric's weights be loaded? Asked before any image is generated, so that a model missing from an
offline machine costs seconds, not a whole generation phase.

A metric lists the hub sources its options name: `owner/repo` (a repo its loader reads, e.g. with
from_pretrained) or `owner/repo/path/in/repo` (one file). Local paths are the loader's to check. Offline
(HF_HUB_OFFLINE=1), a source must be in the local hub cache; online, the loader downloads what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_local(source: str) -> bool:
    return os.path.exists(os.path.expanduser(str(source)))


def hub_parts(source: str) -> tuple[str, str | None] | None:
    """(repo id, file in it or None) of an `owner/repo[/file]` source; None if it is no hub id."""
    parts = str(source).split("/")
    if len(parts) < 2 or not all(parts) or str(source).startswith((".", "~")):
        return None
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def in_cache(repo: str, filename: str | None) -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    if filename is not None:
        return isinstance(try_to_load_from_cache(repo, filename), str)
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def unavailable(sources: list[str]) -> list[str]:
    """The sources that cannot be loaded here and now (only offline ones not cached can be known cheaply)."""
    if not offline():
        return []
    missing = []
    for source in sources:
        parts = None if is_local(source) else hub_parts(source)
        if parts is not None and not in_cache(*parts):
            missing.append(str(source))
    return missing
