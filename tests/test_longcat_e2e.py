"""LongCat-Image end to end on the tiny pipeline, as for SD3: every LongCat method preset (LoRA) distils, resumes
exactly, exports a self-contained pipeline (merged or `--lora-only`) that plain diffusers loads, and generate and
eval take the export, the run folder and a hub id, with prompt rewriting off."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cdmctl.engine.checkpoint import list_checkpoints, load_weights, read_manifest
from cdmctl.export import INFO_FILE, LORA_WEIGHT_NAME, export_run
from cdmctl.generate import generate, open_model
from tests.test_cli_errors import CDMCTL
from tests.test_cli_walkthrough import _NullCapsys
from tests.test_distill_e2e import run_cli

METHOD_PRESETS = ["longcat-4nfe", "longcat-cdm-fixed", "longcat-ddmd", "longcat-dmd2"]
PROMPTS = ["a red cat", "a blue dog on a bridge", "a tree"]
RANK, ALPHA = 4, 8.0
TURBO = "byliutao/Longcat-Image-Turbo"  # the CDM authors' published LongCat student (their README)


def longcat_overrides(model_dir: Path, prompts: Path, iterations: int = 2, checkpoint_every: int = 2) -> list[str]:
    """A LongCat preset shrunk to the tiny pipeline: same method and LoRA recipe, CPU-sized everything else."""
    values = {
        "model.pretrained": str(model_dir), "model.resolution": 32, "model.precision": "fp32",
        "model.gradient_checkpointing": "false", "model.lora.rank": RANK, "model.lora.alpha": ALPHA,
        "method.schedule.length": "[1, 4]", "train.iterations": iterations, "train.batch_size": 2,
        "optim.student_lr": 1e-3, "optim.fake_lr": 1e-3, "optim.warmup_steps": 1, "run.log_every": 1,
        "run.sample_every": 0, "run.checkpoint_every": checkpoint_every, "data.prompts": str(prompts),
        "data.sample_prompts": "[a red cube, a blue ball]",
    }  # fmt: skip
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def assert_same_pixels(a, b, tolerance: int = 1) -> None:
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= tolerance, f"max difference {diff.max()} levels"


def distil(out: Path, preset: str, model_dir: Path, prompts: Path, *extra: str, monkeypatch=None, capsys=None) -> None:
    mp = monkeypatch or pytest.MonkeyPatch()
    code, _, err = run_cli(mp, capsys or _NullCapsys(), "distill", "--preset", preset, "--out", str(out), "--plain",
                           *longcat_overrides(model_dir, prompts), *extra)  # fmt: skip
    if monkeypatch is None:
        mp.undo()
    assert code == 0, err


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cube\na blue ball\na green tree on a hill\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_longcat_dir: Path, prompt_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("longcat") / "run"
    distil(out, "longcat-4nfe", tiny_longcat_dir, prompt_file)
    return out


@pytest.fixture(scope="module")
def exported(trained_run: Path) -> Path:
    return export_run(trained_run, trained_run.parent / "student")


# -- distill --------------------------------------------------------------------------------------


def assert_trained_lora_only(out: Path, method: str) -> None:
    """A complete run whose checkpoint holds only a trained adapter, with the base model untouched."""
    ckpt = list_checkpoints(out)[-1]
    manifest = read_manifest(ckpt)
    assert ckpt.name == "step-0000002" and manifest["backbone"] == "longcat" and manifest["train"] == "lora"
    assert manifest["preset"]["method"]["name"] == method and manifest["lora"]["rank"] == RANK
    student = load_weights(ckpt, "student")
    assert student and all("lora_" in k for k in student)
    assert any(v.abs().max() > 0 for k, v in student.items() if "lora_B" in k), "the adapter did not train"
    assert any(k.startswith("single_transformer_blocks.") for k in student)  # both block kinds adapted
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and records[-1]["student_step"] == 1


def test_longcat_4nfe_trains_a_lora_student_and_leaves_the_base_alone(trained_run: Path, tiny_longcat_dir: Path):
    assert_trained_lora_only(trained_run, "cdm")
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k.split("/")[1] for k in last if k.startswith("loss/")} - {"fake", "student"} == {"ca", "dm", "cdm"}
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == ["step-0000000.png", "step-0000002.png"]


@pytest.mark.parametrize("preset", METHOD_PRESETS[1:])
def test_every_other_longcat_method_preset_trains(preset, tiny_longcat_dir, prompt_file, tmp_path):
    before = digest(tiny_longcat_dir)
    distil(tmp_path / "run", preset, tiny_longcat_dir, prompt_file)
    method = preset.removeprefix("longcat-")
    assert_trained_lora_only(tmp_path / "run", method)
    assert digest(tiny_longcat_dir) == before, "training changed the teacher's folder"


def test_resume_matches_an_uninterrupted_longcat_run(tiny_longcat_dir, prompt_file, tmp_path, monkeypatch, capsys):
    args = ["distill", "--preset", "longcat-4nfe", "--plain"]
    common = longcat_overrides(tiny_longcat_dir, prompt_file, iterations=2, checkpoint_every=1)
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_cli(monkeypatch, capsys, *args, "--out", str(full), *common)[0] == 0
    assert run_cli(monkeypatch, capsys, *args, "--out", str(split), *common, "--set", "train.iterations=1")[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(split), "--resume", *common)
    assert code == 0, err
    a, b = list_checkpoints(full)[-1], list_checkpoints(split)[-1]
    assert a.name == b.name == "step-0000002"
    for which in ("student", "ema"):
        wa, wb = load_weights(a, which), load_weights(b, which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{which} differs after resume"
    assert read_manifest(a)["cost_totals"] == read_manifest(b)["cost_totals"]


# -- export ---------------------------------------------------------------------------------------


def test_export_is_a_self_contained_pipeline_with_the_merged_student(exported: Path, trained_run: Path,
                                                                     tiny_longcat_dir: Path):  # fmt: skip
    from diffusers import DiffusionPipeline, LongCatImagePipeline

    # plain diffusers; the text processor (prompt rewriting only) needs torchvision to load, so it is left out here
    pipe = DiffusionPipeline.from_pretrained(exported, text_processor=None)
    assert isinstance(pipe, LongCatImagePipeline)
    base = load_file(str(tiny_longcat_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = pipe.transformer.state_dict()
    assert state.keys() == base.keys()  # merged: no LoRA layers left
    adapter = load_weights(list_checkpoints(trained_run)[-1], "ema")
    name = "single_transformer_blocks.0.attn.to_q"
    expected = base[f"{name}.weight"] + (ALPHA / RANK) * adapter[f"{name}.lora_B.weight"] @ adapter[f"{name}.lora_A.weight"]
    torch.testing.assert_close(state[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(state["x_embedder.weight"], base["x_embedder.weight"])  # not a LoRA target
    # every other part is the base model's; the text processor is copied as it is
    assert digest(exported / "text_processor") == digest(tiny_longcat_dir / "text_processor")
    index = json.loads((exported / "model_index.json").read_text())
    assert index["text_processor"] == ["transformers", "Qwen2VLProcessor"]
    assert not [p for p in exported.rglob("*") if p.is_symlink()]
    info = json.loads((exported / INFO_FILE).read_text())
    assert info["backbone"] == "longcat" and info["pipeline_kwargs"] == {"enable_prompt_rewrite": False}
    assert info["steps"] == 4 and info["levels"] == [1.0, 0.75, 0.5, 0.25] and info["max_sequence_length"] is None


def test_the_export_command_says_how_to_load_without_the_text_processor(trained_run: Path, tmp_path: Path,
                                                                         monkeypatch, capsys):  # fmt: skip
    code, out, err = run_cli(monkeypatch, capsys, "export", str(trained_run), "--out", str(tmp_path / "student"))
    assert code == 0, err
    assert "DiffusionPipeline.from_pretrained" in out and "text_processor=None" in out


def test_lora_only_export_loads_on_the_base_and_samples_like_the_merged_one(trained_run: Path, exported: Path,
                                                                           tiny_longcat_dir: Path, tmp_path: Path):  # fmt: skip
    from diffusers import LongCatImagePipeline

    lora = export_run(trained_run, tmp_path / "lora", lora_only=True)
    assert sorted(p.name for p in lora.iterdir()) == [INFO_FILE, LORA_WEIGHT_NAME]
    pipe = LongCatImagePipeline.from_pretrained(tiny_longcat_dir, text_processor=None)
    pipe.transformer.load_lora_adapter(str(lora), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    merged = LongCatImagePipeline.from_pretrained(exported, text_processor=None)

    def sample(p):
        return p("a red cat", sigmas=[1.0, 0.5], guidance_scale=1.0, height=32, width=32, enable_prompt_rewrite=False,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip

    torch.testing.assert_close(sample(pipe), sample(merged), rtol=0, atol=1e-4)
    from_lora = open_model(str(lora), device="cpu")  # cdmctl's own path: base from cdmctl.json + adapter
    assert_same_pixels(from_lora.sample(PROMPTS[:1], [0]), open_model(str(exported), device="cpu").sample(PROMPTS[:1], [0]))


# -- generate and eval ----------------------------------------------------------------------------


def test_generate_is_batch_independent_and_records_the_schedule_and_no_rewriting(exported: Path, tmp_path: Path):
    from cdmctl.backbones import load_backbone

    student = open_model(str(exported), device="cpu")

    def no_rewriting(*args, **kwargs):
        raise AssertionError("prompt rewriting called the text encoder's generate")

    student.pipe.text_encoder.generate = no_rewriting
    seeds = [3, 4, 5]
    together = student.sample(PROMPTS, seeds, batch_size=3)
    assert_same_pixels(together, student.sample(PROMPTS, seeds, batch_size=1))
    assert_same_pixels(together, student.sample(PROMPTS[::-1], seeds[::-1], batch_size=2)[::-1])
    assert pixels(together[:1]).tolist() != pixels(student.sample(PROMPTS[:1], [99])).tolist()
    result = generate(PROMPTS[:2], model=str(exported), out=tmp_path, progress=False)
    text = Image.open(result.images[0]).text
    assert text["enable_prompt_rewrite"] == "false" and int(text["steps"]) == 4
    assert (int(text["height"]), int(text["width"])) == (32, 32)  # the training resolution, from cdmctl.json
    backbone = load_backbone("longcat", str(exported))
    expected = backbone.shift(torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), 32, 32).tolist()
    assert json.loads(text["shifted_sigmas"]) == pytest.approx(expected, abs=1e-6)  # the training levels


def test_a_run_folder_samples_like_its_export_and_compare_teacher_uses_the_base(trained_run: Path, exported: Path,
                                                                               tmp_path: Path):  # fmt: skip
    from_run = open_model(str(trained_run), device="cpu")
    assert_same_pixels(from_run.sample(PROMPTS[:2], [0, 1]), open_model(str(exported), device="cpu").sample(PROMPTS[:2], [0, 1]), 0)
    assert from_run.teacher_defaults() == {"num_inference_steps": 50, "guidance_scale": 4.5}  # LongCat's own
    result = generate(PROMPTS[:2], model=str(exported), out=tmp_path, compare_teacher=True, teacher_steps=3,
                      progress=False)  # fmt: skip
    teacher = sorted((tmp_path / "teacher").glob("0*.png"))
    text = Image.open(teacher[0]).text
    assert text["steps"] == "3" and float(text["guidance_scale"]) == 4.5 and text["enable_prompt_rewrite"] == "false"
    assert Image.open(result.compare).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    assert pixels([Image.open(teacher[0])]).tolist() != pixels([Image.open(result.images[0])]).tolist()


def test_eval_generates_and_scores_the_export(exported: Path, tmp_path: Path, monkeypatch, capsys):
    from tests.test_metrics_clip import write_tiny_clip

    clip, _ = write_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(monkeypatch, capsys, "eval", "--model", str(exported), "--metrics", "clipscore",
                                "--prompts", str(prompts), "--metric-option", f"clipscore.model={clip}", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert len(list((out / "images").glob("*.png"))) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["clipscore"]["n"] == 2 and summary["complete"]
    described = json.loads((out / "student.json").read_text())
    assert described["steps"] == 4 and described["shift"] == "dynamic" and len(described["sigmas"]) == 4


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the hub cache's snapshot of `repo` (what a first download leaves), for offline loading."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def test_a_hub_id_loads_by_the_same_code_path_as_a_folder(exported: Path, tmp_path: Path):
    """The authors' student is published as a plain LongCatImagePipeline (no cdmctl.json): a copy of the tiny
    export without it, in a hub cache, stands in for `byliutao/Longcat-Image-Turbo`, offline."""
    plain = shutil.copytree(exported, tmp_path / "plain")
    (plain / INFO_FILE).unlink()
    fake_hub_cache(tmp_path / "hub", TURBO, plain)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "samples"
    done = subprocess.run([CDMCTL, "generate", "a red cat", "--model", TURBO, "--height", "32", "--width", "32",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = Image.open(out / "0000-seed0.png").text
    assert text["model"] == TURBO and json.loads(text["sigmas"]) == [1.0, 0.75, 0.5, 0.25]  # the authors' schedule
    assert text["enable_prompt_rewrite"] == "false" and float(text["guidance_scale"]) == 1.0
    local = open_model(str(plain), device="cpu").sample(["a red cat"], [0], height=32, width=32)
    assert_same_pixels([Image.open(out / "0000-seed0.png")], local, 0)
