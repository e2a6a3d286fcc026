"""`cdmctl export` on tiny SD3 runs: plain-diffusers loading, exact weights, cdmctl.json, LoRA, atomic refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cdmctl.backbones import load_backbone
from cdmctl.config.schema import Preset
from cdmctl.engine.checkpoint import load_weights, write_checkpoint
from cdmctl.errors import UserError
from cdmctl.export import INFO_FILE, LORA_WEIGHT_NAME, export_run
from cdmctl.runlog import write_preset

LORA_RANK, LORA_ALPHA = 4, 8.0


def make_preset(base: Path, **inference) -> dict:
    preset = Preset.model_validate(
        {"name": "tiny", "model": {"pretrained": str(base), "resolution": 32}, "data": {"prompts": "builtin:demo"},
         "inference": inference or {"steps": 4}}
    )  # fmt: skip
    return preset.model_dump(mode="json")


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def make_full_run(run: Path, base: Path, *, ema: bool = True, iterations: tuple[int, ...] = (4,)) -> Path:
    """A run folder as `cdmctl distill` leaves it: preset.yaml + checkpoints (student and EMA differ)."""
    state = load_backbone("sd3", str(base)).transformer.state_dict()
    preset = make_preset(base)
    write_preset(run, preset)
    for it in iterations:
        tensors = {"student": perturbed(state, it)}
        if ema:
            tensors["ema"] = perturbed(state, 1000 + it)
        manifest = {"student_step": it // 2, "backbone": "sd3", "base_model": str(base), "revision": None,
                    "train": "full", "lora": None, "preset": preset}  # fmt: skip
        write_checkpoint(run, it, manifest, tensors)
    return run


def make_lora_run(run: Path, base: Path) -> Path:
    """A LoRA run: student/ema hold peft adapter state dicts (get_peft_model_state_dict format)."""
    from peft import LoraConfig, get_peft_model_state_dict

    backbone = load_backbone("sd3", str(base))
    transformer = backbone.transformer
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=backbone.lora_target_modules())
    transformer.add_adapter(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    student = get_peft_model_state_dict(transformer)
    preset = make_preset(base)
    write_preset(run, preset)
    lora = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": None}
    manifest = {"student_step": 2, "backbone": "sd3", "base_model": str(base), "revision": None,
                "train": "lora", "lora": lora, "preset": preset}  # fmt: skip
    write_checkpoint(run, 4, manifest, {"student": student, "ema": perturbed(student, 3, 0.01)})
    return run


@pytest.fixture(scope="module")
def full_run(tiny_sd3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_full_run(tmp_path_factory.mktemp("full") / "run", tiny_sd3_dir, iterations=(2, 4))


@pytest.fixture(scope="module")
def lora_run(tiny_sd3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("lora") / "run", tiny_sd3_dir)


def transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_export_loads_with_plain_diffusers_and_holds_the_ema_weights(full_run: Path, tmp_path: Path, tiny_sd3_dir):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    out = export_run(full_run, tmp_path / "student")
    assert isinstance(DiffusionPipeline.from_pretrained(out), StableDiffusion3Pipeline)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    ema = load_weights(full_run / "checkpoints" / "step-0000004", "ema")
    state = pipe.transformer.state_dict()
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    base_vae = DiffusionPipeline.from_pretrained(tiny_sd3_dir).vae.state_dict()
    assert all(torch.equal(v, base_vae[k]) for k, v in pipe.vae.state_dict().items())  # copied from the base
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_cdmctl_json_records_schedule_guidance_source_and_preset(full_run: Path, tmp_path: Path, tiny_sd3_dir):
    out = export_run(full_run, tmp_path / "student", checkpoint=2, ema=False)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["steps"] == 4 and info["levels"] == [1.0, 0.75, 0.5, 0.25]
    assert info["guidance_scale"] == 1.0 and info["kind"] == "pipeline" and info["weights"] == "student"
    assert info["source"] == {"run": str(full_run.resolve()), "checkpoint": "step-0000002", "iteration": 2,
                              "student_step": 1}  # fmt: skip
    assert info["base_model"] == str(tiny_sd3_dir) and info["backbone"] == "sd3" and info["dtype"] == "fp32"
    assert info["preset"]["inference"]["steps"] == 4 and info["resolution"] == 32
    assert info["max_sequence_length"] is None  # preset model.text_length: backbone default


def test_no_ema_exports_the_raw_student_which_differs_from_the_ema(full_run: Path, tmp_path: Path):
    ckpt = full_run / "checkpoints" / "step-0000004"
    state = transformer_state(export_run(full_run, tmp_path / "raw", ema=False))
    student, ema = load_weights(ckpt, "student"), load_weights(ckpt, "ema")
    assert all(torch.equal(state[k], student[k]) for k in student)
    assert not all(torch.equal(state[k], ema[k]) for k in ema)


def test_export_casts_every_component_to_the_requested_dtype(full_run: Path, tmp_path: Path):
    out = export_run(full_run, tmp_path / "bf16", dtype="bf16")
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        with safe_open(str(out / part), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / INFO_FILE).read_text())["dtype"] == "bf16"


def test_overwrite_replaces_a_non_empty_folder_and_an_empty_one_is_used_as_is(full_run: Path, tmp_path: Path):
    out = tmp_path / "student"
    out.mkdir()
    export_run(full_run, out)  # empty folder: fine without --overwrite
    (out / "stale.txt").write_text("old")
    export_run(full_run, out, overwrite=True, ema=False)
    assert not (out / "stale.txt").exists() and json.loads((out / INFO_FILE).read_text())["weights"] == "student"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-checkpoint", "no checkpoint in"),
        ("missing-step", "no checkpoint at step 99"),
        ("not-empty", "exists and is not empty"),
        ("no-ema", "no EMA weights"),
        ("lora-only-full", "--lora-only needs a LoRA run"),
        ("bad-dtype", "unknown dtype"),
        ("out-is-the-run", "would replace the run folder"),
        ("out-in-new-folder", "no checkpoint at step 99"),
    ],
)
def test_refusals_are_user_errors_that_write_nothing(case, expected, full_run: Path, tiny_sd3_dir, tmp_path: Path):
    run, out, kwargs = full_run, tmp_path / "out", {}
    if case == "no-checkpoint":
        run = tmp_path / "empty-run"
        run.mkdir()
    elif case == "missing-step":
        kwargs["checkpoint"] = 99
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no-ema":
        run = make_full_run(tmp_path / "run-no-ema", tiny_sd3_dir, ema=False)
    elif case == "lora-only-full":
        kwargs["lora_only"] = True
    elif case == "bad-dtype":
        kwargs["dtype"] = "int8"
    elif case == "out-is-the-run":
        out, kwargs["overwrite"] = full_run.parent, True  # the folder holding the run
    elif case == "out-in-new-folder":
        out, kwargs["checkpoint"] = tmp_path / "new" / "deeper" / "out", 99  # no parent folders left behind
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=expected) as err:
        export_run(run, out, **kwargs)
    assert err.value.fix  # every refusal says how to fix it
    assert sorted(p.name for p in tmp_path.iterdir()) == before and leftovers(tmp_path) == []
    if case == "not-empty":
        assert (out / "keep.txt").read_text() == "mine"
    if case == "no-ema":
        assert "--no-ema" in err.value.fix


def test_a_failure_midway_leaves_no_half_written_export(full_run: Path, tmp_path: Path, monkeypatch):
    import cdmctl.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "export_info", broken)  # fails after the pipeline folder was written
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(full_run, tmp_path / "student")
    assert list(tmp_path.iterdir()) == []


def test_lora_run_exports_merged_weights(lora_run: Path, tmp_path: Path, tiny_sd3_dir):
    state = transformer_state(export_run(lora_run, tmp_path / "merged", ema=False))
    base = transformer_state(tiny_sd3_dir)
    adapter = load_weights(lora_run / "checkpoints" / "step-0000004", "student")
    name = "transformer_blocks.0.attn.to_q"
    lora_a, lora_b = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
    expected = base[f"{name}.weight"] + (LORA_ALPHA / LORA_RANK) * lora_b @ lora_a
    torch.testing.assert_close(state[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert state.keys() == base.keys()  # merged: no LoRA layers left
    assert torch.equal(state["pos_embed.proj.weight"], base["pos_embed.proj.weight"])  # not a LoRA target


def test_lora_only_export_loads_with_load_lora_weights_and_matches_the_merged_export(
    lora_run: Path, tmp_path: Path, tiny_sd3_dir
):
    from diffusers import StableDiffusion3Pipeline

    lora_dir = export_run(lora_run, tmp_path / "lora", lora_only=True)
    assert sorted(p.name for p in lora_dir.iterdir()) == [INFO_FILE, LORA_WEIGHT_NAME]
    assert json.loads((lora_dir / INFO_FILE).read_text())["kind"] == "lora"
    merged = StableDiffusion3Pipeline.from_pretrained(export_run(lora_run, tmp_path / "merged"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.load_lora_weights(lora_dir)

    def sample(p):
        gen = torch.Generator().manual_seed(0)
        return p("a red cat", sigmas=[1.0, 0.5], guidance_scale=1.0, generator=gen, output_type="pt").images

    torch.testing.assert_close(sample(pipe), sample(merged), rtol=0, atol=1e-4)


def test_peft_prefixed_and_named_adapter_keys_are_accepted():
    from cdmctl.export import adapter_state

    one = torch.ones(1)
    state = {"base_model.model.blocks.0.to_q.lora_A.weight": one, "blocks.1.to_q.lora_B.weight": one,
             "blocks.2.to_q.lora_A.default.weight": one, "blocks.2.to_q.base_layer.weight": one}  # fmt: skip
    expected = ["blocks.0.to_q.lora_A.weight", "blocks.1.to_q.lora_B.weight", "blocks.2.to_q.lora_A.weight"]
    assert sorted(adapter_state(state)) == expected


def test_a_run_trained_without_time_shift_exports_a_scheduler_without_it(tiny_sd3_dir, tmp_path: Path):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    state = load_backbone("sd3", str(tiny_sd3_dir)).transformer.state_dict()
    preset = make_preset(tiny_sd3_dir)
    preset["method"]["schedule"]["time_shift"] = False
    del preset["inference"]["time_shift"]  # a checkpoint written before inference.time_shift: its training decides
    manifest = {"student_step": 1, "backbone": "sd3", "base_model": str(tiny_sd3_dir), "train": "full",
                "preset": preset}  # fmt: skip
    write_checkpoint(run, 2, manifest, {"student": state})
    out = export_run(run, tmp_path / "out", ema=False)
    assert DiffusionPipeline.from_pretrained(out).scheduler.config.shift == 1.0
    assert os.listdir(tmp_path) and leftovers(tmp_path) == []


def export_with(tmp_path: Path, base: Path, preset: dict) -> Path:
    """Export a one-checkpoint run of the base's own weights trained with resolved `preset`."""
    run = tmp_path / "run"
    state = load_backbone("sd3", str(base)).transformer.state_dict()
    manifest = {"student_step": 1, "backbone": "sd3", "base_model": str(base), "train": "full", "preset": preset}
    write_checkpoint(run, 2, manifest, {"student": state})
    return export_run(run, tmp_path / "out", ema=False)


