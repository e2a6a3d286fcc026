"""The run folder's guards through the installed `cdmctl`: one writer (a lock), every checkpoint file verified,
resume falls back past damaged checkpoints, a run killed before its first checkpoint starts again."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdmctl.engine import checkpoint as ckpt
from cdmctl.errors import UserError
from cdmctl.runfolder import trim_metrics

CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")


def cdmctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip


def distill_args(model: Path, out: Path, iterations: int) -> list[str]:
    values = {"model.pretrained": model, "model.resolution": 32, "model.precision": "fp32",
              "model.gradient_checkpointing": "false", "model.text_length": 8, "method.schedule.length": "[1, 3]",
              "train.iterations": iterations, "train.batch_size": 2, "optim.warmup_steps": 1, "run.log_every": 1,
              "run.sample_every": 0, "run.checkpoint_every": 2, "data.prompts": "builtin:toy",
              "data.sample_prompts": "[a red cat]"}  # fmt: skip
    return ["distill", "--preset", "sd3-4nfe", "--out", str(out), "--plain",
            *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]


def assert_one_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("error: ") and text in lines[0], lines
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("  fix: ")), lines


@pytest.fixture(scope="module")
def finished_run(tiny_sd3_dir, tmp_path_factory) -> Path:
    """A 4-iteration run with checkpoints at 2 and 4 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    result = cdmctl(*distill_args(tiny_sd3_dir, out, 4))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def flip_bytes(path: Path, offset: int = -64, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_of_a_checkpoint_is_hashed(finished_run):
    last = ckpt.list_checkpoints(finished_run)[-1]
    manifest = ckpt.read_manifest(last)
    on_disk = {p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["sha256"]) == on_disk and any(k.startswith("state/") for k in on_disk)
    assert ckpt.verify_checkpoint(last)["iteration"] == 4


def damage_kinds(last: Path) -> dict[str, callable]:
    state = sorted(p for p in (last / "state").rglob("*") if p.is_file())
    return {
        "flipped bytes in state/": lambda: flip_bytes(state[0]),
        "missing state file": lambda: state[-1].unlink(),
        "truncated student": lambda: (last / "student.safetensors").write_bytes(b"\0" * 10),
        "manifest not JSON": lambda: (last / "manifest.json").write_text("{not json"),
        "manifest without files": lambda: (last / "manifest.json").write_text(
            json.dumps({k: v for k, v in ckpt.read_manifest(last).items() if k != "files"})),
        "iteration contradicts the folder": lambda: (last / "manifest.json").write_text(
            json.dumps({**ckpt.read_manifest(last), "iteration": 2})),
    }


@pytest.mark.parametrize("kind", ["flipped bytes in state/", "missing state file", "truncated student",
                                  "manifest not JSON", "manifest without files", "iteration contradicts the folder"])
def test_each_kind_of_damage_is_detected(finished_run, tmp_path, kind):
    run = copy_run(finished_run, tmp_path)
    last = ckpt.list_checkpoints(run)[-1]
    damage_kinds(last)[kind]()
    with pytest.raises(ckpt.DamagedCheckpoint):
        ckpt.verify_checkpoint(last)
    chosen, skipped = ckpt.intact_checkpoint(run)
    assert chosen.name == "step-0000002" and len(skipped) == 1 and "step-0000004" in skipped[0]


def test_resume_skips_a_damaged_latest_checkpoint_and_continues_from_the_previous(finished_run, tmp_path,
                                                                                   tiny_sd3_dir):
    run = copy_run(finished_run, tmp_path)
    flip_bytes(sorted((run / "checkpoints" / "step-0000004" / "state").rglob("*.safetensors"))[0])
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 6), "--resume")
    assert result.returncode == 0, result.stderr
    assert "skipped damaged checkpoint step-0000004" in result.stdout + result.stderr
    iterations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5, 6]  # 3-4 of the first run dropped, then written again from step 2


def test_resume_from_a_named_damaged_checkpoint_and_export_of_it_are_refused(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    flip_bytes(run / "checkpoints" / "step-0000004" / "ema.safetensors")
    resumed = cdmctl("distill", "--preset", str(run / "preset.yaml"), "--out", str(run), "--resume", "--checkpoint", "4")
    assert_one_error(resumed, 2, "does not match its manifest hash")
    exported = cdmctl("export", str(run), "--out", str(tmp_path / "exported"))
    assert_one_error(exported, 2, "does not match its manifest hash")
    assert not (tmp_path / "exported").exists()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny_sd3_dir):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"pid {os.getpid()} on this-host\n")
        held.flush()
        result = cdmctl(*distill_args(tiny_sd3_dir, run, 2))
    assert_one_error(result, 2, f"in use by pid {os.getpid()} on this-host")
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, tiny_sd3_dir, resume):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".cdmctl-run").write_text("{}\n")  # what a killed run leaves: its marker, its log
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1}) + "\n")
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 2), *(["--resume"] if resume else []))
    assert result.returncode == 0, result.stderr
    assert "starting it from the beginning" in result.stdout + result.stderr
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_trimming_the_log_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 6))
    log.write_text(original)

    def killed(*_):
        raise KeyboardInterrupt  # a kill at the worst moment: the new file is written but not yet in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trim_metrics(tmp_path, 2)
    assert log.read_text() == original
    monkeypatch.undo()
    trim_metrics(tmp_path, 2)
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2]


def test_damage_is_a_user_error_with_a_fix():
    assert issubclass(ckpt.DamagedCheckpoint, UserError)


def test_a_checkpoint_from_before_a_new_preset_field_resumes(finished_run, tmp_path, tiny_sd3_dir):
    """A field added later (at a default that keeps the old behaviour) is no reason to refuse a resume."""
    run = copy_run(finished_run, tmp_path)
    last = ckpt.list_checkpoints(run)[-1]
    manifest = ckpt.read_manifest(last)
    for field in ("checkpoint_every", "frozen_precision"):  # as written by 0.x, before these existed
        del manifest["preset"]["model"][field]
    manifest.update(format=2)  # nor did the manifest's own hash (format 3)
    del manifest[ckpt.BODY_HASH]
    (last / "manifest.json").write_text(json.dumps(manifest))
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 6), "--resume")
    assert result.returncode == 0, result.stderr
    assert ckpt.list_checkpoints(run)[-1].name == "step-0000006"
