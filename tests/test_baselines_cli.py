"""`--scheduler` / `--shift` of `cdmctl generate --compare-teacher` and `cdmctl eval` through the installed entry
point (refusals before any model loads; end to end on the toy teacher and a tiny student), and a student's own
sampling levels (inference.time_shift, TBCM's TrigFlow levels) when a run folder is opened."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdmctl.config.schema import Preset
from cdmctl.engine.checkpoint import write_checkpoint
from cdmctl.export import export_run
from cdmctl.generate import open_model
from cdmctl.runlog import write_preset
from cdmctl.samplers import SAMPLERS
from tests.test_cli_errors import assert_one_error, run_cdmctl
from tests.test_export import make_full_run


def refused(*args: str) -> list[str]:
    """stderr lines of a command that must exit 2 with one error and no traceback."""
    result = run_cdmctl(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    return result.stderr.strip().splitlines()


@pytest.mark.parametrize("command", [["eval", "--model", "no-such-model", "--phase", "generate"],
                                     ["generate", "a cat", "-m", "no-such-model", "--compare-teacher"]],
                         ids=["eval", "generate"])  # fmt: skip
def test_an_unknown_scheduler_is_refused_with_the_list_before_any_model_loads(command):
    lines = refused(*command, "--scheduler", "heun")  # the model does not exist: its error would come first
    assert_one_error(lines, "unknown --scheduler 'heun'")
    assert all(name in lines[1] for name in SAMPLERS)


@pytest.mark.parametrize("args, message", [
    (["generate", "a cat", "-m", "no-such-model", "--scheduler", "unipc"], "choose the teacher's sampler"),
    (["generate", "a cat", "-m", "no-such-model", "--shift", "1"], "choose the teacher's sampler"),
    (["eval", "--model", "no-such-model", "--phase", "generate", "--shift", "0"], "--shift must be a positive"),
    (["eval", "--model", "no-such-model", "--phase", "generate", "--scheduler", "dpmpp-2m", "--sigmas", "1,0.5"],
     "spaces its own levels"),
], ids=["scheduler-without-teacher", "shift-without-teacher", "zero-shift", "sigmas-with-dpmpp"])  # fmt: skip
def test_scheduler_options_that_cannot_apply_are_refused(args, message):
    assert_one_error(refused(*args), message)


def images(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted((folder / "images").glob("*.png"))])


def test_eval_samples_the_toy_teacher_with_a_named_scheduler_and_shift(tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    common = ["eval", "--model", "builtin:toy-sd3", "--prompts", str(prompts), "--phase", "generate", "--steps", "2",
              "--device", "cpu"]  # fmt: skip
    result = run_cdmctl(*common, "--scheduler", "unipc", "--shift", "1", "--out", str(tmp_path / "unipc"),
                        timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    described = json.loads((tmp_path / "unipc" / "student.json").read_text())
    assert described["sampler"] == "unipc" and described["shift"] == 1.0
    assert described["sigmas"] == pytest.approx([1.0, 0.5], abs=1e-5)  # unshifted 2-step levels
    settings = json.loads((tmp_path / "unipc" / "generation.json").read_text())
    assert settings["scheduler"] == "unipc" and settings["shift"] == 1.0
    own = run_cdmctl(*common, "--out", str(tmp_path / "own"), timeout=300)  # Euler at the toy's shift 6
    assert own.returncode == 0, own.stderr
    assert json.loads((tmp_path / "own" / "student.json").read_text())["sigmas"] == pytest.approx([1.0, 3 / 3.5])
    assert np.abs(images(tmp_path / "unipc") - images(tmp_path / "own")).max() > 8  # the choice is honoured


def test_compare_teacher_samples_the_teacher_with_the_named_scheduler(tiny_sd3_dir: Path, tmp_path: Path):
    student = export_run(make_full_run(tmp_path / "run", tiny_sd3_dir), tmp_path / "student")
    sheets = {}
    for name in ("dpmpp-2m", "euler"):
        out = tmp_path / name
        result = run_cdmctl("generate", "a red cat", "-m", str(student), "--compare-teacher", "--teacher-steps", "2",
                            "--scheduler", name, "--shift", "1", "--out", str(out), "--device", "cpu", timeout=300)
        assert result.returncode == 0, result.stderr
        teacher = Image.open(out / "teacher" / "0000-seed0.png")
        assert teacher.text["sampler"] == name and float(teacher.text["shift"]) == 1.0
        sheets[name] = np.asarray(teacher, dtype=np.int16)
    # DPM-Solver++ 2M's second step is first order at 2 steps, but its levels are its own (0.999, 0.4995)
    assert not np.array_equal(sheets["dpmpp-2m"], sheets["euler"])


def run_with(tmp_path: Path, base: Path, method: dict, inference: dict) -> Path:
    """A run folder of the base's own weights, trained (as far as its preset says) with `method` / `inference`."""
    from cdmctl.backbones import load_backbone

    run = tmp_path / "run"
    preset = Preset.model_validate({"name": "tiny", "model": {"pretrained": str(base), "resolution": 32},
                                    "data": {"prompts": "builtin:demo"}, "method": method,
                                    "inference": inference}).model_dump(mode="json")  # fmt: skip
    write_preset(run, preset)
    manifest = {"student_step": 1, "backbone": "sd3", "base_model": str(base), "train": "full", "preset": preset}
    write_checkpoint(run, 2, manifest, {"student": load_backbone("sd3", str(base)).transformer.state_dict()})
    return run


def test_a_run_folder_without_the_time_shift_samples_at_its_levels_as_given(tiny_sd3_dir: Path, tmp_path: Path):
    student = open_model(str(run_with(tmp_path, tiny_sd3_dir, {}, {"steps": 4, "time_shift": False})), ema=False,
                         device="cpu")  # fmt: skip
    assert student.describe()["sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-6)
    assert student.describe(2)["sigmas"] == pytest.approx([1.0, 0.5], abs=1e-6)


def test_a_tbcm_run_folder_samples_the_trigflow_levels_at_every_step_count(tiny_sd3_dir: Path, tmp_path: Path):
    student = open_model(str(run_with(tmp_path, tiny_sd3_dir, {"name": "tbcm"}, {"steps": 2})), ema=False,
                         device="cpu")  # fmt: skip
    assert student.sampler == "consistency" and student.level_rule == "trigflow"
    assert student.describe()["sigmas"] == pytest.approx([1.0, 0.608979], abs=1e-6)  # t = pi/2, 1.0
    assert student.describe(4)["sigmas"] == pytest.approx([1.0, 0.707107, 0.5, 0.292893], abs=1e-6)