def exported_sigmas(out: Path, steps: int | None = None) -> list[float]:
    """The levels plain diffusers steps through with the export's scheduler and cdmctl.json's levels (or the
    level rule's for another step count)."""
    from diffusers import DiffusionPipeline

    from cdmctl.samplers import scheduler_sigmas, unshifted_levels

    info = json.loads((out / INFO_FILE).read_text())
    levels = info["levels"] if steps is None else unshifted_levels(info["level_rule"], steps)
    return scheduler_sigmas(DiffusionPipeline.from_pretrained(out).scheduler, levels)


def test_inference_time_shift_false_exports_a_scheduler_that_samples_the_levels_as_given(tiny_sd3_dir, tmp_path):
    preset = make_preset(tiny_sd3_dir, steps=4, time_shift=False)
    out = export_with(tmp_path, tiny_sd3_dir, preset)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["time_shift"] is False and info["level_rule"] == "uniform" and "shift 1" in info["usage"]
    assert exported_sigmas(out) == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-6)  # no shift: as given


def test_the_default_export_samples_through_the_models_shift(tiny_sd3_dir, tmp_path):
    k = json.loads((tiny_sd3_dir / "scheduler" / "scheduler_config.json").read_text())["shift"]  # the tiny SD3's own
    assert k != 1
    out = export_with(tmp_path, tiny_sd3_dir, make_preset(tiny_sd3_dir, steps=2))
    assert json.loads((out / INFO_FILE).read_text())["time_shift"] is True
    assert exported_sigmas(out) == pytest.approx([1.0, k * 0.5 / (1 + (k - 1) * 0.5)], abs=1e-6)


