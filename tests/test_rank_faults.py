"""Faults across processes, through the installed `cdmctl` under torchrun (2 CPU processes, gloo): one rank killed
(SIGKILL) under DDP, one rank raising under FSDP2, one rank's shard of a sharded checkpoint damaged. The others stop
in bounded time (torchrun's own stop; parallel.timeout_s where nothing stops them), one line says which rank failed,
and `--resume` continues to every tensor of an uninterrupted run. Two runs building one prompt-embedding cache at
once leave it whole, and a damaged cache shard is encoded again.

Kept short: 4 iterations, checkpoints at 2 and 4, the faults at iteration 3 (tests/killpoint arms them exactly).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cdmctl.embedcache import INDEX, shard_name
from cdmctl.engine import checkpoint as ckpt
from tests.test_kill import KILLPOINT
from tests.test_run_folder import CDMCTL, distill_args, flip_bytes
from tests.test_scale import assert_identical

TORCHRUN = str(Path(CDMCTL).parent / "torchrun")
ITERATIONS = 4
BOUND_S = 240  # every faulted launch must be over by then (a hang would run into the subprocess timeout)
FSDP2 = ["--set", "parallel.strategy=fsdp2"]
AT_ITERATION_3 = "cdmctl.engine.step:fake_loss:3:1"  # rank 1's third fake-teacher loss: after checkpoint 2


def launch(out: Path, model: Path, extra: list[str] = (), fault: str | None = None, resume: bool = False):
    args = [*distill_args(model, out, ITERATIONS), "--set", "parallel.timeout_s=30", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    if fault:
        env["CDMCTL_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(KILLPOINT), os.environ.get("PYTHONPATH")] if p)
    cmd = [TORCHRUN, "--nproc_per_node", "2", "-m", "cdmctl.cli", *args, *(["--resume"] if resume else [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=BOUND_S, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def last(out: Path) -> Path:
    found = ckpt.list_checkpoints(out)[-1]
    assert found.name == ckpt.checkpoint_name(ITERATIONS)
    return found


def our_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: rank ")]


@pytest.fixture(scope="module")
def fsdp2_reference(tiny_sd3_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2-reference") / "run"
    ok(launch(out, tiny_sd3_dir, FSDP2))
    return out


def test_a_rank_killed_under_ddp_stops_the_other_with_one_line_and_resume_matches(tiny_sd3_dir, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    ok(launch(reference, tiny_sd3_dir))
    result = launch(run, tiny_sd3_dir, fault=f"kill@{AT_ITERATION_3}")
    assert result.returncode != 0 and [ckpt.step_of(p) for p in ckpt.list_checkpoints(run)] == [2]
    lines = our_errors(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 of 2 stopped: another rank failed, was killed"), lines
    assert "last checkpoint step-0000002; resume with the same launch and: cdmctl distill" in lines[0]
    assert "rank      : 1 (local_rank: 1)" in result.stderr and "SIGKILL" in result.stderr  # torchrun names it
    ok(launch(run, tiny_sd3_dir, resume=True))
    assert_identical(last(reference), last(run), tmp_path / "tensors")


def test_a_rank_raising_under_fsdp2_is_named_and_resume_matches(tiny_sd3_dir, fsdp2_reference, tmp_path):
    run = tmp_path / "run"
    result = launch(run, tiny_sd3_dir, FSDP2, fault=f"raise@{AT_ITERATION_3}")
    assert result.returncode != 0
    lines = our_errors(result.stderr)
    failed = [line for line in lines if line.startswith("error: rank 1 of 2 failed: RuntimeError: injected fault")]
    assert len(failed) == 1 and "last checkpoint step-0000002" in failed[0], lines
    assert all(line.startswith("error: rank 0 of 2 stopped") for line in lines if line not in failed), lines
    ok(launch(run, tiny_sd3_dir, FSDP2, resume=True))
    assert_identical(last(fsdp2_reference), last(run), tmp_path / "tensors")


def test_one_ranks_damaged_shard_of_a_sharded_checkpoint_falls_back_and_resume_matches(tiny_sd3_dir, fsdp2_reference,
                                                                                       tmp_path):  # fmt: skip
    run = Path(shutil.copytree(fsdp2_reference, tmp_path / "run"))
    shard = sorted((last(run) / "state").rglob("__1_*.distcp"))[0]  # written by rank 1
    flip_bytes(shard)
    result = ok(launch(run, tiny_sd3_dir, FSDP2, resume=True))
    assert f"skipped damaged checkpoint step-0000004: {shard} does not match its manifest hash" in result.stderr
    assert_identical(last(fsdp2_reference), last(run), tmp_path / "tensors")


def single(out: Path, model: Path, cache: Path) -> subprocess.Popen:
    args = [*distill_args(model, out, 1), "--set", f"data.embedding_cache={cache}", "--set", "data.cache_shard_mb=0.01"]
    return subprocess.Popen([CDMCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})  # fmt: skip


def test_two_runs_building_one_cache_at_once_leave_it_whole_and_a_damaged_shard_is_encoded_again(tiny_sd3_dir,
                                                                                                 tmp_path):  # fmt: skip
    cache = tmp_path / "cache"
    runs = [single(tmp_path / f"run{i}", tiny_sd3_dir, cache) for i in range(2)]
    outputs = [p.communicate(timeout=BOUND_S) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("prompt embeddings: encoded" in err for _, err in outputs) == 1  # the other waited and reused it
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (folder / INDEX).is_file() and not [p for p in cache.iterdir() if p.name.endswith(".partial")]
    flip_bytes(folder / shard_name(1))
    again = single(tmp_path / "run2", tiny_sd3_dir, cache)
    _, err = again.communicate(timeout=BOUND_S)
    assert again.returncode == 0 and "prompt embeddings: encoded" in err, err[-2000:]
