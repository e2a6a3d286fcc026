"""Atomic checkpoints with a manifest: write to a temporary folder, hash, rename; find and read them back.

Layout of `RUN/checkpoints/step-0000100/` (the number is the iteration, i.e. fake-teacher updates):
    manifest.json        counters, backbone, base model, training mode, resolved preset, files, and the sha256
                         of every other file of the folder (state/ included), checked before resume and export
    student.safetensors  the student's trainable weights (full: transformer state dict; LoRA: the adapter)
    ema.safetensors      the student EMA, same keys (when EMA is on)
    state/               accelerate.save_state output (optimizers, fake teacher, RNG) for exact resume
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator

from cdmctl.errors import UserError

if TYPE_CHECKING:  # torch and safetensors load when tensors are written or read: the run folder's checks need neither
    import torch

FORMAT = 3  # 3: + the manifest's own hash; 2: sha256 of every file, keyed by its path (1: only student/ema, by name)
BODY_HASH = "manifest_sha256"  # sha256 of the manifest without this key: counters and preset are covered too
PREFIX = "step-"


class DamagedCheckpoint(UserError):
    """A checkpoint whose manifest or files do not check out; resume falls back to an older one."""


def checkpoint_name(iteration: int) -> str:
    return f"{PREFIX}{iteration:07d}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the manifest, keyed by its relative POSIX path."""
    return {p.relative_to(folder).as_posix(): sha256_of(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}  # fmt: skip


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def staging_dir(run_dir: Path, iteration: int) -> Path:
    """Where a checkpoint is assembled before the rename; the same path on every process."""
    return Path(run_dir) / "checkpoints" / f".tmp-{checkpoint_name(iteration)}"


@contextmanager
def discarded_on_failure(staging: Path) -> Iterator[None]:
    """A write that fails (a full disk, most often) leaves no half-written staging folder taking the space."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def finalize_checkpoint(
    staging: Path, iteration: int, manifest: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
    keep: int | None = None, protect: set[str] | frozenset[str] = frozenset(),
) -> Path:
    """Write `tensors` (file stem -> state dict) and the manifest into `staging`, then rename it into place;
    then keep the `keep` newest checkpoints and those named in `protect` (the best one)."""
    final = staging.parent / checkpoint_name(iteration)
    with discarded_on_failure(staging):
        files = {}
        for stem, state in tensors.items():
            save_tensors(state, staging / f"{stem}.safetensors")
            files[stem] = f"{stem}.safetensors"
        manifest = {
            **manifest,
            "format": FORMAT,
            "iteration": iteration,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": files,
            "sha256": hash_tree(staging),
        }
        manifest[BODY_HASH] = body_hash(manifest)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():  # a re-run of the same iteration replaces it only once the new one is complete
        shutil.rmtree(final)
    staging.rename(final)
    if keep:
        prune(staging.parent, keep, protect)
    return final


def write_checkpoint(
    run_dir: Path,
    iteration: int,
    manifest: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    save_state: Callable[[Path], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Single-process convenience: stage, save the accelerate state, finalize. Returns the folder."""
    staging = staging_dir(run_dir, iteration)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if save_state is not None:
        with discarded_on_failure(staging):
            save_state(staging / "state")
    return finalize_checkpoint(staging, iteration, manifest, tensors, keep)


def prune(root: Path, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> None:
    for old in list_checkpoints(root.parent)[:-keep]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (those with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "manifest.json").is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(run_dir: Path, which: str | int = "latest") -> Path:
    """`latest`, `best` (RUN/best.json, kept by training's evaluation) or an iteration number -> the checkpoint
    folder; UserError when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"no checkpoint in {run_dir}", "train first, or point at a run folder with checkpoints/")
    if str(which) == "latest":
        return found[-1]
    if str(which) == "best":
        which = best_iteration(run_dir)
    try:
        step = int(which)
    except ValueError as exc:
        raise UserError(f"bad checkpoint '{which}'", "use 'latest', 'best' or an iteration number") from exc
    for path in found:
        if int(path.name[len(PREFIX):]) == step:
            return path
    steps = ", ".join(p.name[len(PREFIX):].lstrip("0") or "0" for p in found)
    raise UserError(f"no checkpoint at step {step} in {run_dir}", f"available steps: {steps}")


def best_iteration(run_dir: Path) -> int:
    """The iteration of the run's best checkpoint, as RUN/best.json records it."""
    path = Path(run_dir) / "best.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no best checkpoint (best.json)",
                        "train with eval.enabled and eval.select set, or use --checkpoint latest")  # fmt: skip
    return int(json.loads(path.read_text())["iteration"])


def body_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (its own hash left out), independent of key order and indentation."""
    body = {k: v for k, v in manifest.items() if k != BODY_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    """The manifest, checked for form and against its own hash (not the files': `verify_checkpoint`);
    DamagedCheckpoint if it is unreadable or was changed after it was written."""
    path = Path(checkpoint) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{path} is not readable JSON ({type(exc).__name__})", "use another checkpoint") from exc
    missing = [k for k in ("files", "sha256", "iteration") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DamagedCheckpoint(f"{path} lacks {', '.join(missing)}", "use another checkpoint")
    # an edited counter or preset would resume silently into other weights; formats before 3 carry no such hash
    if manifest.get("format", 1) >= 3 and manifest.get(BODY_HASH) != body_hash(manifest):
        raise DamagedCheckpoint(f"checkpoint {Path(checkpoint).name}: its manifest.json was changed after it was "
                                "written (it does not match its own hash)", "use another checkpoint (--checkpoint N), "
                                "or restore the file; cdmctl never edits a written manifest")  # fmt: skip
    return manifest


def step_of(checkpoint: Path) -> int:
    return int(Path(checkpoint).name[len(PREFIX):])


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Check a checkpoint completely: manifest form, iteration = folder name, every hashed file present and
    matching. Returns the manifest; raises DamagedCheckpoint naming the first problem."""
    manifest = read_manifest(checkpoint)
    if manifest["iteration"] != step_of(checkpoint):
        raise DamagedCheckpoint(f"{checkpoint}: the manifest says iteration {manifest['iteration']}, the folder "
                                f"{step_of(checkpoint)}", "use another checkpoint")
    hashes = dict(manifest["sha256"])
    if manifest.get("format", 1) < 2:  # format 1 hashed only the weight files, keyed by their name
        hashes = {manifest["files"][k]: v for k, v in hashes.items() if k in manifest["files"]}
    for rel in manifest["files"].values():
        if rel not in hashes:
            raise DamagedCheckpoint(f"{checkpoint}: {rel} has no hash in the manifest", "use another checkpoint")
    for rel, digest in hashes.items():
        path = Path(checkpoint) / rel
        if not path.is_file():
            raise DamagedCheckpoint(f"{checkpoint}: {rel} is missing", "use another checkpoint")
        if sha256_of(path) != digest:
            raise DamagedCheckpoint(f"{path} does not match its manifest hash (damaged or changed)",
                                    "use another checkpoint")  # fmt: skip
    return manifest


def intact_checkpoint(run_dir: Path, which: str | int = "latest") -> tuple[Path, list[str]]:
    """The checkpoint to use, verified: `latest` = the newest intact one, with a line per newer damaged one
    skipped; an iteration number = exactly that one (DamagedCheckpoint if it is damaged)."""
    if str(which) != "latest":
        chosen = find_checkpoint(run_dir, which)
        verify_checkpoint(chosen)
        return chosen, []
    skipped = []
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(candidate)
            return candidate, skipped
        except DamagedCheckpoint as exc:
            skipped.append(f"skipped damaged checkpoint {candidate.name}: {exc.message}")
    if skipped:
        raise DamagedCheckpoint(f"every checkpoint in {run_dir} is damaged ({skipped[0]})",
                                "start a new run with --out NEW_DIR")  # fmt: skip
    return find_checkpoint(run_dir), []  # raises the usual "no checkpoint" error


def load_weights(checkpoint: Path, which: str = "student", verify: bool = True) -> dict[str, torch.Tensor]:
    """Load one stored state dict ('student' or 'ema'), checking its hash against the manifest."""
    manifest = read_manifest(checkpoint)
    if which not in manifest["files"]:
        raise UserError(
            f"checkpoint {checkpoint} has no '{which}' weights", f"stored: {', '.join(manifest['files'])}"
        )
    rel = manifest["files"][which]
    path = Path(checkpoint) / rel
    digest = manifest["sha256"].get(rel, manifest["sha256"].get(which))  # format 2 keys by path, 1 by name
    if verify and (not path.is_file() or sha256_of(path) != digest):
        raise UserError(f"{path} does not match its manifest hash (corrupt copy?)", "use another checkpoint")
    from safetensors.torch import load_file

    return load_file(str(path))


class LazyWeights(Mapping):
    """A safetensors file as a mapping whose tensors are read one at a time when asked for (memory-mapped), so
    a rank restoring its part of a large state never holds the whole file. `rename` maps the names asked for to
    the stored ones (e.g. LoRA parameter names to peft's saved keys)."""

    def __init__(self, path: Path, rename: dict[str, str] | None = None):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        stored = set(self._file.keys())
        self._names = {k: v for k, v in rename.items() if v in stored} if rename else {k: k for k in stored}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self._names[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
