"""kill -9 at exact points of a run and of its resumes, then resume to the end: every tensor of the final
checkpoint equals that of a run never interrupted.

The points are hit exactly through tests/killpoint (a sitecustomize that SIGKILLs the process on the N-th call
of a named function), not by timers: a checkpoint half staged, half hashed, a resume half started, an
iteration between its fake-teacher and student updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdmctl.engine import checkpoint as ckpt
from tests.test_run_folder import CDMCTL, distill_args

KILLPOINT = Path(__file__).parent / "killpoint"
ITERATIONS = 6  # checkpoints at 2, 4, 6


def run_cdmctl(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    if kill_at:
        env["CDMCTL_KILL_AT"] = kill_at
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(KILLPOINT), os.environ.get("PYTHONPATH")] if p)
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=300, env=env)


def killed(args: list[str], kill_at: str) -> None:
    result = run_cdmctl(args, kill_at)
    assert result.returncode == -signal.SIGKILL, f"{kill_at} was never reached:\n{result.stderr[-2000:]}"


def steps(run: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(run)]


def tensors_of(value):
    """Every tensor inside a (nested) state, by its path; other leaves as they are."""
    if isinstance(value, torch.Tensor):
        return {"": value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        return {"": value}
    return {f"{k}/{path}": leaf for k, v in items for path, leaf in tensors_of(v).items()}


def load_any(path: Path):
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=False)  # accelerate's optimizer/RNG states


def assert_same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".pkl", ".pt"})
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".pkl", ".pt"})
    assert any(str(f).startswith("state/") for f in files)  # the training state is compared, not only the export
    for name in files:
        ta, tb = tensors_of(load_any(a / name)), tensors_of(load_any(b / name))
        assert ta.keys() == tb.keys(), name
        for key, va in ta.items():
            vb = tb[key]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else _same_leaf(va, vb)
            assert same, f"{name}: {key} differs after the kills and resumes"
    ma, mb = ckpt.read_manifest(a), ckpt.read_manifest(b)
    for field in ("iteration", "student_step", "fake_step", "cost_totals"):
        assert ma[field] == mb[field], field


def _same_leaf(a, b) -> bool:
    try:
        import numpy as np

        if isinstance(a, np.ndarray):
            return bool(np.array_equal(a, b))
    except ImportError:  # pragma: no cover
        pass
    return a == b


def test_kill_9_anywhere_then_resume_gives_every_tensor_of_an_uninterrupted_run(tiny_sd3_dir, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert run_cdmctl(distill_args(tiny_sd3_dir, reference, ITERATIONS)).returncode == 0
    args = distill_args(tiny_sd3_dir, run, ITERATIONS)
    resume = [*args, "--resume"]

    # 1. checkpoint 4 staged (state and weights written), killed while hashing it: no manifest, not a checkpoint
    killed(args, "cdmctl.engine.checkpoint:hash_tree:2")
    assert steps(run) == [2] and (run / "checkpoints/.tmp-step-0000004/state").is_dir()
    # 2. and 3. resumes killed while loading the training state, then while trimming the log
    killed(resume, "accelerate.accelerator:Accelerator.load_state:1")
    assert not (run / "checkpoints/.tmp-step-0000004").exists()  # the stale staging folder is cleared first
    killed(resume, "cdmctl.runfolder:trim_metrics:1")
    # 4. killed between two optimizer updates of iteration 5 (checkpoint 4 complete)
    killed(resume, "cdmctl.engine.loop:Distiller.apply:5")
    assert steps(run) == [2, 4]
    # 5. killed while writing checkpoint 6's tensors (the student written, its EMA not)
    killed(resume, "cdmctl.engine.checkpoint:save_tensors:2")
    assert steps(run) == [2, 4] and (run / "checkpoints/.tmp-step-0000006/student.safetensors").is_file()

    result = run_cdmctl(resume)
    assert result.returncode == 0, result.stderr
    assert "removed the half-written checkpoint .tmp-step-0000006" in result.stdout + result.stderr
    assert steps(run) == [2, 4, 6] and not list((run / "checkpoints").glob(".tmp-*"))
    assert_same_checkpoint(reference / "checkpoints/step-0000006", run / "checkpoints/step-0000006")
    logged = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, ITERATIONS + 1))  # every iteration once, none lost, none twice
    assert not list(run.glob(".metrics.jsonl.tmp-*"))
