"""The README walk-through through the real CLI: distill -> export -> plain diffusers -> generate; CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.test_distill_e2e import run_cli, tiny_overrides


@pytest.fixture(scope="module")
def trained_run(tiny_sd3_dir, tmp_path_factory) -> Path:
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path_factory.mktemp("walk") / "run"
    mp = pytest.MonkeyPatch()
    code, _, err = run_cli(mp, _NullCapsys(), "distill", "--preset", "sd3-4nfe", "--out", str(out), "--plain",
                           *tiny_overrides(tiny_sd3_dir, prompts))
    mp.undo()
    assert code == 0, err
    return out


class _NullCapsys:
    """run_cli wants capsys; a module fixture has none, and the output is not needed here."""

    def readouterr(self):
        return type("Out", (), {"out": "", "err": ""})()


def test_distill_export_diffusers_generate(trained_run, tmp_path, monkeypatch, capsys):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    exported = tmp_path / "student"
    code, out, err = run_cli(monkeypatch, capsys, "export", str(trained_run), "--out", str(exported))
    assert code == 0, err
    assert "DiffusionPipeline.from_pretrained" in out
    pipe = DiffusionPipeline.from_pretrained(exported)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert not any(p.is_symlink() for p in exported.rglob("*"))

    images = tmp_path / "images"
    code, out, err = run_cli(monkeypatch, capsys, "generate", "a red cube", "a blue ball", "--model", str(exported),
                             "-n", "2", "--batch-size", "3", "--out", str(images))
    assert code == 0, err
    pngs = sorted(images.glob("0*.png"))
    assert len(pngs) == 4 and (images / "grid.png").is_file()
    first = Image.open(pngs[0])
    assert first.size == (32, 32)
    assert first.text["prompt"] == "a red cube" and first.text["seed"] == "0" and first.text["steps"] == "4"

    # the run folder itself is a model too, and its EMA checkpoint is what was exported
    again = tmp_path / "again"
    code, _, err = run_cli(monkeypatch, capsys, "generate", "a red cube", "--model", str(trained_run),
                           "--out", str(again))
    assert code == 0, err
    a = torch.tensor(list(Image.open(again / "0000-seed0.png").getdata()), dtype=torch.float32)
    b = torch.tensor(list(first.getdata()), dtype=torch.float32)
    assert (a - b).abs().max() <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{run}", "--out", "{tmp}/x", "--checkpoint", "7"], "no checkpoint at step 7"),
        (["export", "{tmp}/no-run", "--out", "{tmp}/y"], "no checkpoint"),
        (["export", "{run}", "--out", "{busy}"], "--overwrite"),
        (["generate", "a cat", "--model", "{tmp}/nothing-here"], "not found"),
        (["generate", "--model", "{run}", "--out", "{tmp}/z"], "prompt"),
    ],
)
def test_cli_refusals_exit_2(args, message, trained_run, tmp_path, monkeypatch, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    filled = [a.format(run=trained_run, tmp=tmp_path, busy=busy) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, *filled)
    assert code == 2, err
    assert message in " ".join(err.split())
    assert (busy / "keep.txt").read_text() == "mine"


def test_eval_scores_a_run_resumes_and_compares(trained_run, tmp_path, monkeypatch, capsys):
    import json

    from tests.test_metrics_clip import write_tiny_clip

    clip, _ = write_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red cube\na blue ball\na green tree\n")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(trained_run), "--metrics", "pickscore", "clipscore", "--prompts", str(prompts),
            "--metric-option", f"pickscore.model={clip}", "--metric-option", f"pickscore.processor={clip}",
            "--metric-option", f"clipscore.model={clip}",
            "--out", str(out), "--batch-size", "2"]
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert len(list((out / "images").glob("*.png"))) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"pickscore", "clipscore"} and summary["complete"]
    assert all(m["n"] == 3 and m["nonfinite"] == 0 for m in summary["metrics"].values())
    assert 0 <= summary["metrics"]["clipscore"]["mean"] <= 100
    assert "pickscore" in stdout and (out / "summary.md").is_file()
    scored = (out / "scores.jsonl").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    code, _, err = run_cli(monkeypatch, capsys, *args)  # everything done: nothing is redone
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == before
    assert (out / "scores.jsonl").read_text() == scored
    code, stdout, err = run_cli(monkeypatch, capsys, "eval", "--compare", str(out), str(out))
    assert code == 0, err
    assert "pickscore" in stdout
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", str(trained_run), "--metrics", "nonsense",
                           "--prompts", str(prompts), "--out", str(tmp_path / "e2"))
    assert code == 2 and "unknown metric 'nonsense'" in err
