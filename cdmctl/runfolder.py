"""The run folder's guards: one writer at a time (a lock), never a folder that is not a run, and which checkpoint
a start or `--resume` continues from; all of it before torch or any model loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cdmctl.engine import checkpoint as ckpt
from cdmctl.errors import UserError

if TYPE_CHECKING:
    from cdmctl.config.schema import Preset

LOCK = ".lock"
# Written when a start claims a folder: the proof that cdmctl made it a run folder. Nothing is ever deleted from a
# folder without it (or without checkpoints), and then only the names below, which a run writes.
MARKER = ".cdmctl-run"
UNFINISHED = ("metrics.jsonl", "samples/step-*.png", "samples/.step-*.png.*.tmp")
# fields a resumed run may change (the prompt cache's place and layout do not change what is trained)
# (parallel.*: check_layout refuses what the checkpoint's layout cannot be resumed with)
RESUMABLE_CHANGES = {"train.iterations", "run", "parallel", "data.embedding_cache", "data.cache_shard_mb",
                     "data.encode_batch_size"}


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
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise UserError(f"run folder {self.path.parent} is in use by {holder}",
                                "wait for it to finish (or stop it), or use --out NEW_DIR") from None  # fmt: skip
            if self._still_linked(handle):
                break
            handle.close()  # its holder removed the file as we opened it: lock the one now at the path
        self.handle = handle
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        except BaseException:  # a full disk: no lock file left behind
            self.release()
            raise
        return self

    def _still_linked(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the file, then drop the lock: a process that opened the old file sees it unlinked and retries."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()  # closing drops the flock
            self.handle = None


def run_folder(preset: "Preset", out: str | None) -> Path:
    """--out, else the preset's run.output_dir."""
    return Path(out or preset.run.output_dir.format(preset=preset.name))


def is_main_launch_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a plain process: the one that owns the folder."""
    return os.environ.get("RANK", "0") == "0"


def stored_preset(checkpoint: Path) -> dict[str, Any]:
    """The resolved preset a checkpoint was trained with (the manifest's, not the editable preset.yaml)."""
    return ckpt.read_manifest(checkpoint)["preset"]


def is_run_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file() or bool(ckpt.list_checkpoints(folder))


def foreign_entries(folder: Path) -> list[str]:
    """What a folder holds that proves it is not (yet) a run: anything at all, unless its marker is there."""
    if not folder.is_dir() or is_run_folder(folder):
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK)


def clear_unfinished(folder: Path) -> bool:
    """Remove what a run killed before its first checkpoint left (log, sample grids): only in a folder its marker
    proves is a run, and only the names a run writes there. True if there was any."""
    if not (folder / MARKER).is_file():
        return False
    stale = [p for pattern in UNFINISHED for p in folder.glob(pattern) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if (folder / "samples").is_dir() and not any((folder / "samples").iterdir()):
        (folder / "samples").rmdir()
    return bool(stale)


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
    main = is_main_launch_process()  # the others only read: the main process owns the folder
    cleared = clear_half_written(folder) if main else []
    existing = ckpt.list_checkpoints(folder)
    if existing and resume:
        start, notes = ckpt.intact_checkpoint(folder, checkpoint)
        return start, cleared + notes
    if existing:
        raise UserError(f"run folder {folder} already holds a run", "pass --resume to continue it, or --out NEW_DIR")
    if str(checkpoint) != "latest":
        raise UserError(f"--checkpoint {checkpoint}: {folder} has no checkpoint", "resume without --checkpoint")
    foreign = foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"run folder {folder} is not empty and holds no cdmctl run ({shown})",
                        "pass --out NEW_DIR (a new or empty folder); cdmctl never deletes what it did not write")  # fmt: skip
    notes = cleared
    if main and clear_unfinished(folder):
        notes.append(f"{folder} holds a run stopped before its first checkpoint: starting it from the beginning")
    elif resume and folder.exists():
        notes.append(f"{folder} has no checkpoint yet: starting from the beginning")
    return None, notes


def preset_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved presets."""
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += preset_differences(a, b, f"{dotted}.")
        elif a != b:
            diffs.append(dotted)
    return diffs


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored preset with the fields added since it was written at their defaults (which keep the old behaviour),
    so that an upgrade does not refuse a resume; as stored if this version no longer reads it."""
    from pydantic import ValidationError

    from cdmctl.config.schema import Preset

    try:
        return Preset.model_validate(stored).model_dump(mode="json")
    except ValidationError:
        return stored


def check_resumable(checkpoint: Path, preset: "Preset") -> None:
    stored = with_defaults(stored_preset(checkpoint))  # what the weights were trained with, not preset.yaml
    current = preset.model_dump(mode="json")
    changed = [
        d for d in preset_differences(stored, current) if not any(d.startswith(p) for p in RESUMABLE_CHANGES)
    ]
    if changed:
        raise UserError(
            f"cannot resume {checkpoint.parent.parent}: the preset differs in {', '.join(changed)}",
            "resume with the run's own preset (only train.iterations, run.*, parallel.* and the embedding cache's "
            "place and layout may change), or start a new run",
        )