def test_a_tbcm_export_samples_the_authors_trigflow_levels_with_fresh_noise(tiny_sd3_dir, tmp_path):
    from diffusers import DiffusionPipeline

    preset = Preset.model_validate(
        {"name": "tiny", "model": {"pretrained": str(tiny_sd3_dir), "resolution": 32},
         "data": {"prompts": "builtin:demo"}, "method": {"name": "tbcm"}, "inference": {"steps": 2}}
    ).model_dump(mode="json")  # fmt: skip
    out = export_with(tmp_path, tiny_sd3_dir, preset)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["sampler"] == "consistency" and info["level_rule"] == "trigflow" and info["time_shift"] is False
    assert DiffusionPipeline.from_pretrained(out).scheduler.config.stochastic_sampling
    # TrigFlow t = [pi/2, 1.0] -> flow level s = sin t / (sin t + cos t): 1 and 0.841471 / 1.381773 = 0.608979
    assert exported_sigmas(out) == pytest.approx([1.0, 0.608979], abs=1e-6)
    # 4 steps: t = pi/2, 3pi/8, pi/4, pi/8 -> s = tan t / (1 + tan t) = 1, 1/sqrt 2, 1/2, 1 - 1/sqrt 2
    assert exported_sigmas(out, 4) == pytest.approx([1.0, 0.707107, 0.5, 0.292893], abs=1e-6)
