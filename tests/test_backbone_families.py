"""The FLUX.2 [klein], Qwen-Image and Z-Image adapters, each on a tiny random-weight pipeline of the real classes,
against the family's own diffusers pipeline (as tests/test_backbone_longcat.py does for LongCat): the factory,
loading and its refusals, prompt encoding and the unconditional prompt, velocity through one pipeline Euler step,
the scheduler's own shift, decode, CFG convention, LoRA over one base."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdmctl.backbones import (
    FAMILIES,
    adapter_class,
    family_for_pipeline,
    load_backbone,
    resolve_source,
)
from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.errors import UserError
from tests.families import SPECS, FamilySpec

LEVELS = [1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.02]
PROMPTS = ["a cat saying hello", "a red house by the sea"]


@pytest.fixture(scope="module", params=sorted(SPECS))
def spec(request) -> FamilySpec:
    return SPECS[request.param]


@pytest.fixture(scope="module")
def folder(spec: FamilySpec, tiny_family_dir) -> Path:
    return tiny_family_dir(spec.family)


@pytest.fixture(scope="module")
def backbone(spec: FamilySpec, folder: Path):
    return load_backbone(spec.family, str(folder))


@pytest.fixture(scope="module")
def cond(backbone) -> Conditioning:
    return backbone.encode_prompts(PROMPTS)


def _latents(backbone, batch: int, seed: int = 0, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(batch, *backbone.latent_shape(height, width), generator=torch.Generator().manual_seed(seed))


def _digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _call(spec: FamilySpec, pipe, **kwargs):
    """The pipeline without CFG (its own arguments for that), as cdmctl samples a student. Prompt lists are copied:
    ZImagePipeline rewrites a prompt list it is given in place (with its chat template)."""
    kwargs = {"prompt": list(PROMPTS), **spec.no_cfg, **kwargs}
    if isinstance(kwargs["prompt"], list):
        kwargs["prompt"] = list(kwargs["prompt"])
    return pipe(**kwargs)


# -- the tiny pipeline factory --------------------------------------------------------------------


def test_tiny_folder_loads_with_the_pipeline_classes_and_generates(spec: FamilySpec, folder: Path):
    from diffusers import DiffusionPipeline

    generic = DiffusionPipeline.from_pretrained(folder)
    assert type(generic).__name__ == spec.pipeline
    pipe = spec.pipeline_class().from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = _call(spec, pipe, prompt="A cat saying 'Hello, world!' 42", num_inference_steps=2, height=32, width=48,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 32, 48, 3) and (image >= 0).all() and (image <= 1).all()
    assert pipe.vae_scale_factor == 8  # as the real models


def test_tiny_folder_is_small_and_deterministic(spec: FamilySpec, folder: Path, tmp_path: Path):
    import importlib

    module, _, name = spec.writer.partition(":")
    writer = getattr(importlib.import_module(module), name)
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 3 * 2**20
    state = torch.random.get_rng_state()
    again = writer(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _digest(again) == _digest(folder)


def test_the_factory_command_writes_a_loadable_folder(spec: FamilySpec, tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cdmctl.backbones.tiny", spec.family, str(tmp_path / "t")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "t") and "Warning" not in done.stderr
    assert isinstance(load_backbone(spec.family, str(tmp_path / "t")), adapter_class(spec.family))


def test_builtin_resolves_registers_and_loads_as_a_backbone(spec: FamilySpec):
    folder = Path(resolve_source(f"builtin:tiny-{spec.family}"))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == spec.pipeline
    backbone = load_backbone(spec.family, f"builtin:tiny-{spec.family}")
    assert isinstance(backbone, Backbone) and backbone.family == spec.family and backbone.source == str(folder)
    assert spec.family in FAMILIES and family_for_pipeline(spec.pipeline) == spec.family
    assert adapter_class(spec.family).builtin == f"builtin:tiny-{spec.family}"


# -- loading errors -------------------------------------------------------------------------------


def test_another_familys_folder_names_the_right_family(spec: FamilySpec, folder: Path, tiny_sd3_dir: Path):
    with pytest.raises(UserError) as err:
        load_backbone(spec.family, str(tiny_sd3_dir))
    assert "is a StableDiffusion3Pipeline" in err.value.message and "model.backbone: sd3" in err.value.fix
    with pytest.raises(UserError) as err:
        load_backbone("sd3", str(folder))
    assert f"is a {spec.pipeline}" in err.value.message and f"model.backbone: {spec.family}" in err.value.fix


def test_incomplete_or_missing_folders_are_one_line_errors(spec: FamilySpec, folder: Path, tmp_path: Path):
    copied = shutil.copytree(folder, tmp_path / "copy")
    shutil.rmtree(copied / "text_encoder")
    with pytest.raises(UserError, match="incomplete: no text_encoder subfolder"):
        load_backbone(spec.family, str(copied))
    with pytest.raises(UserError) as err:
        load_backbone(spec.family, str(tmp_path / "no" / "model"))
    assert "does not exist" in err.value.message and f"builtin:tiny-{spec.family}" in err.value.fix
    with pytest.raises(UserError, match="text_length does not apply"):
        load_backbone(spec.family, str(folder), max_sequence_length=64)


# -- prompts --------------------------------------------------------------------------------------


def test_encode_prompts_is_the_pipelines_encoding(spec: FamilySpec, backbone, cond: Conditioning):
    expected = spec.encoding(backbone.pipeline(), PROMPTS)
    assert set(cond.tensors) == set(expected) and len(cond) == 2
    for name, tensor in expected.items():
        got = cond.tensors[name]
        assert got.shape == tensor.shape and got.dtype == tensor.dtype and not got.requires_grad, name
        torch.testing.assert_close(got, tensor, rtol=0, atol=0)


def test_batching_prompts_changes_no_prompts_conditioning(backbone, cond: Conditioning):
    """Padding and masks: a prompt encoded alone gives its rows of the batch (what the embedding cache relies on)."""
    with torch.no_grad():
        alone = backbone.encode_prompts(PROMPTS[1:])
        x, s = _latents(backbone, 1, seed=2), torch.tensor([0.6])
        v_alone = backbone.velocity(backbone.transformer, x, s, alone)
        v_batch = backbone.velocity(backbone.transformer, x, s, cond.index([1]))
    torch.testing.assert_close(v_alone, v_batch, atol=1e-5, rtol=1e-4)


def test_the_empty_prompt_is_the_pipelines_unconditional_prompt(spec: FamilySpec, backbone, cond: Conditioning):
    null = backbone.encode_prompts([""])
    for name, tensor in spec.encoding(backbone.pipeline(), [""]).items():
        torch.testing.assert_close(null.tensors[name], tensor, rtol=0, atol=0)
    with torch.no_grad():
        x, s = _latents(backbone, 1, seed=4), torch.tensor([0.5])
        v_null = backbone.velocity(backbone.transformer, x, s, null)
        assert not torch.allclose(v_null, backbone.velocity(backbone.transformer, x, s, cond.index([0])))


def test_integer_tensors_survive_a_cast_to_bf16(cond: Conditioning):
    cast = cond.to(dtype=torch.bfloat16)
    for name, tensor in cond.tensors.items():
        if not tensor.is_floating_point():
            assert torch.equal(cast.tensors[name], tensor), name  # position ids, masks, lengths


def test_release_text_encoders_then_encode_raises_but_pipeline_reloads(spec: FamilySpec, folder: Path):
    backbone = load_backbone(spec.family, str(folder))
    before = backbone.encode_prompts(["a cat"])
    backbone.release_text_encoders()
    with pytest.raises(RuntimeError, match="release_text_encoders"):
        backbone.encode_prompts(["a cat"])
    pipe = backbone.pipeline()
    assert pipe.text_encoder is not None and pipe.transformer is backbone.transformer
    for name, tensor in spec.encoding(pipe, ["a cat"]).items():
        torch.testing.assert_close(before.tensors[name], tensor)


# -- velocity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (64, 32)])
def test_velocity_and_shift_match_one_euler_step_of_the_pipeline(spec: FamilySpec, backbone, cond, size):
    """The pipeline at unshifted level s runs the model at shift(s) and steps to 0: x0 = x - shift(s) * v."""
    pipe, (height, width) = backbone.pipeline(), size
    x, level = _latents(backbone, 2, seed=3, height=height, width=width), 0.6
    out = _call(spec, pipe, latents=spec.latents_in(pipe, x), sigmas=[level], num_inference_steps=1, height=height,
                width=width, output_type="latent").images  # fmt: skip
    shifted = backbone.shift(torch.full((2,), level), height, width, 1)
    with torch.no_grad():
        v = backbone.velocity(backbone.transformer, x, shifted, cond)
    assert v.shape == x.shape
    expected = spec.latents_out(pipe, x - shifted.view(-1, *[1] * (x.ndim - 1)) * v)
    torch.testing.assert_close(out.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)


def test_cfg_convention_matches_the_pipelines_guided_step(spec: FamilySpec, backbone, cond):
    """`guidance_kwargs(g)` makes the pipeline step with uncond + g (cond - uncond), the empty prompt unconditional:
    the CFG the engine's teacher uses in CA and guided DM (Qwen-Image's pipeline then rescales it per token)."""
    pipe, g = backbone.pipeline(), 3.0
    x, level = _latents(backbone, 2, seed=6), 0.7
    kwargs = {**type(backbone).sampling_kwargs(), **type(backbone).guidance_kwargs(g)}
    if isinstance(kwargs.get("negative_prompt"), str):  # one per prompt, as cdmctl's sampling passes it
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * 2
    out = pipe(prompt=list(PROMPTS), latents=spec.latents_in(pipe, x), sigmas=[level], num_inference_steps=1,
               height=32, width=32, output_type="latent", **kwargs).images  # fmt: skip
    shifted = backbone.shift(torch.full((2,), level), 32, 32, 1)
    null = backbone.encode_prompts([""]).expand(2)
    with torch.no_grad():
        vc = backbone.velocity(backbone.transformer, x, shifted, cond)
        vu = backbone.velocity(backbone.transformer, x, shifted, null)
    v = vu + g * (vc - vu)
    if spec.cfg_renorm:  # in the pipeline's packed layout: each token's guided velocity gets the conditional norm
        vc_p, v_p = spec.latents_in(pipe, vc), spec.latents_in(pipe, v)
        v_p = v_p * (vc_p.norm(dim=-1, keepdim=True) / v_p.norm(dim=-1, keepdim=True))
        expected = spec.latents_in(pipe, x) - shifted.view(-1, 1, 1) * v_p
    else:
        expected = spec.latents_out(pipe, x - shifted.view(-1, 1, 1, 1) * v)
    torch.testing.assert_close(out.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
    assert type(backbone).guidance_kwargs(1.0) == spec.no_cfg


def test_velocity_takes_a_level_per_sample(backbone, cond: Conditioning):
    x, s = _latents(backbone, 2, seed=1), torch.tensor([0.15, 0.95])
    with torch.no_grad():
        both = backbone.velocity(backbone.transformer, x, s, cond)
        for i in range(2):
            alone = backbone.velocity(backbone.transformer, x[i : i + 1], s[i : i + 1], cond.index(slice(i, i + 1)))
            torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(both[0], backbone.velocity(backbone.transformer, x[:1], s[1:], cond.index([0]))[0])


def test_velocity_casts_to_the_model_dtype(backbone, cond: Conditioning):
    half = copy.deepcopy(backbone.transformer).to(torch.bfloat16)
    with torch.no_grad():
        v = backbone.velocity(half, _latents(backbone, 2), torch.tensor([0.5, 0.5]), cond.to(dtype=torch.bfloat16))
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()


def test_velocity_through_a_peft_lora_wrapper(backbone, cond: Conditioning):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(backbone.transformer), LoraConfig(r=2, target_modules=backbone.lora_target_modules()))
    x, s = _latents(backbone, 2), torch.tensor([0.4, 0.7])
    with torch.no_grad():  # LoRA B starts at zero: same output as the base model
        torch.testing.assert_close(backbone.velocity(model, x, s, cond), backbone.velocity(backbone.transformer, x, s, cond))


def test_lora_targets_are_linear_layers_in_every_block(backbone):
    names = dict(backbone.transformer.named_modules())
    hits = set()
    for target in backbone.lora_target_modules():
        matched = [n for n in names if n == target or n.endswith("." + target)]
        assert matched and all(isinstance(names[n], torch.nn.Linear) for n in matched), target
        hits.update(matched)
    blocks = backbone.block_classes()
    block_names = [n for n, m in names.items() if isinstance(m, tuple(blocks))]
    assert block_names and all(any(h.startswith(b + ".") for h in hits) for b in block_names)  # every block adapted


def test_lora_student_and_fake_teacher_are_adapters_over_the_teachers_own_tensors(spec: FamilySpec, backbone):
    from cdmctl.config import load_preset
    from cdmctl.networks import build_networks

    preset = load_preset(spec.preset, ["model.train=lora", "model.lora.rank=2", "model.gradient_checkpointing=false"])
    student, teacher, fake = build_networks(copy.deepcopy(backbone), preset, torch.float32)
    base = {n: p.data_ptr() for n, p in teacher.named_parameters()}
    assert not any("lora_" in n for n in base) and not any(p.requires_grad for p in teacher.parameters())
    for module in (student, fake):
        frozen = {n.replace(".base_layer", ""): p for n, p in module.named_parameters() if "lora_" not in n}
        assert {n: p.data_ptr() for n, p in frozen.items()} == base  # the same memory: no copy of the base
        assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters())


# -- shift, latents, decode -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (48, 96), (1024, 1024)])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_shift_is_the_schedulers_with_the_pipelines_arguments(spec: FamilySpec, backbone, size, steps):
    height, width = size
    pipe = backbone.pipeline()
    scheduler = copy.deepcopy(backbone.scheduler)
    scheduler.set_timesteps(sigmas=LEVELS, **type(backbone).scheduler_kwargs(pipe, height, width, steps))
    shifted = backbone.shift(torch.tensor(LEVELS), height, width, steps)
    torch.testing.assert_close(shifted, scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    assert bool((shifted[1:] < torch.tensor(LEVELS[1:])).logical_not().all())  # shifts towards noise
    whole = backbone.shift(torch.tensor(LEVELS), height, width)  # no step count: the levels are the schedule
    torch.testing.assert_close(whole, backbone.shift(torch.tensor(LEVELS), height, width, len(LEVELS)))


@pytest.mark.parametrize("size", [(32, 32), (48, 96)])
def test_shift_equals_the_sigmas_a_pipeline_call_sets(spec: FamilySpec, backbone, size):
    pipe, (height, width) = backbone.pipeline(), size
    _call(spec, pipe, prompt=PROMPTS[:1], sigmas=LEVELS, num_inference_steps=len(LEVELS), height=height, width=width,
          output_type="latent")  # fmt: skip
    torch.testing.assert_close(backbone.shift(torch.tensor(LEVELS), height, width), pipe.scheduler.sigmas[:-1],
                               atol=1e-6, rtol=0)  # fmt: skip
    if spec.linspace_default:  # plain diffusers, `num_inference_steps=4` alone: the student's training schedule
        _call(spec, pipe, prompt=PROMPTS[:1], num_inference_steps=4, height=height, width=width, output_type="latent")
        four = torch.tensor([1.0, 0.75, 0.5, 0.25])
        torch.testing.assert_close(backbone.shift(four, height, width), pipe.scheduler.sigmas[:-1], atol=1e-6, rtol=0)


def test_latent_shape_and_sizes_that_do_not_fit(spec: FamilySpec, backbone):
    channels, cell = spec.latent
    assert backbone.latent_shape(64, 32) == (channels, 64 // cell, 32 // cell)
    with pytest.raises(UserError, match="multiples of 16"):
        backbone.latent_shape(40, 32)


def test_decode_matches_the_pipeline_decoder(spec: FamilySpec, backbone):
    pipe = backbone.pipeline()
    x = _latents(backbone, 1, seed=5)
    decoded = _call(spec, pipe, prompt=PROMPTS[:1], latents=spec.latents_in(pipe, x), sigmas=[1e-6],
                    num_inference_steps=1, height=32, width=32, output_type="pt")  # fmt: skip
    images = backbone.decode(x)
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    # One step from level ~0 barely moves x, so the pipeline decodes (almost) x itself.
    torch.testing.assert_close(images, decoded.images, atol=1e-3, rtol=0)


def test_teacher_sampling_is_the_pipelines_own_defaults(spec: FamilySpec):
    adapter = adapter_class(spec.family)
    teacher = adapter.teacher_sampling()
    assert teacher["num_inference_steps"] == spec.call_default("num_inference_steps")
    assert teacher["guidance_scale"] - spec.guidance_offset == spec.call_default(spec.guidance_arg)
    assert adapter.guidance_kwargs(teacher["guidance_scale"])[spec.guidance_arg] == spec.call_default(spec.guidance_arg)


# -- Qwen-Image: the terminal stretch of its published scheduler config ----------------------------


def test_qwenimage_drops_the_terminal_stretch_that_would_move_a_students_last_level(tiny_family_dir):
    """The published config stretches every schedule to end at 0.02; the adapter trains and samples without that."""
    from diffusers import QwenImagePipeline

    from cdmctl.backbones.qwenimage import QwenImageBackbone

    folder = tiny_family_dir("qwenimage")
    base = QwenImagePipeline.from_pretrained(folder)
    base.set_progress_bar_config(disable=True)
    assert base.scheduler.config.shift_terminal == 0.02  # the tiny folder holds the published config
    four = [1.0, 0.75, 0.5, 0.25]
    base(prompt=["a cat"], sigmas=four, num_inference_steps=4, height=32, width=32, output_type="latent")
    assert float(base.scheduler.sigmas[-2]) == pytest.approx(0.02)  # what plain diffusers would do to a student
    backbone = load_backbone("qwenimage", str(folder))
    assert backbone.scheduler.config.shift_terminal is None and backbone.pipeline().scheduler is backbone.scheduler
    shifted = backbone.shift(torch.tensor(four), 32, 32)
    assert float(shifted[-1]) > 0.1 and bool((shifted >= torch.tensor(four)).all())  # the dynamic shift alone
    assert QwenImageBackbone.student_scheduler(base.scheduler).config.shift_terminal is None
    assert base.scheduler.config.shift_terminal == 0.02  # a copy: the base pipeline's own is left alone


# -- FLUX.2 [klein]: the base only ----------------------------------------------------------------


def test_a_step_distilled_klein_is_refused_as_a_teacher(tiny_family_dir, tmp_path: Path):
    """BFL's step-distilled klein folders (and cdmctl's klein exports) say is_distilled: their pipeline ignores
    guidance, so there is no CFG to distil; the base is the teacher."""
    folder = shutil.copytree(tiny_family_dir("flux2-klein"), tmp_path / "distilled")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["is_distilled"] is False
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    with pytest.raises(UserError) as err:
        load_backbone("flux2-klein", str(folder))
    assert "step-distilled" in err.value.message and "FLUX.2-klein-base-4B" in err.value.fix
