"""What goes wrong at a start or a resume, through the installed `cdmctl`: a folder that is not a run is never
cleared, an edited checkpoint manifest is refused as damaged, one network's non-finite streak stops the run, a full
disk at the start or in the embedding cache is one line, and every refusal that needs no model comes before torch
loads, leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cdmctl.engine import checkpoint as ckpt
from tests.test_faults import assert_disk_full, fill, small_fs  # noqa: F401 (small_fs: a fixture)
from tests.test_kill import KILLPOINT
from tests.test_run_folder import CDMCTL, assert_one_error, distill_args

MARKER = ".cdmctl-run"


def cdmctl(*args: str, fault: str | None = None, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed entry point; `fault` arms tests/killpoint (e.g. "kill@module:attr:N")."""
    env = {**os.environ, "COLUMNS": "200", **(extra_env or {})}
    if fault:
        env["CDMCTL_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(KILLPOINT), os.environ.get("PYTHONPATH")] if p)
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=300, env=env)


def with_sets(args: list[str], **values: object) -> list[str]:
    return [*args, *[a for k, v in values.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_sd3_dir, tmp_path_factory) -> Path:
    """A 2-iteration tiny run with its checkpoint at 2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("reliability-run") / "run"
    result = cdmctl(*distill_args(tiny_sd3_dir, out, 2))
    assert result.returncode == 0, result.stderr
    return out


# ----------------------------------------------------------------------------- 1. never delete what is not ours


def test_a_non_empty_folder_that_holds_no_run_is_refused_and_left_untouched(tiny_sd3_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "cat.png").write_bytes(b"img")  # `cdmctl generate` writes ./samples by default
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = tree(out)
    result = cdmctl(*distill_args(tiny_sd3_dir, out, 1))
    assert_one_error(result, 2, f"run folder {out} is not empty and holds no cdmctl run (metrics.jsonl, samples)")
    assert "--out NEW_DIR" in result.stderr
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "samples"]


def test_a_run_stopped_before_its_first_checkpoint_loses_only_the_files_the_run_wrote(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    args = distill_args(tiny_sd3_dir, out, 2)
    killed = cdmctl(*args, fault="kill@cdmctl.engine.checkpoint:finalize_checkpoint:1")  # before its first checkpoint
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / MARKER).is_file() and (out / "metrics.jsonl").is_file() and (out / "samples" / "step-0000000.png").is_file()
    (out / "samples" / "mine.png").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine\n")
    result = cdmctl(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped before its first checkpoint: starting it from the beginning" in result.stderr
    assert (out / "samples" / "mine.png").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "mine\n"
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ----------------------------------------------------------------------------- 2. the manifest is covered by a hash


def edit_manifest(checkpoint: Path, change) -> None:
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("field", ["student_step", "preset"])
def test_an_edited_manifest_is_a_damaged_checkpoint_not_a_changed_command(tiny_sd3_dir, finished_run, tmp_path, field):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    last = ckpt.list_checkpoints(run)[-1]
    edits = {"student_step": lambda m: m.update(student_step=0),
             "preset": lambda m: m["preset"]["optim"].update(student_lr=0.5)}  # fmt: skip
    edit_manifest(last, edits[field])
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 4), "--resume")
    assert_one_error(result, 2, "its manifest.json was changed after it was written")
    assert "every checkpoint in" in result.stderr and "the preset differs" not in result.stderr
    assert not (run / "checkpoints" / "step-0000004").exists()


# ----------------------------------------------------------------------------- 3. one streak per network


def test_a_fake_teacher_whose_every_update_is_non_finite_stops_the_run_and_is_named(tiny_sd3_dir, tmp_path):
    # the student's finite update every 2nd iteration used to reset the one shared streak: the run never stopped
    out = tmp_path / "run"
    args = with_sets(distill_args(tiny_sd3_dir, out, 8), method__ttur_ratio=2, train__max_nonfinite=3)
    result = cdmctl(*args, fault="nan@cdmctl.engine.step:fake_loss:1")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("training stopped: the fake teacher's last 3 updates were non-finite (skipped), at iteration 3")
    assert not ckpt.list_checkpoints(out)  # due at 2, inside the streak: never written


# ----------------------------------------------------------------------------- 4. a full disk


def test_a_full_disk_at_the_start_is_one_line_and_leaves_nothing(tiny_sd3_dir, tmp_path, small_fs):
    fs = small_fs("1m")
    fill(fs)
    result = cdmctl(*distill_args(tiny_sd3_dir, fs / "run", 2))
    assert_disk_full(result, fs / "run")
    assert "tmpfs" in result.stderr and sorted(p.name for p in fs.iterdir()) == ["filler"]


def test_a_full_disk_under_the_embedding_cache_names_that_disk_and_leaves_no_half_written_shard(tiny_sd3_dir, tmp_path,
                                                                                                small_fs):  # fmt: skip
    fs = small_fs("64k")  # the run folder is elsewhere; the cache's first shard does not fit here
    result = cdmctl(*with_sets(distill_args(tiny_sd3_dir, tmp_path / "run", 2), data__embedding_cache=fs,
                               data__cache_shard_mb=1))  # fmt: skip
    assert_disk_full(result, fs)
    assert "tmpfs" in result.stderr
    assert not [p for p in fs.rglob("*") if ".tmp-" in p.name]  # no half-written shard, hash or layout
    assert not (tmp_path / "run").exists()  # the start failed before the run wrote anything


# ----------------------------------------------------------------------------- 5. refusals before the model loads

BAD_STARTS = {
    "missing prompt file": lambda tiny, tmp: ["--set", f"data.prompts={tmp / 'none.txt'}"],
    "empty prompt file": lambda tiny, tmp: ["--set", f"data.prompts={write(tmp / 'empty.txt', chr(10))}"],
    "missing model folder": lambda tiny, tmp: ["--set", f"model.pretrained={tmp / 'no-model'}"],
    "folder without model_index.json": lambda tiny, tmp: ["--set", f"model.pretrained={tmp}"],
    "no sample prompts": lambda tiny, tmp: ["--set", "data.sample_prompts=[]"],
    "resume of a folder with no run and --checkpoint": lambda tiny, tmp: ["--resume", "--checkpoint", "3"],
}
EXPECTED = {
    "missing prompt file": "not found", "empty prompt file": "contains no prompts",
    "missing model folder": "does not exist", "folder without model_index.json": "no model_index.json",
    "no sample prompts": "data.sample_prompts is empty", "resume of a folder with no run and --checkpoint": "has no checkpoint",
}  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def imported_modules(stderr: str) -> set[str]:
    """Module names from PYTHONPROFILEIMPORTTIME's report."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def without_import_report(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    kept = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, kept)


@pytest.mark.parametrize("case", BAD_STARTS)
def test_a_start_that_needs_no_model_is_refused_before_torch_loads_and_leaves_nothing(tiny_sd3_dir, tmp_path, case):
    out = tmp_path / "run"
    args = [*distill_args(tiny_sd3_dir, out, 2), *BAD_STARTS[case](tiny_sd3_dir, tmp_path)]
    result = cdmctl(*args, extra_env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "torch" not in imported_modules(result.stderr) and "diffusers" not in imported_modules(result.stderr)
    assert_one_error(without_import_report(result), 2, EXPECTED[case])
    assert not out.exists()  # no .lock, no preset.yaml, no folder


@pytest.mark.parametrize("command", [["generate", "a cat", "--batch-size", "0"], ["generate", "a cat", "-n", "0"],
                                     ["eval", "--metrics", "clipscore", "--batch-size", "0"],
                                     ["eval", "--metrics", "clipscore", "--score-batch-size", "0"],
                                     ["generate", "--prompts", "none.txt"],
                                     ["eval", "--metrics", "clipscore", "--prompts", "none.txt"]])  # fmt: skip
def test_generate_and_eval_refuse_bad_counts_and_files_before_torch_loads(tiny_sd3_dir, tmp_path, command):
    result = cdmctl(*command, "-m", str(tiny_sd3_dir), "--out", str(tmp_path / "out"),
                    extra_env={"PYTHONPROFILEIMPORTTIME": "1"})  # fmt: skip
    assert "torch" not in imported_modules(result.stderr)
    assert_one_error(without_import_report(result), 2, "none.txt" if "none.txt" in command else "Invalid value for '-")
    assert not (tmp_path / "out").exists()


def test_a_start_refused_after_the_lock_leaves_an_existing_run_folder_as_it_was(tiny_sd3_dir, finished_run, tmp_path):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = tree(run)
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 4))  # no --resume over a run
    assert_one_error(result, 2, "already holds a run")
    assert tree(run) == before and not (run / ".lock").exists()


def test_a_resume_with_nothing_left_to_do_names_the_checkpoint_it_holds(tiny_sd3_dir, finished_run, tmp_path):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    result = cdmctl(*distill_args(tiny_sd3_dir, run, 2), "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "None" not in result.stdout and f"checkpoint  {run / 'checkpoints' / 'step-0000002'}" in result.stdout
