"""The on-disk prompt-embedding cache: built once (each rank its share), reused, verified, resumable; and, through
the installed `cdmctl`, host memory that does not grow with the number of prompts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from cdmctl.backbones.base import Conditioning
from cdmctl.embedcache import (INDEX, EmbeddingCache, Ranks, build_shards, cache_key, finalize, open_or_build,
                               shard_name, sidecar)  # fmt: skip
from cdmctl.errors import UserError
from tests.test_run_folder import CDMCTL

FIELDS = {"backbone": "test", "model": {"id": "m"}, "prompts_sha256": "x"}


class Encoder:
    """A deterministic stand-in for a backbone's text encoders: each prompt's rows depend on its text only."""

    def __init__(self):
        self.prompts_seen = 0

    def __call__(self, prompts: list[str]) -> Conditioning:
        self.prompts_seen += len(prompts)
        codes = torch.tensor([[float(sum(map(ord, p))), float(len(p))] for p in prompts])
        return Conditioning({"hidden": codes[:, None, :].expand(-1, 3, -1).clone(), "pooled": codes * 2})


PROMPTS = [f"prompt {i}" for i in range(23)]
SHARD_MB = 5 * 32 / 2**20  # 32 bytes a row (6 + 2 floats): 5 rows a shard, so 23 prompts make 5 shards


def test_rows_come_back_as_encoded_and_a_second_open_encodes_nothing(tmp_path):
    enc = Encoder()
    cache, built = open_or_build(tmp_path, FIELDS, PROMPTS, enc, shard_mb=SHARD_MB, batch_size=2)
    assert built and len(cache) == 23 and cache.rows_per_shard == 5
    assert sorted(p.name for p in cache.folder.glob("shard-*")) == [shard_name(s) for s in range(5)]
    idx = torch.tensor([22, 0, 7, 7, 13])
    got, want = cache.conditioning(idx), Encoder()([PROMPTS[i] for i in idx.tolist()])
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    assert torch.equal(cache.null.tensors["pooled"], Encoder()([""]).tensors["pooled"])
    seen = enc.prompts_seen
    again, built = open_or_build(tmp_path, FIELDS, PROMPTS, enc, shard_mb=SHARD_MB)
    assert not built and enc.prompts_seen == seen and again.folder == cache.folder
    other, built = open_or_build(tmp_path, {**FIELDS, "prompts_sha256": "y"}, PROMPTS, enc, shard_mb=SHARD_MB)
    assert built and other.folder != cache.folder  # another key: another cache


def test_two_ranks_build_the_same_cache_as_one(tmp_path):
    one, _ = open_or_build(tmp_path / "one", FIELDS, PROMPTS, Encoder(), shard_mb=SHARD_MB)
    folder = tmp_path / "two" / cache_key(FIELDS)
    encoders = [Encoder(), Encoder()]
    for rank in (0, 1):  # the ranks' shares, one after the other (a barrier between them and finalize)
        staging = build_shards(folder, PROMPTS, encoders[rank], Ranks(rank, 2), SHARD_MB, 4)
    finalize(staging, folder, FIELDS, len(PROMPTS))
    # each rank encoded only its shards (0, 2, 4 and 1, 3) plus the empty prompt
    assert [e.prompts_seen - 1 for e in encoders] == [5 + 5 + 3, 5 + 5]
    a, b = json.loads((one.folder / INDEX).read_text()), json.loads((folder / INDEX).read_text())
    assert a["sha256"] == b["sha256"] and a["rows_per_shard"] == b["rows_per_shard"]


def test_an_interrupted_build_keeps_its_finished_shards(tmp_path):
    folder = tmp_path / cache_key(FIELDS)
    staging = build_shards(folder, PROMPTS, Encoder(), Ranks(0, 1), SHARD_MB, 4)
    (staging / shard_name(3)).unlink()  # killed before shard 3 was renamed into place
    sidecar(staging / shard_name(4)).unlink()  # and after shard 4 was written, before its hash: redone
    enc = Encoder()
    cache, built = open_or_build(tmp_path, FIELDS, PROMPTS, enc, shard_mb=SHARD_MB)
    assert built and enc.prompts_seen == 1 + 5 + 3  # the empty prompt, shards 3 and 4
    assert not staging.exists() and len(cache) == 23


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_cache_shard_is_detected_and_encoded_again_alone(tmp_path, damage):
    cache, _ = open_or_build(tmp_path, FIELDS, PROMPTS, Encoder(), shard_mb=SHARD_MB)
    shard = cache.folder / shard_name(2)
    good = shard.read_bytes()
    if damage == "flip":
        data = bytearray(good)
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    enc = Encoder()
    again, built = open_or_build(tmp_path, FIELDS, PROMPTS, enc, shard_mb=SHARD_MB)
    assert built and enc.prompts_seen == 1 + 5  # the empty prompt and shard 2's five prompts, nothing else
    assert shard.read_bytes() == good and again.folder == cache.folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.folder.name, f".{cache.folder.name}.lock"])


def test_a_cache_opened_reads_rows_without_loading_shards(tmp_path):
    built, _ = open_or_build(tmp_path, FIELDS, PROMPTS, Encoder(), shard_mb=SHARD_MB)
    cache = EmbeddingCache(built.folder)
    assert cache._open.cache_info().currsize == 0  # no shard opened until one of its rows is asked for
    cache.conditioning(torch.tensor([3, 4, 12]))
    assert cache._open.cache_info().currsize == 2  # shards 0 and 2, memory-mapped


# ---------------------------------------------------------------------------------------------- through cdmctl


def distill(model: Path, out: Path, prompts: Path, cache: Path) -> tuple[subprocess.CompletedProcess, dict]:
    values = {"model.pretrained": model, "model.resolution": 32, "model.precision": "fp32",
              "model.gradient_checkpointing": "false", "model.text_length": 64, "method.schedule.length": "[1, 2]",
              "train.iterations": 2, "train.batch_size": 2, "run.log_every": 1, "run.sample_every": 0,
              "run.checkpoint_every": 0, "data.prompts": prompts, "data.embedding_cache": cache,
              "data.cache_shard_mb": 4, "data.encode_batch_size": 256, "data.sample_prompts": "[a red cat]"}  # fmt: skip
    args = ["distill", "--preset", "sd3-4nfe", "--out", str(out), "--plain",
            *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]  # fmt: skip
    done = subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return done, last


def test_host_memory_does_not_grow_with_the_prompt_count_and_a_second_run_reuses_the_cache(tiny_sd3_dir, tmp_path):
    """300 vs 8000 prompts (141 tokens x 32 channels, fp32: 18 KB each, 144 MB for 8000): peak RSS within 10%,
    while holding the 8000 prompts' embeddings in memory would add more than that."""
    peaks, cache = {}, tmp_path / "cache"
    for n in (300, 8000):
        prompts = tmp_path / f"prompts-{n}.txt"
        prompts.write_text("".join(f"a photo of object number {i}\n" for i in range(n)))
        done, last = distill(tiny_sd3_dir, tmp_path / f"run-{n}", prompts, cache)
        assert f"prompt embeddings: encoded {n} prompts" in done.stdout + done.stderr
        peaks[n] = last["memory/host_peak_gb"]
    folder = next(p for p in cache.iterdir() if p.is_dir() and json.loads((p / INDEX).read_text())["count"] == 8000)
    on_disk = sum(p.stat().st_size for p in folder.glob("shard-*")) / 2**30
    assert len(list(folder.glob("shard-*"))) > 30  # really sharded (4 MiB each)
    assert on_disk > 0.1 * peaks[8000], "the test would not notice embeddings held in memory"
    assert abs(peaks[8000] - peaks[300]) <= 0.1 * peaks[300], peaks
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    done, _ = distill(tiny_sd3_dir, tmp_path / "again", tmp_path / "prompts-8000.txt", cache)
    assert "prompt embeddings: reused the cache of 8000 prompts" in done.stdout + done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # nothing rewritten


def test_shards_written_row_by_row_are_ordinary_safetensors_files(tmp_path):
    from safetensors.torch import load_file

    from cdmctl.embedcache import write_atomic

    cond = Conditioning({"a": torch.randn(3, 2, 5).bfloat16(), "b": torch.arange(6.0).reshape(3, 2),
                         "mask": torch.tensor([[True, False], [False, True], [True, True]])})  # fmt: skip
    digest = write_atomic(tmp_path / "x.safetensors", cond)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in cond.tensors.items())
    assert sidecar(tmp_path / "x.safetensors").read_text() == digest and not list(tmp_path.glob(".*tmp*"))
