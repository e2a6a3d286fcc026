"""Seeing the student get better while it trains (issue 25), on the demo preset (the trained toy teacher, CPU):
TensorBoard event files read back with tensorboard's own reader, the proving ground's ground-truth metrics every N
iterations, the best checkpoint kept and exported, evaluation images equal to `cdmctl eval`'s from the same
checkpoint, a resume that neither repeats nor skips (scores or tracker points), `cdmctl report`, the refusals
before any model loads, and two processes (DDP, FSDP2) through torchrun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from cdmctl.engine import checkpoint as ckpt
from cdmctl.runlog import read_metrics
from tests.test_run_folder import CDMCTL, cdmctl

# the demo shrunk to seconds: 4 prompts x 2 samples evaluated at 2 and 4 steps every 2 iterations
DEMO = {"train.iterations": 4, "train.batch_size": 4, "optim.warmup_steps": 1, "run.log_every": 1,
        "run.sample_every": 2, "run.checkpoint_every": 2, "eval.every": 2, "eval.limit": 4,
        "eval.samples_per_prompt": 2, "eval.steps": "[2, 4]", "eval.batch_size": 4, "run.trackers": "[tensorboard]",
        "data.sample_prompts": "[a red cat, a blue bird]"}  # fmt: skip
SELECT = "eval/precision@2"


def demo_args(out: Path, **changes) -> list[str]:
    values = {**DEMO, **changes}
    return ["distill", "--preset", "demo", "--out", str(out), "--plain",
            *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return result


def distill_demo(out: Path, resume: str | None = None, **changes) -> None:
    """A demo run in this process (the libraries imported once), without the demo's before/after figure (a minute
    of the toy teacher at 50 steps, the proving ground's own report, not what these tests look at)."""
    from cdmctl.config import load_preset
    from cdmctl.run import distill

    values = {**DEMO, **changes}
    preset = load_preset("demo", [f"{k}={v}" for k, v in values.items()])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cdmctl.run.write_run_reports", lambda run, dashboard: None)
        distill(preset, out=str(out), resume=resume is not None, live=False, checkpoint=resume or "latest")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A demo run of 4 iterations resumed from its checkpoint 2 to 6 iterations (iterations 3 and 4 logged twice
    to the trackers, so the purge is needed), and a second, shorter run with another seed for the report."""
    root = tmp_path_factory.mktemp("observability")
    first, second = root / "demo", root / "demo-seed1"
    distill_demo(first, **{"eval.select": "precision@2", "run.keep_checkpoints": 3})
    # from checkpoint 2, although 4 exists: 3 and 4 are trained, logged and evaluated again; then only the newest
    # checkpoint and the best are kept
    distill_demo(first, resume="2", **{"eval.select": "precision@2", "run.keep_checkpoints": 1, "train.iterations": 6})
    distill_demo(second, **{"train.seed": 1, "train.iterations": 2})
    return {"first": first, "second": second}


def scalars(folder: Path) -> dict[str, list[int]]:
    """tag -> the steps of its points, as TensorBoard shows them (tensorboard's reader, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "trackers" / "demo"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    found = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    found.update({f"image:{tag}": [e.step for e in events.Images(tag)] for tag in tags["images"]})
    return found


def test_tensorboard_holds_every_scalar_and_grid_once_across_a_resume(runs):
    steps = scalars(runs["first"])
    assert steps["loss/fake"] == [1, 2, 3, 4, 5, 6]  # 3 and 4 were logged before the resume too: purged
    assert steps["cost/total_student_fwd"] == [1, 2, 3, 4, 5, 6]
    assert steps["throughput/it_s"] == [1, 2, 3, 4, 5, 6] and steps["memory/host_peak_gb"] == [1, 2, 3, 4, 5, 6]
    assert steps["grad_norm/student"] and steps["lr/student"] and steps["lr/fake"]
    assert steps[SELECT] == [2, 4, 6] and steps["eval/mmd2@4"] == [2, 4, 6]
    assert steps["eval_cost/seconds_total"] == [2, 4, 6]
    assert steps["image:samples"] == [0, 2, 4, 6]  # 0: the "before" grid of the fresh start
    assert steps["image:eval/2-steps"] == [2, 4, 6]


def test_evaluations_are_neither_repeated_nor_skipped_on_resume(runs):
    records = [r for r in read_metrics(runs["first"]) if SELECT in r]
    assert [r["iteration"] for r in records] == [2, 4, 6]
    for record in records:
        assert {f"eval/{m}@{n}" for m in ("precision", "coverage", "mmd2") for n in (2, 4)} <= record.keys()
        assert 0 <= record[SELECT] <= 1 and record["eval_cost/images"] == 8 * 2  # 4 prompts x 2 samples x 2 counts
    # evaluation cost is its own, cumulative across the resume, and not part of training's cost counters
    assert records[-1]["eval_cost/images_total"] == 3 * 16
    assert records[-1]["eval_cost/student_fwd_total"] == 3 * 8 * (2 + 4)
    assert not any(k.startswith("cost/") for k in records[0])
    for folder in (runs["first"], runs["first"] / "evals" / "step-0000006"):
        assert folder.is_dir()
    assert (runs["first"] / "evals" / "step-0000004" / "steps-2.png").is_file()


def test_the_best_checkpoint_is_the_best_recorded_score_and_survives_pruning(runs, tmp_path):
    folder = runs["first"]
    records = [r for r in read_metrics(folder) if SELECT in r]
    best_value = max(r[SELECT] for r in records)
    first_best = next(r["iteration"] for r in records if r[SELECT] == best_value)  # ties keep the earlier one
    best = json.loads((folder / "best.json").read_text())
    assert best["iteration"] == first_best and best["value"] == best_value and best["select"] == "precision@2"
    kept = ckpt.list_checkpoints(folder)
    assert ckpt.checkpoint_name(first_best) in [p.name for p in kept]  # keep_checkpoints 1 left it alone
    assert kept[-1].name == ckpt.checkpoint_name(6) and len(kept) <= 2
    out = tmp_path / "student"
    ok(cdmctl("export", str(folder), "--out", str(out), "--checkpoint", "best"))
    assert json.loads((out / "cdmctl.json").read_text())["source"]["iteration"] == first_best


def assert_grid_equals_eval(run: Path, iteration: int, steps: int, tmp_path: Path) -> None:
    """The evaluation grid at `iteration` is pixel for pixel what `cdmctl eval` makes from that checkpoint."""
    from PIL import Image

    from cdmctl.generate import images_tensor
    from cdmctl.runlog import save_grid

    out = tmp_path / f"eval-{iteration}"
    ok(cdmctl("eval", "--model", str(run), "--checkpoint", str(iteration), "--prompts", "builtin:toy", "--limit", "4",
              "--num-per-prompt", "2", "--steps", str(steps), "--seed", "0", "--batch-size", "4", "--phase",
              "generate", "--out", str(out)))  # fmt: skip
    made = [out / "images" / f"{i:06d}-000.png" for i in range(4)]
    expected = save_grid(images_tensor([Image.open(p) for p in made]), tmp_path / f"expected-{iteration}.png")
    ours = run / "evals" / f"step-{iteration:07d}" / f"steps-{steps}.png"
    assert images_tensor([Image.open(ours)]).equal(images_tensor([Image.open(expected)]))


def test_evaluation_images_equal_cdmctl_eval_from_that_checkpoint(runs, tmp_path):
    assert_grid_equals_eval(runs["first"], 6, 2, tmp_path)


def test_report_plots_every_curve_and_score_and_tables_the_best(runs, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    ok(cdmctl("report", str(runs["first"]), str(runs["second"]), "--out", str(out)))
    for name in ("training.png", "scores.png", "samples-demo.png", "samples-demo-seed1.png"):
        with Image.open(out / name) as image:
            assert image.width >= 600 and image.height >= 300, name
    table = (out / "summary.md").read_text()
    best = json.loads((runs["first"] / "best.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("| demo | precision@2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(best["value"], abs=1e-4) and int(cells[3]) == best["iteration"]
    last = [r for r in read_metrics(runs["first"]) if SELECT in r][-1][SELECT]
    assert float(cells[4]) == pytest.approx(last, abs=1e-4) and int(cells[5].replace(",", "")) > 0
    assert "| demo-seed1 | mmd2@4 |" in table
    assert f"demo: 6 iterations; best checkpoint: iteration {best['iteration']}" in table


def test_a_decline_beyond_the_threshold_warns_with_the_iteration_of_the_best():
    from cdmctl.trainingeval import Selection

    selection = Selection("eval/mmd2@4", higher=False, threshold=0.05)
    assert selection.update(0.30, 2) == (True, None)
    assert selection.update(0.20, 4) == (True, None)
    improved, warning = selection.update(0.27, 6)
    assert not improved and "below its best 0.2 (iteration 4)" in warning and selection.since_best == 1
    assert selection.update(0.24, 8) == (False, None)  # worse, within the threshold: no warning
    assert selection.since_best == 2


def test_prune_keeps_the_protected_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / ckpt.checkpoint_name(step)).mkdir(parents=True)
        (root / ckpt.checkpoint_name(step) / "manifest.json").write_text("{}")
    ckpt.prune(root, keep=1, protect={ckpt.checkpoint_name(4)})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(4), ckpt.checkpoint_name(8)]


@pytest.mark.parametrize("change, message, fix", [
    ({"eval.metrics": "[precision, sharpness]"}, "unknown metric 'sharpness' in eval.metrics", "available:"),
    ({"run.trackers": "[neptune]"}, "unknown tracker 'neptune'", "use one of: tensorboard"),
    ({"run.trackers": "[aim]"}, "tracker 'aim' needs the aim package, which is not installed", "pip install aim"),
    ({"eval.select": "coverage@3"}, "select names 3 steps, which eval.steps ([2, 4]) does not evaluate", "fix:"),
    ({"eval.select": "clipscore@2"}, "select names clipscore, which eval.metrics", "fix:"),
    ({"eval.every": 0}, "eval.every: Input should be greater than or equal to 1", "fix:"),
    ({"eval.prompts": "missing-prompts.txt"}, "prompt file missing-prompts.txt not found", "check the path"),
    ({"eval.samples_per_prompt": 1}, "the ground-truth metrics need eval.samples_per_prompt >= 2", "samples_per_prompt: 8"),
    ({"model.pretrained": "builtin:tiny-sd3"}, "which only the proving grounds' teachers have (builtin:toy-sd3, "
     "builtin:toy-sd3-coupled)", "use an image metric"),
])  # fmt: skip
def test_bad_eval_and_tracker_settings_are_refused_before_any_model_loads(change, message, fix, tmp_path):
    if change.get("run.trackers") == "[aim]" and importlib.util.find_spec("aim"):
        pytest.skip("aim is installed here")
    out = tmp_path / "run"
    result = cdmctl(*demo_args(out, **change))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and fix in result.stderr and "Traceback" not in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("mode, extra", [
    ("ddp", {}),
    ("fsdp2", {"parallel.strategy": "fsdp2", "model.gradient_checkpointing": "true"}),
])  # fmt: skip
def test_two_processes_split_the_evaluation_and_log_once(mode, extra, tmp_path):
    """Prompts split over 2 ranks (one with more jobs: 3 prompts) and gathered: the grid equals `cdmctl eval` of
    the checkpoint on one process; one TensorBoard writer; each evaluation once in metrics.jsonl."""
    out = tmp_path / mode
    args = demo_args(out, **{"train.iterations": 2, "eval.limit": 3, **extra})
    launch = [str(Path(CDMCTL).parent / "torchrun"), "--nproc_per_node", "2", "-m", "cdmctl.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    ok(subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600, env=env))
    records = [r for r in read_metrics(out) if SELECT in r]
    assert [r["iteration"] for r in records] == [2] and records[0]["eval_cost/images"] == 3 * 2 * 2
    writers = list((out / "trackers" / "demo").glob("events.out.tfevents.*"))
    assert len(writers) == 1
    assert scalars(out)[SELECT] == [2]
    from PIL import Image

    from cdmctl.generate import images_tensor
    from cdmctl.runlog import save_grid

    ev = tmp_path / "eval"
    ok(subprocess.run([CDMCTL, "eval", "--model", str(out), "--checkpoint", "2", "--prompts", "builtin:toy", "--limit",
                       "3", "--num-per-prompt", "2", "--steps", "2", "--seed", "0", "--batch-size", "4", "--phase",
                       "generate", "--out", str(ev)], capture_output=True, text=True, timeout=600, env=env))  # fmt: skip
    made = save_grid(images_tensor([Image.open(ev / "images" / f"{i:06d}-000.png") for i in range(3)]), tmp_path / "e.png")
    ours = out / "evals" / "step-0000002" / "steps-2.png"
    assert images_tensor([Image.open(ours)]).equal(images_tensor([Image.open(made)]))


def test_the_loop_checkpoints_each_new_best_at_once_and_stops_after_the_decline():
    """engine.loop.train with a stand-in distiller: evaluations every 2 iterations; a new best at 2 is checkpointed
    although no checkpoint is due, and the evaluation at 6 asking to stop (stop_after_decline) ends the run there,
    after a checkpoint of that iteration to resume from."""
    from types import SimpleNamespace

    from cdmctl.engine.cost import CostCounter
    from cdmctl.engine.loop import Counters, EvalOutcome, Schedule, train

    class Distiller:
        counters, cost = Counters(), CostCounter()
        accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))

        def iteration(self):
            self.counters.iteration += 1
            return {"loss/x": 1.0}

        def state(self):
            return {"iteration": self.counters.iteration}

    class Hooks:
        evaluated, checkpoints = [], []
        outcomes = {2: EvalOutcome(checkpoint=True), 4: EvalOutcome(), 6: EvalOutcome(stop=True)}

        def log(self, record): ...
        def sample(self, iteration): ...
        def stop_requested(self): return False

        def evaluate(self, iteration):
            self.evaluated.append(iteration)
            return self.outcomes[iteration]

        def checkpoint(self, iteration):
            self.checkpoints.append(iteration)

    hooks = Hooks()
    counters = train(Distiller(), Schedule(10, 100, 0, 0, 5, eval_every=2), hooks, batch_size=1)
    assert counters.iteration == 6 and hooks.evaluated == [2, 4, 6] and hooks.checkpoints == [2, 6]


def test_the_trackers_option_of_distill_is_checked_before_any_model_loads(tmp_path):
    result = cdmctl(*demo_args(tmp_path / "run"), "--trackers", "tensorboard,neptune")
    assert result.returncode == 2 and "unknown tracker 'neptune'" in result.stderr and "Traceback" not in result.stderr
