"""benchmarks/gpu_check.py on the tiny pipelines on the CPU (`--tiny`), so that the GPU check is known to run before a
GPU is lent: every item builds `cdmctl distill`'s run, measures one student update and writes its row; a budget too
small for any item turns every row into 'skipped: budget'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def check(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--repeats", "1", *args],
                          capture_output=True, text=True, timeout=3000)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").read_text().startswith("# GPU check")
    return json.loads(out.with_suffix(".json").read_text())


def test_tiny_check_measures_every_item_of_two_families(tmp_path):
    data = check(tmp_path, "--families", "zimage", "flux2-klein", "--item-min-s", "0", "--budget-s", "3000")
    rows = {r["item"]: r for r in data["rows"]}
    assert list(rows) == ["zimage-4nfe", "zimage-ddmd", "flux2-klein-4nfe", "flux2-klein-4nfe as ddmd"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["config"] == "as shipped" and row["batch"] == 2 and row["fits"] is True
        assert row["seconds_per_update"] > 0 and row["samples_per_s"] == round(2 / row["seconds_per_update"], 3)
        # FLOPs of one update: at least the student's forward and backward on every sample, counted
        assert row["flops_per_update"] > 0 and row["mfu"] == round(row["flops_per_update"] / row["seconds_per_update"] / 989e12, 4)
        assert row["peak_gib"] is None  # no CUDA here
    # CDM draws schedules of 1-4 steps (the tiny setting); Decoupled DMD runs its fixed 4-step one
    assert all(1 <= n <= 4 for n in rows["zimage-4nfe"]["schedule_lengths"])
    assert rows["zimage-ddmd"]["schedule_lengths"] == [4, 4]
    # sampling timed for the CDM presets only
    assert rows["zimage-4nfe"]["sampling_ms_per_image"] > 0 and "sampling_ms_per_image" not in rows["zimage-ddmd"]
    assert rows["zimage-4nfe"]["sampling"] == "4 steps, 32 px"


def test_a_budget_too_small_skips_every_item(tmp_path):
    data = check(tmp_path, "--families", "sd3", "--budget-s", "0")
    assert [r["item"] for r in data["rows"]] == ["sd3-4nfe", "sd3-ddmd", "sd3-4nfe 48 GB", "sd3-4nfe compiled"]
    assert {r["status"] for r in data["rows"]} == {"skipped: budget"}


def test_without_a_gpu_the_real_check_says_so_in_one_line(tmp_path):
    """The real-size path's first line of main runs on any machine: it must refuse cleanly, not crash (a local
    `import torch._dynamo` once made `torch` unbound there)."""
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the real check would start: nothing to refuse
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "g")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA device here")
