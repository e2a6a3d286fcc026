"""`cdmctl distill` end to end on the tiny SD3 pipeline: every method preset, run folder, resume, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdmctl import cli
from cdmctl.engine.checkpoint import list_checkpoints, load_weights, read_manifest

METHOD_PRESETS = ["sd3-4nfe", "sd3-cdm-fixed", "sd3-ddmd", "sd3-dmd2"]


def tiny_overrides(model_dir: Path, prompts: Path, iterations: int = 2) -> list[str]:
    """Shrink a real preset to the tiny pipeline: same method, CPU-sized everything else."""
    values = {
        "model.pretrained": str(model_dir),
        "model.resolution": 32,
        "model.precision": "fp32",
        "model.gradient_checkpointing": "false",
        "model.text_length": 8,
        "method.schedule.length": "[1, 4]",
        "train.iterations": iterations,
        "train.batch_size": 2,
        "optim.student_lr": 1e-3,
        "optim.fake_lr": 1e-3,
        "optim.warmup_steps": 1,
        "run.log_every": 1,
        "run.sample_every": 0,
        "run.checkpoint_every": 2,
        "data.prompts": str(prompts),
        "data.sample_prompts": "[a red cube, a blue ball]",
    }
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["cdmctl", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cube\na blue ball\n\na green tree on a hill\n")
    return path


def transformer_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((model_dir / "transformer").glob("*.safetensors"))))


@pytest.mark.parametrize("preset", METHOD_PRESETS)
def test_every_method_preset_trains_the_student_only(preset, tiny_sd3_dir, prompt_file, tmp_path, monkeypatch, capsys):
    before = transformer_weights(tiny_sd3_dir)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "distill", "--preset", preset, "--out", str(out), "--plain",
        *tiny_overrides(tiny_sd3_dir, prompt_file),
    )
    assert code == 0, err
    assert str(out / "checkpoints" / "step-0000002") in stdout
    # run folder: resolved preset, metrics, before/after grids, a complete checkpoint
    assert (out / "preset.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert records[-1]["student_step"] == 1 and records[-1]["fake_step"] == 2
    assert records[-1]["cost/total_teacher_fwd"] > 0 and records[-1]["cost/total_fake_bwd"] == 4
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000000.png", "step-0000002.png"]
    ckpt = list_checkpoints(out)[-1]
    manifest = read_manifest(ckpt)
    assert manifest["preset"]["method"]["name"] == preset.removeprefix("sd3-").replace("4nfe", "cdm")
    student = load_weights(ckpt, "student")
    changed = [k for k in before if not torch.equal(before[k], student[k])]
    assert changed, "the student's weights did not change"
    assert all(torch.equal(v, transformer_weights(tiny_sd3_dir)[k]) for k, v in before.items()), "teacher changed"


def test_loss_keys_follow_the_method(tiny_sd3_dir, prompt_file, tmp_path, monkeypatch, capsys):
    expected = {"sd3-4nfe": {"ca", "dm", "cdm"}, "sd3-dmd2": {"guided_dm"}}
    for preset, losses in expected.items():
        out = tmp_path / preset
        code, _, err = run_cli(monkeypatch, capsys, "distill", "--preset", preset, "--out", str(out), "--plain",
                               *tiny_overrides(tiny_sd3_dir, prompt_file))
        assert code == 0, err
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        found = {k.split("/")[1] for k in last if k.startswith("loss/")} - {"fake", "student"}
        assert found == losses


MODES = {
    "full": [],
    "lora": ["model.train=lora", "model.lora.rank=4", "model.lora.alpha=8"],
    # a full student beside a LoRA fake teacher, with one simulation per TTUR cycle
    "fake-lora-per-cycle": ["model.fake_teacher=lora", "model.lora.rank=4", "method.merge_decay=1",
                            "method.simulation=per-cycle"],
}


@pytest.mark.parametrize("mode", MODES)
def test_resume_matches_uninterrupted_run(mode, tiny_sd3_dir, prompt_file, tmp_path, monkeypatch, capsys):
    common = tiny_overrides(tiny_sd3_dir, prompt_file, iterations=4) + [a for v in MODES[mode] for a in ("--set", v)]
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_cli(monkeypatch, capsys, "distill", "--preset", "sd3-4nfe", "--out", str(full), "--plain", *common)[0] == 0
    half = [*common, "--set", "train.iterations=2"]
    assert run_cli(monkeypatch, capsys, "distill", "--preset", "sd3-4nfe", "--out", str(split), "--plain", *half)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "distill", "--preset", "sd3-4nfe", "--out", str(split), "--plain",
                           "--resume", *common)
    assert code == 0, err
    a, b = list_checkpoints(full)[-1], list_checkpoints(split)[-1]
    assert a.name == b.name == "step-0000004"
    for which in ("student", "ema"):
        wa, wb = load_weights(a, which), load_weights(b, which)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{which} weights differ after resume"
    ma, mb = read_manifest(a), read_manifest(b)
    assert (ma["student_step"], ma["fake_step"]) == (mb["student_step"], mb["fake_step"]) == (2, 4)
    assert ma["cost_totals"] == mb["cost_totals"]
    iterations = [json.loads(line)["iteration"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4]
    student = load_weights(a, "student")
    if mode == "lora":  # only the adapter is trained and stored; it moved away from its zero init
        assert student and all("lora_" in k for k in student)
        assert any(v.abs().max() > 0 for k, v in student.items() if "lora_B" in k)
    else:
        assert student.keys() == transformer_weights(tiny_sd3_dir).keys()


def test_dry_run_prints_resolved_preset(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "distill", "--preset", "demo", "--dry-run",
                           "--set", "optim.student_lr=2e-5")
    assert code == 0
    assert "student_lr: 2.0e-05" in out and "pretrained: builtin:" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optim.bogus=1"], "optim.bogus: unknown key"),
        (["--set", "optim.student_lr=-1"], "optim.student_lr: Input should be greater than 0"),
        (["--set", "method.schedule.kind=fixed"], "method cdm uses the dynamic schedule"),
        (["--set", "model.pretrained=/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "distill", "--preset", "demo", "--out", str(tmp_path / "r"), *args)
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_empty_prompt_file_exits_2(tiny_sd3_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run_cli(monkeypatch, capsys, "distill", "--preset", "demo", "--out", str(tmp_path / "r"),
                           "--set", f"model.pretrained={tiny_sd3_dir}", "--set", f"data.prompts={empty}")
    assert code == 2 and "empty.txt" in err


def test_unknown_preset_and_existing_run_exit_2(tiny_sd3_dir, prompt_file, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "distill", "--preset", "no-such-preset")
    assert code == 2 and "unknown preset 'no-such-preset'" in err
    out = tmp_path / "run"
    args = ["distill", "--preset", "sd3-ddmd", "--out", str(out), "--plain", *tiny_overrides(tiny_sd3_dir, prompt_file)]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "already holds a run" in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume", "--set", "method.guidance=3")
    assert code == 2 and "method.guidance" in err


# Several processes (DDP and FSDP2 through torchrun and accelerate launch): tests/test_scale.py