def check_prompts_unchanged(checkpoint: Path, preset: "Preset") -> None:
    """The same path is not the same prompts: refuse a resume over a prompt file edited since the checkpoint.
    Checkpoints from before the hash was recorded (and builtin lists) resume unchecked."""
    from cdmctl.prompts import prompt_file_sha256

    stored = ckpt.read_manifest(checkpoint).get("prompts_sha256")
    if stored is None:
        return
    if prompt_file_sha256(preset.data.prompts) != stored:
        raise UserError(
            f"cannot resume {checkpoint.parent.parent}: the prompt file {preset.data.prompts} changed since "
            f"checkpoint {checkpoint.name} (sha256 {stored[:12]}...)",
            "restore the file as it was, or start a new run with --out NEW_DIR",
        )


def check_layout(checkpoint: Path, strategy: str) -> None:
    """A sharded (FSDP2) state resumes only under FSDP2 (on any number of processes: it is re-sharded), a whole one
    (one process or DDP, on any number) only without it."""
    from cdmctl.parallel import FSDP2, SINGLE

    stored = (ckpt.read_manifest(checkpoint).get("parallel") or {}).get("strategy", SINGLE)
    then, now = stored == FSDP2, strategy == FSDP2
    if then and not now:
        raise UserError(f"cannot resume {checkpoint.parent.parent}: checkpoint {checkpoint.name} is sharded (FSDP2) "
                        f"and this launch is {strategy}", "resume with parallel.strategy fsdp2 on 2 or more processes (any "
                        "number: it is re-sharded); export works from it on one process")  # fmt: skip
    if now and not then:
        raise UserError(f"cannot resume {checkpoint.parent.parent}: checkpoint {checkpoint.name} holds whole tensors "
                        f"({stored}), which FSDP2 does not load", "resume it with parallel.strategy ddp (any number "
                        "of processes), or start a new FSDP2 run")  # fmt: skip


class Claim:
    """The main process's writes that make a folder a run (marker, preset.yaml), undone when the start fails
    before the run wrote anything else, so that a refused or failed start leaves the folder as it found it."""

    def __init__(self, folder: Path):
        self.folder, self.created, self.marked = folder, not folder.exists(), False

    def write(self, preset: "Preset") -> None:
        from cdmctl.outputs import reporting_disk_full
        from cdmctl.runlog import write_preset

        with reporting_disk_full(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / MARKER).is_file():
                self.marked = True
                (self.folder / MARKER).write_text(json.dumps({"written_by": "cdmctl distill"}) + "\n")
            write_preset(self.folder, preset.model_dump(mode="json"))

    def undo(self) -> None:
        from cdmctl.runlog import PRESET_FILE

        ours = {LOCK, MARKER, PRESET_FILE} if self.marked else {LOCK}
        if not self.folder.is_dir() or any(p.name not in ours and not p.name.startswith(f".{PRESET_FILE}.")
                                           for p in self.folder.iterdir()):  # fmt: skip
            return  # the run wrote more (or this was a run already): it is the run's now
        if self.marked:
            for name in (PRESET_FILE, MARKER):
                (self.folder / name).unlink(missing_ok=True)
            for tmp in self.folder.glob(f".{PRESET_FILE}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if self.created and not any(self.folder.iterdir()):
            self.folder.rmdir()


@dataclass
class Start:
    folder: Path
    checkpoint: Path | None  # None: a fresh start
    notes: list[str]


def check_observability(preset: "Preset") -> None:
    """Trackers (unknown or not installed) and the `eval` section refused before any model loads; after the
    folder's own refusals, which need no library (the metric registry loads plugins)."""
    from cdmctl.trackers import resolve_trackers
    from cdmctl.trainingeval import check_eval

    resolve_trackers(preset.run.trackers, preset.run.optional_trackers)
    check_eval(preset)


@contextmanager
def opened_run(preset: "Preset", folder: Path, resume: bool, checkpoint: str = "latest") -> Iterator[Start]:
    """Check the command and preset, lock and claim the run folder, find the checkpoint to continue from: every
    refusal here comes in about a second (no torch, no model). The main process alone writes and holds the lock.
    A start that fails before the run writes anything leaves no lock, preset.yaml or marker behind."""
    from cdmctl.outputs import check_not_file, reporting_disk_full
    from cdmctl.startchecks import check_inputs

    check_not_file(folder)  # the lock's mkdir would fail on it with a traceback
    strategy = check_inputs(preset)
    main = is_main_launch_process()
    claim, lock = (Claim(folder), RunLock(folder)) if main else (None, None)  # one writer per run folder
    try:
        if lock is not None:
            with reporting_disk_full(folder):
                lock.acquire()
        start, notes = start_point(folder, resume, checkpoint)
        if start is not None:
            check_resumable(start, preset)
            check_prompts_unchanged(start, preset)
            check_layout(start, strategy)
        check_observability(preset)
        if claim is not None:
            claim.write(preset)
        yield Start(folder, start, notes)
    except BaseException:
        if lock is not None:
            lock.release()
            claim.undo()
        raise
    finally:
        if lock is not None:
            lock.release()
