"""Where commands write: refuse an output path that is a file, and turn a full disk into one plain error.

A full disk shows up in three shapes: OSError(ENOSPC) from Python and PIL, safetensors' SafetensorError
("... No space left on device (os error 28)") and torch.save's RuntimeError, which says only
"unexpected pos N vs M" or "PytorchStreamWriter failed writing file" (its writer gets a short write).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cdmctl.errors import UserError

DISK_FULL_MARKERS = ("no space left on device", "os error 28", "unexpected pos", "pytorchstreamwriter failed writing")


class DiskFull(UserError):
    """The filesystem under an output ran out of space; not a usage error, so the CLI exits 1."""

    exit_code = 1


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return False
    return any(marker in str(exc).lower() for marker in DISK_FULL_MARKERS)


def nearest_existing(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (the root at worst)."""
    current = Path(path)
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def mount_point(path: Path) -> Path:
    """The mount point holding `path` (or the nearest existing folder above it)."""
    current = nearest_existing(os.path.abspath(path))
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def device_of(mount: Path) -> str:
    """What /proc/self/mounts says is mounted at `mount` (the last mount there wins), else the mount point."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return str(mount)
    found = [line.split()[0] for line in lines if len(line.split()) > 1 and line.split()[1] == str(mount)]
    return f"{found[-1]} ({mount})" if found and found[-1] != str(mount) else str(mount)


def disk_full_error(path: Path) -> DiskFull:
    return DiskFull(f"no space left on {device_of(mount_point(path))} writing {path}",
                    "free space there (or write elsewhere) and run the command again")  # fmt: skip


@contextmanager
def reporting_disk_full(path: Path, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block; on a full disk, call `cleanup` (remove the half-written output) and raise DiskFull."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError) or not is_disk_full(exc):  # UserError: already said (e.g. a nested DiskFull)
            raise
        if cleanup is not None:
            cleanup()
        raise disk_full_error(Path(path)) from exc


def check_not_file(path: str | Path | None, option: str = "--out") -> None:
    """A folder is wanted: an existing file there would fail deep inside a library, with a traceback."""
    if path is None:
        return
    current = nearest_existing(path)  # `FILE/sub` fails as surely as `FILE`
    if current.is_file():
        what = "is a file" if current == Path(path) else f"is inside the file {current}"
        raise UserError(f"{option} {path} {what}", f"give {option} a folder path (new or existing)")
