"""FLUX.2 [klein], Qwen-Image and Z-Image end to end on their tiny pipelines, as for SD3 and LongCat: every method
distils a few iterations with the family's recipe (the family's CDM preset, and its losses and schedule switched to
CDM w/ fixed schedule, Decoupled DMD and DMD2), resume equals an uninterrupted run, the export is a self-contained
pipeline that plain diffusers loads with the student in it, and `cdmctl generate` (through the installed entry
point) and `cdmctl eval` sample it with the family's no-CFG arguments and training schedule."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cdmctl.backbones import adapter_class, load_backbone
from cdmctl.engine.checkpoint import list_checkpoints, load_weights, read_manifest
from cdmctl.export import INFO_FILE, LORA_WEIGHT_NAME, export_run
from cdmctl.generate import open_model
from tests.families import SPECS, FamilySpec
from tests.test_cli_errors import CDMCTL
from tests.test_cli_walkthrough import _NullCapsys
from tests.test_distill_e2e import run_cli
from tests.test_longcat_e2e import assert_same_pixels, digest, pixels

PROMPTS = ["a red cat", "a blue dog on a bridge", "a tree"]
RANK, ALPHA = 4, 8.0
FIXED = "{kind: fixed, levels: [1.0, 0.75, 0.5, 0.25], time_shift: true}"
# the other methods, as the sd3-/longcat- method presets differ from the CDM preset: losses and schedule
METHODS = {
    "cdm-fixed": ["method.name=cdm-fixed", f"method.schedule={FIXED}"],
    "ddmd": ["method.name=ddmd", "method.losses={ca: 1, dm: 1, cdm: 0, guided_dm: 0}", f"method.schedule={FIXED}"],
    "dmd2": ["method.name=dmd2", "method.losses={ca: 0, dm: 0, cdm: 0, guided_dm: 1}", f"method.schedule={FIXED}"],
}
LOSSES = {"cdm": {"ca", "dm", "cdm"}, "cdm-fixed": {"ca", "dm", "cdm"}, "ddmd": {"ca", "dm"}, "dmd2": {"guided_dm"}}


def overrides(model_dir: Path, prompts: Path, iterations: int = 2, checkpoint_every: int = 2) -> list[str]:
    """A family preset shrunk to the tiny pipeline: same method and training mode, CPU-sized everything else."""
    values = {
        "model.pretrained": str(model_dir), "model.resolution": 32, "model.precision": "fp32",
        "model.gradient_checkpointing": "false", "model.lora.rank": RANK, "model.lora.alpha": ALPHA,
        "method.schedule.length": "[1, 4]", "train.iterations": iterations, "train.batch_size": 2,
        "optim.student_lr": 1e-3, "optim.fake_lr": 1e-3, "optim.warmup_steps": 1, "run.log_every": 1,
        "run.sample_every": 0, "run.checkpoint_every": checkpoint_every, "data.prompts": str(prompts),
        "data.sample_prompts": "[a red cube, a blue ball]",
    }  # fmt: skip
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def distil(out: Path, spec: FamilySpec, model_dir: Path, prompts: Path, *extra: str) -> None:
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = run_cli(mp, _NullCapsys(), "distill", "--preset", spec.preset, "--out", str(out), "--plain",
                               *overrides(model_dir, prompts), *extra)  # fmt: skip
    finally:
        mp.undo()
    assert code == 0, err


def settings(path: Path) -> dict:
    """A saved config without what saving again adds or changes (`_name_or_path`, `_diffusers_version`, the dtype
    of nested configs, ...)."""

    def clean(config):
        if not isinstance(config, dict):
            return config
        return {k: clean(v) for k, v in config.items() if not k.startswith("_") and k not in ("dtype", "torch_dtype")}

    return clean(json.loads(path.read_text()))


def base_transformer(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((model_dir / "transformer").glob("*.safetensors"))))


@pytest.fixture(scope="module", params=sorted(SPECS))
def spec(request) -> FamilySpec:
    return SPECS[request.param]


@pytest.fixture(scope="module")
def folder(spec: FamilySpec, tiny_family_dir) -> Path:
    return tiny_family_dir(spec.family)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cube\na blue ball\na green tree on a hill\n")
    return path


@pytest.fixture(scope="module")
def trained_run(spec: FamilySpec, folder: Path, prompt_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(spec.family) / "run"
    distil(out, spec, folder, prompt_file)
    return out


@pytest.fixture(scope="module")
def exported(trained_run: Path) -> Path:
    return export_run(trained_run, trained_run.parent / "student")


def assert_trained(out: Path, spec: FamilySpec, model_dir: Path, method: str) -> None:
    """A complete 2-iteration run of `method` whose student moved and whose teacher's folder is untouched."""
    from cdmctl.config import load_preset

    ckpt = list_checkpoints(out)[-1]
    manifest = read_manifest(ckpt)
    assert ckpt.name == "step-0000002" and manifest["backbone"] == spec.family
    assert manifest["preset"]["method"]["name"] == method
    train = load_preset(spec.preset).model.train
    assert manifest["train"] == train
    student, base = load_weights(ckpt, "student"), base_transformer(model_dir)
    if train == "lora":
        assert student and all("lora_" in k for k in student)
        assert any(v.abs().max() > 0 for k, v in student.items() if "lora_B" in k), "the adapter did not train"
    else:
        assert student.keys() == base.keys()
        assert [k for k in base if not torch.equal(base[k], student[k])], "the student's weights did not change"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and records[-1]["student_step"] == 1
    assert {k.split("/")[1] for k in records[-1] if k.startswith("loss/")} - {"fake", "student"} == LOSSES[method]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in records[-1].items() if k.startswith("loss/"))


