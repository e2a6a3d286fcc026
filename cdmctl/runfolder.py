"""The run folder's guards: one writer at a time (a lock), and which checkpoint a start or `--resume` continues from."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from cdmctl.engine import checkpoint as ckpt
from cdmctl.errors import UserError

LOCK = ".lock"


class RunLock:
    """An exclusive `flock` on RUN/.lock, held for the life of the process.

    The kernel releases it when the process exits, however it dies, so a lock left by a killed run is never
    stale; the file only records who holds it (pid, host), for the message a second writer gets.
    """

    def __init__(self, folder: Path):
        self.path, self.handle = Path(folder) / LOCK, None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"run folder {self.path.parent} is in use by {holder}",
                            "wait for it to finish (or stop it), or use --out NEW_DIR") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


def is_main_launch_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a plain process: the one that owns the folder."""
    return os.environ.get("RANK", "0") == "0"


def stored_preset(checkpoint: Path) -> dict[str, Any]:
    """The resolved preset a checkpoint was trained with (the manifest's, not the editable preset.yaml)."""
    return ckpt.read_manifest(checkpoint)["preset"]


def clear_unfinished(folder: Path) -> bool:
    """Remove what a run killed before its first checkpoint left (log, sample grids); True if there was any."""
    stale = [folder / "metrics.jsonl", folder / "samples"]
    found = any(p.exists() for p in stale)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def clear_half_written(folder: Path) -> list[str]:
    """Remove what a process killed mid-write left: checkpoint staging folders and the log's temporary copy.

    Called under the run lock at start-up, so no other writer can be using them; returns notes for the user.
    """
    notes = []
    for staging in sorted((folder / "checkpoints").glob(".tmp-*")):
        shutil.rmtree(staging, ignore_errors=True)
        notes.append(f"removed the half-written checkpoint {staging.name} of an interrupted run")
    for tmp in folder.glob(".metrics.jsonl.tmp-*"):
        tmp.unlink(missing_ok=True)
    return notes


def trim_metrics(folder: Path, iteration: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again); atomic, so a
    kill in the middle leaves either the old log or the new one, never a truncated one."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= iteration:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("".join(f"{line}\n" for line in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_point(folder: Path, resume: bool, checkpoint: str = "latest") -> tuple[Path | None, list[str]]:
    """(checkpoint to continue from or None for a fresh start, notes for the user).

    --resume continues from the newest intact checkpoint (or `checkpoint`), saying which damaged ones it skipped;
    a folder whose run died before its first checkpoint is started again from the beginning, with or without
    --resume; a fresh start never overwrites a folder that holds checkpoints.
    """
    cleared = clear_half_written(folder) if is_main_launch_process() else []
    existing = ckpt.list_checkpoints(folder)
    if existing and resume:
        start, notes = ckpt.intact_checkpoint(folder, checkpoint)
        return start, cleared + notes
    if existing:
        raise UserError(f"run folder {folder} already holds a run", "pass --resume to continue it, or --out NEW_DIR")
    if str(checkpoint) != "latest":
        raise UserError(f"--checkpoint {checkpoint}: {folder} has no checkpoint", "resume without --checkpoint")
    notes = cleared
    if clear_unfinished(folder):
        notes.append(f"{folder} holds a run stopped before its first checkpoint: starting it from the beginning")
    elif resume and folder.exists():
        notes.append(f"{folder} has no checkpoint yet: starting from the beginning")
    return None, notes
