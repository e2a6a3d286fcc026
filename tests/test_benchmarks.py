"""The benchmark scripts still run against today's engine (their figures are measured, not asserted here), and
the memory arithmetic is the formula their docstrings state."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale_memory  # noqa: E402


def test_update_cost_runs_every_row_and_reports_ratios(tmp_path):
    out = tmp_path / "cost.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_cost.py"), "--seeds", "1",
                             "--updates", "2", "--batch", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == len(__import__("update_cost").ROWS)
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2] == "1.00x"  # the baseline against itself
    total, parts = float(cells[1].split()[0]), [float(c) for c in cells[3:]]
    assert len(parts) == 4 and abs(sum(parts) - total) < 0.02  # simulation + student + teacher + fake


def test_one_gpu_memory_is_the_stated_bytes_per_parameter():
    s = {"P": 1000, "A": 10}
    shipped = scale_memory.one_gpu(s, "full", True, "adamw")
    # float32 student 4 + bf16 teacher 2 + float32 fake 4, gradients 4, two moments of two networks 16, EMA 4,
    # foreach temporary 4
    assert shipped["total"] == 38 * 1000
    lean = scale_memory.one_gpu(s, scale_memory.LORA_RANK * 2, False, "adamw")
    adapter = 2 * 10  # twice the rank: twice the adapter
    assert lean["total"] == (4 + 2) * 1000 + 4 * adapter + 4 * 1000 + 8 * (1000 + adapter) + 4 * 1000
    assert scale_memory.one_gpu(s, "full", False, "adamw-8bit")["total"] == 10_000 + 4000 + 2 * 2000


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_iteration_speed_runs_both_implementations_on_a_small_model(tmp_path):
    out = tmp_path / "speed.md"
    run_benchmark("benchmarks/iteration_speed.py", "--size", "small", "--warmup", "0", "--repeats", "1",
                  "--batch", "1", "--verify", "--out", str(out))  # fmt: skip
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "reference-style" in line]
    assert rows and all("x**" in row for row in rows)  # each reference row carries its ratio to ours


def test_scale_memory_measures_one_cycle_of_the_engine_on_a_small_model():
    result = run_benchmark("benchmarks/scale_memory.py", "--measure", "--size", "small", "--batch", "2")
    row = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert row["model"] == "sd3-small" and row["host_peak_gib"] > 0


def test_proving_ground_teacher_best_is_the_best_free_row_at_each_step_count():
    import proving_ground as pg

    def row(variant, by_steps, seed=None):
        metrics = {n: {"precision": p, "coverage": 0.5, "mmd2": m, "adherence": 1.0} for n, (p, m) in by_steps.items()}
        return {"variant": variant, "seed": seed, "metrics": metrics}

    runs = [row("teacher-g1", {"2": (0.0, 0.29), "4": (0.22, 0.20)}),
            row("teacher-euler", {"2": (0.48, 0.115), "4": (0.78, 0.026)}),
            row("teacher-unipc", {"2": (0.48, 0.110), "4": (0.81, 0.018)}),  # a tie at 2 steps: lower MMD^2 wins
            row("cdm", {"2": (0.90, 0.01), "4": (0.95, 0.01)}, seed=0)]  # a student is never a baseline
    summary = pg.summarize(runs)
    assert pg.best_free(summary) == {"2": "teacher-unipc", "4": "teacher-unipc"}
    assert summary["teacher-best"]["4"]["precision"] == [0.81, 0.0]
    assert pg.free_name("euler", None) == "teacher-euler-shift6" and pg.free_name("unipc", 1.0) == "teacher-unipc"
    assert "teacher-best" not in pg.summarize(runs[:1] + runs[3:])  # no sampler rows: no best row


def test_proving_ground_on_the_second_ground_writes_the_hard_report_with_its_own_shift(tmp_path):
    import proving_ground as pg

    args = pg.parse(["--ground", "toy-sd3-coupled", "--variants", "cdm", "--seeds", "1", "--per-prompt", "2",
                     "--out", str(tmp_path)])  # fmt: skip
    metrics = {n: {"precision": 0.5, "coverage": 0.5, "mmd2": 0.01, "adherence": 1.0} for n in ("1", "2", "4", "8", "50")}
    runs = [{"variant": "teacher-euler-shift3", "seed": None, "metrics": metrics},
            {"variant": "teacher-g1", "seed": None, "metrics": metrics},
            {"variant": "cdm", "seed": 0, "metrics": {n: v for n, v in metrics.items() if n != "50"}}]
    from cdmctl.config import load_preset

    report = pg.write_report(args, [], runs, 800, load_preset("demo-coupled"), 2.0, 1.0)
    assert (tmp_path / "proving_ground_hard.json").exists() and not (tmp_path / "proving_ground.json").exists()
    assert report["ground"] == "toy-sd3-coupled" and report["tau"] == pytest.approx(0.045)  # the coupled truth's
    assert report["settings"]["free_samplers"][0]["row"] == "teacher-euler-shift3"  # its own shift is 3, not 6
    assert "teacher-best" in report["summary"]


def test_a_tbcm_preset_trains_one_network_on_every_rollout_point():
    from cdmctl.config.load import load_preset

    assert scale_memory.student_rows(load_preset("sd3-tbcm").method) == 15  # route_steps 16: every point but the start
    s = {"P": 10**9, "A": 10**7, "block": 10**7, "root": 10**6, "text": 10**9, "vae": 10**8, "largest": 10**6}
    cdm, tbcm = (scale_memory.per_gpu(s, "full", "ddp", 2, nets=k) for k in (2, 1))
    assert cdm["weights"] - tbcm["weights"] == 4 * 10**9  # no fake teacher's float32 master
    assert cdm["optimizer"] - tbcm["optimizer"] == 8 * 10**9  # nor its AdamW moments
    assert cdm["communication"] == 2 * tbcm["communication"] and cdm["gradients"] == tbcm["gradients"]
    mem = scale_memory.preset_memory("sd3-tbcm", {"sd3-medium": {**s, "buffers": 0}},
                                     {("sd3-medium", "full"): {"checkpointing": 1e8, "no_checkpointing": 1e9}})
    assert mem["rows"][("fsdp2", 8)]["activations"] == 1e8 * 15 * 32 / 8  # 480 points over 8 GPUs


def test_preset_memory_adds_the_activations_of_the_student_rows_per_gpu():
    from cdmctl.config.load import load_preset

    assert scale_memory.student_rows(load_preset("sd3-4nfe").method) == 2  # CDM: [xt; xe]
    assert scale_memory.student_rows(load_preset("sd3-ddmd").method) == 1  # CA + DM at xt only
    parts = {"sd3-medium": {"P": 10**9, "A": 10**7, "block": 10**7, "root": 10**6, "text": 10**9, "vae": 10**8,
                            "buffers": 0, "largest": 10**7}}  # fmt: skip
    acts = {("sd3-medium", "full"): {"checkpointing": 1e8, "no_checkpointing": 1e9, "blocks": 24}}
    mem = scale_memory.preset_memory("sd3-4nfe", parts, acts)
    one = mem["rows"][("ddp", 1)]
    assert one["activations"] == 1e8 * 2 * 128  # gradient checkpointing on: the checkpointed bytes, batch 128 on 1
    assert mem["rows"][("fsdp2", 8)]["activations"] == 1e8 * 2 * 16
    static = one["total"] - one["activations"]
    assert static == scale_memory.per_gpu(parts["sd3-medium"], "full", "ddp", 1)["total"] + scale_memory.CONTEXT
    # loading (parallel.load rank0): rank 0 alone reads the bf16 pipeline (text encoders and VAE 2.2e9 bytes, the
    # transformer 2e9), the others receive it straight into their GPUs; under FSDP2 rank 0 builds the networks in host
    # memory (bf16 teacher, float32 student and fake teacher: 10e9) and each GPU gets its shards (1.25e9 at 8) + VAE +
    # one float32 tensor in flight (4e7); every GPU holds the text encoders and VAE for the prompt cache (2.2e9)
    ddp, fsdp2 = mem["rows"][("ddp", 2)], mem["rows"][("fsdp2", 8)]
    assert (ddp["load_host_rank0"], ddp["load_host_other"]) == (4.2e9, 0)
    assert (fsdp2["load_host_rank0"], fsdp2["load_host_other"]) == (10e9, 0)
    assert ddp["load_gpu_rank0"] == ddp["load_gpu_other"] == scale_memory.CONTEXT + 10e9 + 2e8  # whole networks
    assert fsdp2["load_gpu_rank0"] == fsdp2["load_gpu_other"] == scale_memory.CONTEXT + 2.2e9  # text encoders
    no_text = {**parts["sd3-medium"], "text": 0}  # LoRA: the bf16 base per tree and the two adapters, in shards
    assert scale_memory.loading(no_text, "lora", "fsdp2", 8)["gpu_other"] == scale_memory.CONTEXT + (
        3 * 2e9 / 8 + 2 * 4e7 / 8 + 2e8 + 4e7)
    # 8 GPUs under FSDP2 fit 80 GB here, and nothing smaller does at batch 128: the smallest setup is named
    totals = {k: v["total"] / 1e9 for k, v in mem["rows"].items()}
    smallest = min((n for (strategy, n), t in totals.items() if t <= 80), default=None)
    assert scale_memory.fits(mem, 80).startswith(f"{smallest} GPU")
    # a card too small for even one prompt per GPU says so
    assert scale_memory.fits(mem, 1) == "not on 8 GPUs"


def test_tbcm_levels_converts_trigflow_times_as_the_samplers_do():
    import tbcm_levels

    from cdmctl.samplers import trigflow_levels

    assert tbcm_levels.flow_level(1.0) == pytest.approx(trigflow_levels(2)[1])  # the authors' 2-step level
    assert tbcm_levels.flow_level(math.pi / 4) == pytest.approx(0.5)


def test_budget_curve_continues_from_its_committed_report_in_a_fresh_checkout(tmp_path):
    """Without the gitignored runs.jsonl, the runs (and teacher rows) of the committed <stem>.json count as done;
    with it, its lines do."""
    import json

    from budget_curve import finished_runs

    assert finished_runs(tmp_path, "bc") == []
    run = {"variant": "cdm", "seed": 0, "ground": "toy-sd3", "budgets": {"800": {"cost": 1}}}
    (tmp_path / "bc.json").write_text(json.dumps({"ground": "toy-sd3", "teacher": {"unipc": {}}, "runs": [run]}))
    done = finished_runs(tmp_path, "bc")
    assert [(r["variant"], r["seed"]) for r in done] == [("teacher", None), ("cdm", 0)]
    (tmp_path / "bc.runs.jsonl").write_text(json.dumps({**run, "seed": 1}) + "\n")
    assert [(r["variant"], r["seed"]) for r in finished_runs(tmp_path, "bc")] == [("cdm", 1)]