# -- distill --------------------------------------------------------------------------------------


def test_the_family_preset_distils(spec: FamilySpec, trained_run: Path, folder: Path):
    assert_trained(trained_run, spec, folder, "cdm")
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == ["step-0000000.png", "step-0000002.png"]


def test_cached_prompt_embeddings_train_the_student_that_live_encoding_trains(spec: FamilySpec, trained_run: Path,
                                                                             folder: Path, prompt_file: Path,
                                                                             tmp_path: Path):  # fmt: skip
    """The embedding cache keeps the family's conditioning (position ids, masks, caption lengths) as encoded."""
    distil(tmp_path / "live", spec, folder, prompt_file, "--set", "data.cache_embeddings=false")
    cached = load_weights(list_checkpoints(trained_run)[-1], "student")
    live = load_weights(list_checkpoints(tmp_path / "live")[-1], "student")
    assert cached.keys() == live.keys()
    for name in cached:  # batches of other prompts pad differently in the text encoder: float rounding at most
        torch.testing.assert_close(live[name], cached[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_other_method_distils(spec: FamilySpec, method: str, folder: Path, prompt_file: Path, tmp_path: Path):
    before = digest(folder)
    distil(tmp_path / "run", spec, folder, prompt_file, *[a for v in METHODS[method] for a in ("--set", v)])
    assert_trained(tmp_path / "run", spec, folder, method)
    assert digest(folder) == before, "training changed the teacher's folder"


def test_resume_matches_an_uninterrupted_run(spec: FamilySpec, folder: Path, prompt_file: Path, tmp_path: Path,
                                             monkeypatch, capsys):  # fmt: skip
    args = ["distill", "--preset", spec.preset, "--plain"]
    common = overrides(folder, prompt_file, iterations=2, checkpoint_every=1)
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


def test_export_is_a_self_contained_pipeline_with_the_student(spec: FamilySpec, exported: Path, trained_run: Path,
                                                              folder: Path):  # fmt: skip
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(exported)  # plain diffusers, nothing of cdmctl
    assert type(pipe).__name__ == spec.pipeline
    base, state = base_transformer(folder), pipe.transformer.state_dict()
    assert state.keys() == base.keys()  # merged: no LoRA layers left
    ema = load_weights(list_checkpoints(trained_run)[-1], "ema")
    if read_manifest(list_checkpoints(trained_run)[-1])["train"] == "lora":
        name = next(k.removesuffix(".lora_A.weight") for k in sorted(ema) if k.endswith(".lora_A.weight"))
        delta = (ALPHA / RANK) * ema[f"{name}.lora_B.weight"] @ ema[f"{name}.lora_A.weight"]
        torch.testing.assert_close(state[f"{name}.weight"], base[f"{name}.weight"] + delta, rtol=1e-5, atol=1e-6)
    else:
        assert all(torch.equal(state[k], ema[k]) for k in base) and any(not torch.equal(state[k], base[k]) for k in base)
    for part in ("text_encoder", "vae"):  # the base's weights, and its configs up to saving metadata
        weights = {k: v for k, v in digest(folder / part).items() if k.endswith(".safetensors")}
        assert {k: v for k, v in digest(exported / part).items() if k.endswith(".safetensors")} == weights, part
        for config in (folder / part).glob("*.json"):
            assert settings(exported / part / config.name) == settings(config), f"{part}/{config.name}"
    # the scheduler the adapter trained with (Qwen-Image's without its terminal stretch; the others the base's)
    trained = {k: v for k, v in load_backbone(spec.family, str(folder)).scheduler.config.items() if not k.startswith("_")}
    assert settings(exported / "scheduler" / "scheduler_config.json") == trained
    # the tokenizer is saved again (transformers adds loading flags to its config): it must tokenize the same
    base_pipe = spec.pipeline_class().from_pretrained(folder)
    text = "A cat saying 'Hello, world!' 42"
    assert pipe.tokenizer(text).input_ids == base_pipe.tokenizer(text).input_ids
    assert pipe.tokenizer.chat_template == base_pipe.tokenizer.chat_template
    assert not [p for p in exported.rglob("*") if p.is_symlink()]
    adapter = adapter_class(spec.family)
    index = json.loads((exported / "model_index.json").read_text())
    assert {k: index.get(k) for k in adapter.student_pipeline_config()} == adapter.student_pipeline_config()
    if spec.family == "flux2-klein":  # marked like BFL's step-distilled klein: plain calls never run CFG
        assert index["is_distilled"] is True and pipe.config.is_distilled
    info = json.loads((exported / INFO_FILE).read_text())
    assert info["backbone"] == spec.family and info["guidance_kwargs"] == spec.no_cfg == adapter.guidance_kwargs(1.0)
    assert info["steps"] == 4 and info["levels"] == [1.0, 0.75, 0.5, 0.25]


def test_lora_only_export_loads_on_the_base_and_samples_like_the_merged_one(spec: FamilySpec, folder: Path,
                                                                           prompt_file: Path, tmp_path: Path):  # fmt: skip
    run = tmp_path / "run"
    distil(run, spec, folder, prompt_file, "--set", "model.train=lora")
    lora = export_run(run, tmp_path / "lora", lora_only=True)
    merged = export_run(run, tmp_path / "merged")
    assert sorted(p.name for p in lora.iterdir()) == [INFO_FILE, LORA_WEIGHT_NAME]
    pipe = spec.pipeline_class().from_pretrained(folder)
    pipe.transformer.load_lora_adapter(str(lora), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    whole = spec.pipeline_class().from_pretrained(merged)
    pipe.scheduler = whole.scheduler  # the export's scheduler (Qwen-Image: the base's without its terminal stretch)

    def sample(p):
        p.set_progress_bar_config(disable=True)
        return p(prompt="a red cat", sigmas=[1.0, 0.5], num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **spec.no_cfg).images  # fmt: skip

    torch.testing.assert_close(sample(pipe), sample(whole), rtol=0, atol=1e-4)
    from_lora = open_model(str(lora), device="cpu")  # cdmctl's own path: base from cdmctl.json + adapter
    assert_same_pixels(from_lora.sample(PROMPTS[:1], [0]), open_model(str(merged), device="cpu").sample(PROMPTS[:1], [0]))


# -- generate and eval ----------------------------------------------------------------------------


def test_generate_is_batch_independent_and_samples_the_training_schedule(spec: FamilySpec, exported: Path,
                                                                        folder: Path):  # fmt: skip
    student = open_model(str(exported), device="cpu")
    seeds = [3, 4, 5]
    together = student.sample(PROMPTS, seeds, batch_size=3)
    assert_same_pixels(together, student.sample(PROMPTS, seeds, batch_size=1))
    assert_same_pixels(together, student.sample(PROMPTS[::-1], seeds[::-1], batch_size=2)[::-1])
    assert pixels(together[:1]).tolist() != pixels(student.sample(PROMPTS[:1], [99])).tolist()
    # the pipeline's own schedule for those arguments is the adapter's shift of the training levels
    backbone = load_backbone(spec.family, str(folder))  # the base's scheduler: the export's (a klein export is marked distilled)
    levels = [1.0, 0.75, 0.5, 0.25]
    student.sample(PROMPTS[:1], [0])
    sigmas = student.pipe.scheduler.sigmas[:-1].double()
    torch.testing.assert_close(sigmas, backbone.shift(torch.tensor(levels, dtype=torch.float64), 32, 32), atol=1e-6,
                               rtol=0)  # fmt: skip
    assert student.shifted(levels) == pytest.approx(sigmas.tolist(), abs=1e-6)


def test_the_generate_command_samples_the_export_and_compares_with_the_teacher(spec: FamilySpec, exported: Path,
                                                                             folder: Path, tmp_path: Path):  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "samples"
    done = subprocess.run([CDMCTL, "generate", "a red cat", "a tree", "--model", str(exported), "--out", str(out),
                           "--compare-teacher", "--teacher-steps", "2"], capture_output=True, text=True, env=env, check=False,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = Image.open(out / "0000-seed0.png").text
    assert int(text["steps"]) == 4 and float(text["guidance_scale"]) == 1.0
    assert (int(text["height"]), int(text["width"])) == (32, 32)  # the training resolution, from cdmctl.json
    backbone = load_backbone(spec.family, str(folder))  # the base's scheduler: the export's (a klein export is marked distilled)
    expected = backbone.shift(torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), 32, 32).tolist()
    assert json.loads(text["shifted_sigmas"]) == pytest.approx(expected, abs=1e-6)
    teacher = Image.open(out / "teacher" / "0000-seed0.png").text
    defaults = adapter_class(spec.family).teacher_sampling()
    assert teacher["steps"] == "2" and float(teacher["guidance_scale"]) == defaults["guidance_scale"]
    assert pixels([Image.open(out / "teacher" / "0000-seed0.png")]).tolist() != pixels(
        [Image.open(out / "0000-seed0.png")]).tolist()
    local = open_model(str(exported), device="cpu").sample(["a red cat"], [0])
    assert_same_pixels([Image.open(out / "0000-seed0.png")], local, 0)


def test_eval_generates_and_scores_the_export(exported: Path, tmp_path: Path, monkeypatch, capsys):
    from tests.test_metrics_clip import write_tiny_clip

    clip, _ = write_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "eval"
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", str(exported), "--metrics", "clipscore",
                           "--prompts", str(prompts), "--metric-option", f"clipscore.model={clip}", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert len(list((out / "images").glob("*.png"))) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["clipscore"]["n"] == 2 and summary["complete"]
    described = json.loads((out / "student.json").read_text())
    assert described["steps"] == 4 and len(described["sigmas"]) == 4
