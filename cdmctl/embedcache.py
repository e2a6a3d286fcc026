"""Prompt embeddings on disk: encoded once, by all ranks in parallel, into memory-mapped safetensors shards.

A cache folder `ROOT/KEY/` holds `index.json` (the key's fields, the row count, the shard layout and the sha256 of
every file), `null.safetensors` (the empty prompt) and `shard-NNNNNN.safetensors`, each a block of consecutive
prompts' `Conditioning` tensors (batch-first, any family's names). KEY hashes the model, its text-encoder settings
and the prompts' content, so later runs with the same ones reuse it and nothing else does. Rows are read one at a
time from the memory-mapped shards, so host memory does not grow with the number of prompts (200K SD3 prompts
are ~545 GB; a shard is ~256 MiB).

Building: rank r encodes shards r, r + W, ... into `ROOT/.KEY.partial/` (each shard written batch by batch into its
file under a temporary name and renamed, with its hash beside it: a killed build keeps its finished shards), then
rank 0 writes the index and renames the folder into place. One run builds a key at a time (an flock on
`ROOT/.KEY.lock`, held by its rank 0): a second run building the same prompts waits, then uses the finished cache.
Opening verifies every file's hash, each rank its share; damaged or missing files are encoded again. A full disk
is one error naming the cache's disk, with no half-written shard left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from cdmctl.backbones.base import Conditioning
from cdmctl.errors import UserError

FORMAT = 1
INDEX = "index.json"
NULL = "null.safetensors"
OPEN_SHARDS = 16  # memory-mapped shard files kept open at once


def default_root(setting: str | None) -> Path:
    """`data.embedding_cache`, else $CDMCTL_CACHE/embeddings (default ~/.cache/cdmctl/embeddings)."""
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("CDMCTL_CACHE") or Path.home() / ".cache" / "cdmctl") / "embeddings"


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompt list's content (one per line, as loaded)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\n")
    return digest.hexdigest()


def model_identity(source: str) -> dict[str, Any]:
    """A model folder by path and the size and time of each of its files (a changed folder is another model;
    cheap: nothing is read); a hub id by itself (pin `model.revision` for a key that never moves)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"id": source}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "\n".join(f"{p.relative_to(path).as_posix()} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    return {"path": str(path.resolve()), "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def key_fields(family: str, source: str, revision: str | None, text_length: int | None, dtype: torch.dtype,
               prompts: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """What a cache's content depends on: the family, the model its text encoders come from, the text length, the
    dtype the encoders run in and the prompts. Training and `eval` key alike, so either reuses the other's cache."""
    return {"backbone": family, "model": model_identity(source), "revision": revision, "text_length": text_length,
            "dtype": str(dtype).removeprefix("torch."), "prompts_sha256": prompts_digest(prompts)}  # fmt: skip


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **fields}, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Ranks:
    """The collective operations the build needs, from whatever launched the processes."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    any_true: Callable[[bool], bool] = bool  # True on every rank if `flag` is True on any


class EmbeddingCache:
    """A complete cache folder, read row by row: `conditioning(indices)` -> Conditioning [len(indices)]."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX).read_text())
        self.rows_per_shard = int(self.index["rows_per_shard"])
        self.names = list(self.index["tensors"])
        self.null = load_conditioning(self.folder / NULL)
        self._open = lru_cache(maxsize=OPEN_SHARDS)(self._open_shard)

    def __len__(self) -> int:
        return int(self.index["count"])

    def _open_shard(self, shard: int):
        from safetensors import safe_open

        return safe_open(str(self.folder / shard_name(shard)), framework="pt")  # memory-mapped, read lazily

    def conditioning(self, indices: torch.Tensor) -> Conditioning:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for i in indices.tolist():
            shard, row = divmod(int(i), self.rows_per_shard)
            handle = self._open(shard)
            for name in self.names:
                parts[name].append(handle.get_slice(name)[row : row + 1])
        return Conditioning({name: torch.cat(rows) for name, rows in parts.items()})


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.safetensors"


def load_conditioning(path: Path) -> Conditioning:
    from safetensors.torch import load_file

    return Conditioning(load_file(str(path)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class ShardWriter:
    """A safetensors file written while its rows are encoded: the header follows from the row layout (`like`, one
    row of each tensor) and the row count, and each batch goes straight to its place in the file, so the build holds
    one text-encoder batch in memory, never a whole shard. Written under a temporary name and renamed when closed,
    with its sha256 beside it (written last: a shard with a hash beside it is complete)."""

    def __init__(self, path: Path, like: Conditioning, rows: int):
        self.path, self.rows = path, rows
        header, self.offsets, self.row_bytes, start = {}, {}, {}, 0
        for name, t in like.tensors.items():
            per_row = t[0].numel() * t.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": [rows, *t.shape[1:]],
                            "data_offsets": [start, start + rows * per_row]}  # fmt: skip
            self.offsets[name], self.row_bytes[name] = start, per_row
            start += rows * per_row
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        try:
            self.file.write(len(blob).to_bytes(8, "little") + blob)
            self.data_start = 8 + len(blob)
            self.file.truncate(self.data_start + start)
        except BaseException:
            self.discard()
            raise

    def write(self, first_row: int, cond: Conditioning) -> None:
        for name, t in cond.tensors.items():
            self.file.seek(self.data_start + self.offsets[name] + first_row * self.row_bytes[name])
            self.file.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)

    def close(self) -> str:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except BaseException:
            self.discard()
            raise
        os.replace(self.tmp, self.path)
        digest = sha256_file(self.path)
        write_text_atomic(sidecar(self.path), digest)
        return digest

    def discard(self) -> None:
        """A write that failed (a full disk, most often) leaves no half-written shard taking the space."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_rows(path: Path, like: Conditioning, rows: int, batches) -> str:
    """A shard from `batches` ((first row, Conditioning) pairs, encoded as they are asked for); returns its hash."""
    writer = ShardWriter(path, like, rows)
    try:
        for first, cond in batches:
            writer.write(first, cond)
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def write_atomic(path: Path, cond: Conditioning) -> str:
    """A small Conditioning (e.g. the empty prompt's) as one complete shard file; returns its hash."""
    return write_rows(path, cond.index(slice(0, 1)), len(cond), [(0, cond)])


def write_text_atomic(path: Path, text: str) -> None:
    """A small file that is either whole or absent: a full disk must not leave an empty hash or layout."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def row_bytes(cond: Conditioning) -> int:
    return sum(t[0].numel() * t.element_size() for t in cond.tensors.values())


def open_or_build(
    root: Path,
    fields: dict[str, Any],
    prompts: Sequence[str],
    encode: Callable[[list[str]], Conditioning],
    ranks: Ranks = Ranks(),
    shard_mb: float = 256.0,
    batch_size: int = 32,
) -> tuple[EmbeddingCache, bool]:
    """The cache for `fields` (model, text settings, prompts digest), verified; built first if missing, damaged files
    encoded again (every rank calls this; each encodes its share). Returns (cache, whether this call encoded
    anything). A full disk raises DiskFull naming the cache's disk."""
    from cdmctl.outputs import reporting_disk_full

    folder = Path(root) / cache_key(fields)
    built = False
    with reporting_disk_full(folder.parent):
        for attempt in range(2):
            if not (folder / INDEX).is_file():
                built = build_once(folder, fields, prompts, encode, ranks, shard_mb, batch_size) or built
            problem = verify(folder, ranks)
            if problem is None:
                return EmbeddingCache(folder), built
            if attempt:
                raise UserError(f"the embedding cache {folder} is still damaged after encoding it again ({problem})",
                                f"check the disk under {folder.parent}, delete {folder} and run again")  # fmt: skip
            reopen_for_repair(folder, ranks)
    raise AssertionError("unreachable")


def build_once(folder: Path, fields: dict[str, Any], prompts: Sequence[str], encode, ranks: Ranks, shard_mb: float,
               batch_size: int) -> bool:  # fmt: skip
    """Build under the key's lock; False when another run finished it while this one waited."""
    with build_lock(folder, ranks):
        if (folder / INDEX).is_file():  # the same on every rank: the lock holder's barrier came after it looked
            return False
        staging = build_shards(folder, prompts, encode, ranks, shard_mb, batch_size)
        ranks.barrier()
        if ranks.rank == 0:
            finalize(staging, folder, fields, len(prompts))
        ranks.barrier()
    return True


@contextmanager
def build_lock(folder: Path, ranks: Ranks) -> Iterator[None]:
    """Rank 0 holds an flock on ROOT/.KEY.lock while its run builds (or repairs) KEY; every rank waits for it. A
    second run building the same key at once waits for the first, then finds the cache complete."""
    import fcntl

    handle = None
    if ranks.rank == 0:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.parent / f".{folder.name}.lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another run builds this key
    try:
        ranks.barrier()
        yield
    finally:
        if handle is not None:
            handle.close()


def reopen_for_repair(folder: Path, ranks: Ranks) -> None:
    """Turn a complete cache with damaged files back into a build in progress: its intact shards count as finished
    (their hashes from the index become sidecars), so only the damaged ones are encoded again."""
    with build_lock(folder, ranks):
        if ranks.rank == 0 and (folder / INDEX).is_file():
            index = json.loads((folder / INDEX).read_text())
            for name, digest in index["sha256"].items():
                path = folder / name
                if path.is_file() and sha256_file(path) == digest:
                    write_text_atomic(sidecar(path), digest)
                else:
                    path.unlink(missing_ok=True)
            write_text_atomic(folder / "layout.json", json.dumps({"rows_per_shard": index["rows_per_shard"]}))
            staging = folder.parent / f".{folder.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            (folder / INDEX).unlink()
            folder.rename(staging)
        ranks.barrier()


def build_shards(folder: Path, prompts: Sequence[str], encode: Callable[[list[str]], Conditioning], ranks: Ranks,
                 shard_mb: float, batch_size: int) -> Path:  # fmt: skip
    """This rank's shards (and, on rank 0, the empty prompt) into the staging folder; finished ones are kept."""
    staging = folder.parent / f".{folder.name}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    null = encode([""])
    rows = shard_rows(staging, null, shard_mb)
    if ranks.rank == 0:
        write_atomic(staging / NULL, null)
    for shard in range(ranks.rank, math.ceil(len(prompts) / rows), ranks.world):
        path = staging / shard_name(shard)
        if path.is_file() and sidecar(path).is_file():
            continue  # left by an interrupted build, complete
        block = list(prompts[shard * rows : (shard + 1) * rows])
        batches = ((start, encode(block[start : start + batch_size])) for start in range(0, len(block), batch_size))
        write_rows(path, null, len(block), batches)
    return staging


def shard_rows(staging: Path, null: Conditioning, shard_mb: float) -> int:
    """Prompts per shard: from the row size (the same on every rank), or as an interrupted build chose it."""
    layout = staging / "layout.json"
    if layout.is_file():
        return int(json.loads(layout.read_text())["rows_per_shard"])
    rows = max(1, int(shard_mb * 2**20 // max(row_bytes(null), 1)))
    write_text_atomic(layout, json.dumps({"rows_per_shard": rows}))  # every rank writes the same
    return rows


def finalize(staging: Path, folder: Path, fields: dict[str, Any], count: int) -> None:
    """Rank 0: the index (hashes from the writers' sidecars), then the staging folder renamed into place."""
    if (folder / INDEX).is_file():  # another run built the same cache meanwhile: it is complete, use it
        return
    rows = json.loads((staging / "layout.json").read_text())["rows_per_shard"]
    shards = [shard_name(s) for s in range(math.ceil(count / rows))]
    files = {name: sidecar(staging / name).read_text().strip() for name in [NULL, *shards]}
    null = load_conditioning(staging / NULL)
    tensors = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
               for k, v in null.tensors.items()}  # fmt: skip
    index = {"format": FORMAT, "key": fields, "count": count, "rows_per_shard": rows, "tensors": tensors,
             "sha256": files}  # fmt: skip
    for extra in [*staging.glob("*.sha256"), staging / "layout.json", *staging.glob(".*.tmp-*")]:
        extra.unlink(missing_ok=True)
    (staging / INDEX).write_text(json.dumps(index, indent=1))
    if folder.exists():  # an incomplete folder of that name (no index): not a cache, replace it
        shutil.rmtree(folder)
    staging.rename(folder)


def verify(folder: Path, ranks: Ranks) -> str | None:
    """Every file against its hash in the index, each rank its share; what is wrong (on every rank), or None."""
    index = json.loads((folder / INDEX).read_text())
    names = sorted(index["sha256"])
    problem = None
    for name in names[ranks.rank :: ranks.world]:
        path = folder / name
        if not path.is_file():
            problem = f"{name} is missing"
        elif sha256_file(path) != index["sha256"][name]:
            problem = f"{name} does not match its hash"
        if problem:
            break
    if ranks.any_true(problem is not None):
        return problem or "found by another rank"
    return None
