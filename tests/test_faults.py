"""Faults a user meets outside the happy path, through the installed `cdmctl` where that is the user's path.

A full disk (a real small tmpfs where the test may mount one, and a writer made to fail in-process), a run
whose updates go non-finite around a checkpoint, `--out` naming a file, a prompt file edited between a
run and its resume, and metric weights that an offline machine lacks. Each ends in one `error:` line (plus
an optional `  fix:` line), its exit code and no traceback; nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdmctl.engine import checkpoint as ckpt
from cdmctl.engine.cost import CostCounter
from cdmctl.engine.loop import Counters, Schedule, TrainingDiverged, train
from cdmctl.outputs import DiskFull, is_disk_full
from tests.test_run_folder import CDMCTL, assert_one_error, distill_args


def cdmctl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})  # fmt: skip


def with_sets(args: list[str], **values: object) -> list[str]:
    return [*args, *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def finished_run(tiny_sd3_dir, tmp_path_factory) -> Path:
    """A 2-iteration tiny run with its checkpoint at 2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("faults-run") / "run"
    result = cdmctl(*distill_args(tiny_sd3_dir, out, 2))
    assert result.returncode == 0, result.stderr
    return out


# ----------------------------------------------------------------------------- 1. a full disk


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` at a folder under tmp_path; skips where mounting is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Write until the filesystem under `folder` has no byte left."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def assert_disk_full(result: subprocess.CompletedProcess, path: Path) -> None:
    """Exit 1 and one error line naming the device and path; distill's --plain log lines may come before it."""
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    tail = lines[errors[0]:]
    assert len(tail) <= 2 and (len(tail) == 1 or tail[1].startswith("  fix: ")), tail
    assert tail[0].startswith("error: no space left on ") and tail[0].endswith(f"writing {path}"), tail


def test_disk_full_during_a_checkpoint_removes_the_staging_folder_and_keeps_the_previous_one(
    tiny_sd3_dir, finished_run, small_fs
):
    fs = small_fs("6m")  # the run (~3.8 MB) fits; its next checkpoint (as large again) does not
    run = Path(shutil.copytree(finished_run, fs / "run"))
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 4), "--resume")
    assert_disk_full(result, run / "checkpoints" / ".tmp-step-0000004")
    assert "tmpfs" in result.stderr  # the device the mount table names
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no .tmp-* left taking space
    ckpt.verify_checkpoint(run / "checkpoints/step-0000002")


def test_disk_full_during_export_generate_and_eval_is_one_line_and_leaves_no_temp_folder(finished_run, small_fs):
    fs = small_fs("1m")
    fill(fs)
    result = cdmctl("export", str(finished_run), "--out", str(fs / "export"))
    assert_disk_full(result, fs / "export")
    result = cdmctl("generate", "a cat", "-m", str(finished_run), "--out", str(fs / "gen"), "--device", "cpu",
                    "--steps", "1")  # fmt: skip
    assert_disk_full(result, fs / "gen")
    result = cdmctl("eval", "-m", str(finished_run), "--prompts", str(write_prompts(fs.parent / "p.txt", "a cat")),
                    "--phase", "generate", "--out", str(fs / "ev"), "--device", "cpu", "--steps", "1")  # fmt: skip
    assert_disk_full(result, fs / "ev")
    assert not [p.name for p in fs.iterdir() if ".tmp" in p.name]


def fake_run(folder: Path, save_state, monkeypatch) -> SimpleNamespace:
    """What runcheckpoint.save_checkpoint reads of its run: one process, a tiny student, a manifest."""
    from cdmctl import runcheckpoint

    monkeypatch.setattr(runcheckpoint, "student_tensors", lambda run: {"student": {"w": torch.ones(4)}})
    monkeypatch.setattr(runcheckpoint, "manifest", lambda run: {"preset": {}})
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)
    return SimpleNamespace(accelerator=acc, folder=folder,
                           preset=SimpleNamespace(run=SimpleNamespace(keep_checkpoints=None)))  # fmt: skip


def write_state(path: str) -> None:
    Path(path).mkdir(parents=True)
    torch.save({"step": 1}, Path(path) / "optimizer.bin")


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_short_write(*_args, **_kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def safetensors_short_write(*_args, **_kwargs):
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where, failure", [("tensors", no_space), ("state", torch_short_write),
                                            ("tensors", safetensors_short_write)])  # fmt: skip
def test_a_checkpoint_write_failing_for_space_is_discarded_and_the_previous_still_verifies(tmp_path, monkeypatch,
                                                                                         where, failure):  # fmt: skip
    from cdmctl.runcheckpoint import save_checkpoint

    run = fake_run(tmp_path, write_state, monkeypatch)
    previous = save_checkpoint(run, 2)
    if where == "tensors":
        monkeypatch.setattr(ckpt, "save_tensors", failure)
    else:
        run.accelerator.save_state = lambda path: (write_state(path), failure())
    with pytest.raises(DiskFull, match="no space left on .* writing .*tmp-step-0000004") as caught:
        save_checkpoint(run, 4)
    assert caught.value.exit_code == 1
    assert not ckpt.staging_dir(tmp_path, 4).exists()
    assert ckpt.list_checkpoints(tmp_path) == [previous]
    ckpt.verify_checkpoint(previous)


def test_other_write_errors_are_not_taken_for_a_full_disk():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
    assert not is_disk_full(KeyboardInterrupt())


# ----------------------------------------------------------------------------- 2. no checkpoint in a non-finite streak


class ScriptedDistiller:
    """Iterations whose non-finite streak after each one is given (what `Distiller.apply` would count)."""

    def __init__(self, streaks: list[int]):
        self.streaks, self.counters, self.cost = streaks, Counters(), CostCounter()
        self.accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))  # one process: no gather

    def iteration(self) -> dict[str, float]:
        self.counters.nonfinite_streak = self.streaks[self.counters.iteration]
        self.counters.iteration += 1
        return {}

    def state(self) -> dict[str, int]:
        return vars(self.counters).copy()


class RecordingHooks:
    def __init__(self, stop_after: int | None = None):
        self.checkpoints: list[int] = []
        self.stop_after, self.iteration = stop_after, 0

    def log(self, record):
        self.iteration = record["iteration"]

    def sample(self, iteration):
        pass

    def checkpoint(self, iteration):
        self.checkpoints.append(iteration)

    def stop_requested(self):
        return self.stop_after is not None and self.iteration >= self.stop_after


def run_loop(streaks: list[int], every: int = 2, max_nonfinite: int = 5, stop_after: int | None = None) -> list[int]:
    hooks = RecordingHooks(stop_after)
    train(ScriptedDistiller(streaks), Schedule(len(streaks), 1, 0, every, max_nonfinite), hooks, batch_size=1)
    return hooks.checkpoints


def test_a_due_checkpoint_waits_for_the_streak_to_end():
    # due at 2 (streak 1) -> written at 4, the first finite one; due at 6 (streak 3) -> written at 7; end at 8
    assert run_loop([0, 1, 1, 0, 0, 3, 0, 0]) == [4, 7, 8]
    assert run_loop([0, 0, 0, 0]) == [2, 4]  # no streak: as before


def test_a_run_that_diverges_leaves_the_checkpoint_from_before_its_streak_as_latest():
    hooks = RecordingHooks()
    with pytest.raises(TrainingDiverged):
        train(ScriptedDistiller([0, 0, 0, 1, 2, 3]), Schedule(6, 1, 0, 2, 3), hooks, batch_size=1)
    assert hooks.checkpoints == [2]  # not 4, in the middle of the streak that ended the run


def test_a_stop_in_a_streak_writes_no_checkpoint():
    assert run_loop([0, 0, 1, 1, 0, 0], every=2, stop_after=3) == [2]


# ----------------------------------------------------------------------------- 3. --out names a file


OUT_IS_FILE = {
    "distill": lambda tiny, out: distill_args(tiny, out, 2),
    "export": lambda tiny, out: ["export", str(out.parent / "no-run"), "--out", str(out), "--overwrite"],
    "generate": lambda tiny, out: ["generate", "a cat", "-m", str(tiny), "--out", str(out)],
    "eval": lambda tiny, out: ["eval", "-m", str(tiny), "--phase", "generate", "--prompts",
                               str(write_prompts(Path(str(out).split("taken.txt")[0]) / "p.txt", "a cat")),
                               "--out", str(out)],  # a local prompt file: the default set is downloaded
}


@pytest.mark.parametrize("command", OUT_IS_FILE)
@pytest.mark.parametrize("inside", [False, True], ids=["file", "under-a-file"])
def test_out_naming_a_file_is_a_usage_error(tiny_sd3_dir, tmp_path, command, inside):
    target = tmp_path / "taken.txt"
    target.write_text("not a folder\n")
    out = target / "sub" if inside else target
    result = cdmctl(*OUT_IS_FILE[command](tiny_sd3_dir, out))
    assert_one_error(result, 2, f"--out {out} is")
    assert target.read_text() == "not a folder\n"


# ----------------------------------------------------------------------------- 4. an edited prompt file


def write_prompts(path: Path, *prompts: str) -> Path:
    path.write_text("".join(f"{p}\n" for p in prompts))
    return path


def test_resume_refuses_a_prompt_file_changed_since_the_checkpoint(tiny_sd3_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt", "a red cat", "a blue dog")
    out = tmp_path / "run"
    args = with_sets(distill_args(tiny_sd3_dir, out, 2), **{"data.prompts": prompts})
    assert cdmctl(*args).returncode == 0
    manifest_path = out / "checkpoints/step-0000002/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["prompts_sha256"] == ckpt.sha256_of(prompts)
    write_prompts(prompts, "a red cat", "a green bird")  # same path, other prompts
    resume = with_sets(distill_args(tiny_sd3_dir, out, 4), **{"data.prompts": prompts})
    result = cdmctl(*resume, "--resume")
    assert_one_error(result, 2, f"the prompt file {prompts} changed since checkpoint step-0000002")
    assert "restore the file" in result.stderr
    # a checkpoint written before the hash was recorded resumes without the check (format 2: nor had its manifest
    # its own hash, which would refuse the edit)
    manifest.pop("prompts_sha256")
    manifest.update(format=2)
    del manifest[ckpt.BODY_HASH]
    manifest_path.write_text(json.dumps(manifest, indent=2))
    result = cdmctl(*resume, "--resume")
    assert result.returncode == 0, result.stderr


def test_builtin_prompt_lists_record_no_hash(finished_run):
    assert ckpt.read_manifest(finished_run / "checkpoints/step-0000002")["prompts_sha256"] is None


# ----------------------------------------------------------------------------- 5. metric weights checked first


def test_eval_refuses_weights_missing_offline_before_generating_anything(tiny_sd3_dir, tmp_path):
    out = tmp_path / "ev"
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    result = cdmctl("eval", "-m", str(tiny_sd3_dir), "--prompts", str(prompts), "--metrics", "clipscore",
                    "--metric-option", "clipscore.model=nobody/not-cached-model", "--out", str(out), "--device", "cpu",
                    env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")})  # fmt: skip
    assert_one_error(result, 2, "metric 'clipscore' needs nobody/not-cached-model, which is not in the local hub cache")
    assert not list(out.rglob("*.png")) if out.exists() else True


def test_weights_check_accepts_local_paths_and_cached_files(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cdmctl.metrics.availability import unavailable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub/models--owner--cached/snapshots/abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub/models--owner--cached/refs").mkdir()
    (tmp_path / "hub/models--owner--cached/refs/main").write_text("abc")
    local = tmp_path / "weights.pt"
    local.write_bytes(b"")
    assert unavailable([str(local), "owner/cached", "owner/cached/config.json", "owner/gone", "owner/cached/x.pt"]) \
        == ["owner/gone", "owner/cached/x.pt"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert unavailable(["owner/gone"]) == []  # online: the loader downloads it
