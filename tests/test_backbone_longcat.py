"""The LongCat-Image adapter on a tiny random-weight pipeline of the real classes: the factory, loading and its
refusals, prompts and position ids, packed velocity, the pipeline's own dynamic shift, decode, LoRA over one base."""

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

from cdmctl.backbones import FAMILIES, family_for_pipeline, load_backbone, resolve_source
from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.backbones.longcat import LongCatBackbone, image_mu
from cdmctl.errors import UserError

LEVELS = [1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.02]
PROMPTS = ["a cat saying hello", "a red house by the sea"]


@pytest.fixture(scope="module")
def backbone(tiny_longcat_dir: Path) -> LongCatBackbone:
    return LongCatBackbone.from_pretrained(str(tiny_longcat_dir))


@pytest.fixture(scope="module")
def cond(backbone: LongCatBackbone) -> Conditioning:
    return backbone.encode_prompts(PROMPTS)


def _latents(backbone: LongCatBackbone, batch: int, seed: int = 0, height: int = 32, width: int = 32) -> torch.Tensor:
    shape = backbone.latent_shape(height, width)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _pack(x: torch.Tensor) -> torch.Tensor:
    from diffusers import LongCatImagePipeline

    return LongCatImagePipeline._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])


def _digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _call(pipe, **kwargs):
    """The pipeline as cdmctl samples it: no prompt rewriting, guidance 1 unless given."""
    return pipe(**{"prompt": PROMPTS, "guidance_scale": 1.0, "enable_prompt_rewrite": False, **kwargs})


# -- the tiny pipeline factory --------------------------------------------------------------------


def test_tiny_folder_loads_with_the_pipeline_classes_and_generates(tiny_longcat_dir: Path):
    from diffusers import DiffusionPipeline, LongCatImagePipeline

    generic = DiffusionPipeline.from_pretrained(tiny_longcat_dir, text_processor=None)
    assert isinstance(generic, LongCatImagePipeline)
    pipe = LongCatImagePipeline.from_pretrained(tiny_longcat_dir, text_processor=None)
    pipe.set_progress_bar_config(disable=True)
    image = _call(pipe, prompt="A cat saying 'Hello, world!' 42", num_inference_steps=2, height=32, width=48,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 32, 48, 3) and (image >= 0).all() and (image <= 1).all()
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer_max_length == 512  # as the real model


def test_tiny_folder_has_a_text_processor_folder_in_the_real_layout(tiny_longcat_dir: Path):
    from transformers import Qwen2Tokenizer

    index = json.loads((tiny_longcat_dir / "model_index.json").read_text())
    assert index["text_processor"] == ["transformers", "Qwen2VLProcessor"]
    folder = tiny_longcat_dir / "text_processor"
    config = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor" and config["image_processor_type"] == "Qwen2VLImageProcessor"
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    assert tokenizer("a cat").input_ids == Qwen2Tokenizer.from_pretrained(tiny_longcat_dir / "tokenizer")("a cat").input_ids


def test_with_torchvision_the_whole_folder_loads_including_its_text_processor(tiny_longcat_dir: Path):
    pytest.importorskip("torchvision", reason="transformers builds a Qwen2VLProcessor only with torchvision")
    from diffusers import LongCatImagePipeline

    pipe = LongCatImagePipeline.from_pretrained(tiny_longcat_dir)
    assert type(pipe.text_processor).__name__ == "Qwen2VLProcessor"


def test_tiny_folder_is_small_and_deterministic(tiny_longcat_dir: Path, tmp_path: Path):
    from cdmctl.backbones.tiny.longcat import write_tiny_longcat

    assert sum(p.stat().st_size for p in tiny_longcat_dir.rglob("*") if p.is_file()) < 3 * 2**20
    state = torch.random.get_rng_state()
    again = write_tiny_longcat(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _digest(again) == _digest(tiny_longcat_dir)


def test_tokenizer_knows_the_chat_template_tokens_and_any_ascii(backbone: LongCatBackbone):
    tok = backbone.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1, special
    ids = tok("Zebra-42 ~ {quirky} prompt: xylophone & caf\u00e9? #1", add_special_tokens=False).input_ids
    assert len(ids) > 10 and tok.decode(ids) == "Zebra-42 ~ {quirky} prompt: xylophone & caf\u00e9? #1"  # byte-level


def test_the_factory_command_writes_a_loadable_folder(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cdmctl.backbones.tiny", "longcat", str(tmp_path / "lc")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "lc") and "Warning" not in done.stderr
    assert isinstance(load_backbone("longcat", str(tmp_path / "lc")), LongCatBackbone)


def test_the_factory_command_refuses_unknown_families_and_used_folders(tmp_path: Path, capsys):
    from cdmctl.backbones.tiny import main

    assert main(["flux9", str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: no tiny pipeline for family 'flux9'") and "longcat" in err and "sd3" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert main(["sd3", str(tmp_path / "used")]) == 2 and "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]


def test_builtin_tiny_longcat_resolves_and_loads_as_a_backbone():
    folder = Path(resolve_source("builtin:tiny-longcat"))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "LongCatImagePipeline"
    backbone = load_backbone("longcat", "builtin:tiny-longcat")
    assert isinstance(backbone, Backbone) and backbone.family == "longcat" and backbone.source == str(folder)
    assert "longcat" in FAMILIES and family_for_pipeline("LongCatImagePipeline") == "longcat"
    assert family_for_pipeline("StableDiffusion3Pipeline") == "sd3" and family_for_pipeline("FluxPipeline") is None


# -- loading errors -------------------------------------------------------------------------------


def test_an_sd3_folder_given_to_the_longcat_family_names_the_right_family(tiny_sd3_dir: Path):
    with pytest.raises(UserError) as err:
        load_backbone("longcat", str(tiny_sd3_dir))
    assert "is a StableDiffusion3Pipeline" in err.value.message and "not a LongCat-Image pipeline" in err.value.message
    assert "model.backbone: sd3" in err.value.fix


def test_a_longcat_folder_given_to_the_sd3_family_names_the_right_family(tiny_longcat_dir: Path):
    with pytest.raises(UserError) as err:
        load_backbone("sd3", str(tiny_longcat_dir))
    assert "is a LongCatImagePipeline" in err.value.message and "model.backbone: longcat" in err.value.fix


def test_incomplete_folder_is_refused_but_the_unused_text_processor_may_be_missing(tiny_longcat_dir: Path,
                                                                                   tmp_path: Path):  # fmt: skip
    folder = shutil.copytree(tiny_longcat_dir, tmp_path / "copy")
    shutil.rmtree(folder / "text_processor")
    assert isinstance(LongCatBackbone.from_pretrained(str(folder)), LongCatBackbone)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(UserError, match="incomplete: no text_encoder subfolder"):
        LongCatBackbone.from_pretrained(str(folder))


def test_a_text_length_is_refused_and_a_missing_folder_points_at_the_builtin(tmp_path: Path):
    with pytest.raises(UserError, match="always encodes 512 text tokens"):
        LongCatBackbone.from_pretrained("builtin-unused", max_sequence_length=128)
    with pytest.raises(UserError) as err:
        LongCatBackbone.from_pretrained(str(tmp_path / "no" / "model"))
    assert "does not exist" in err.value.message and "builtin:tiny-longcat" in err.value.fix


# -- prompts --------------------------------------------------------------------------------------


def test_encode_prompts_is_the_pipelines_encoding_with_batch_first_position_ids(backbone: LongCatBackbone,
                                                                                cond: Conditioning):  # fmt: skip
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    emb, ids = cond.tensors["encoder_hidden_states"], cond.tensors["txt_ids"]
    assert emb.shape == (2, 512, backbone.transformer.config.joint_attention_dim) and not emb.requires_grad
    assert ids.shape == (2, 512, 3) and ids.dtype == torch.long
    expected = prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=512)
    assert all(torch.equal(row.float(), expected) for row in ids)
    embeds, _ = backbone.pipeline().encode_prompt(prompt=PROMPTS)
    torch.testing.assert_close(emb, embeds)
    alone = backbone.encode_prompts(PROMPTS[1:])  # padding and the attention mask: batching changes nothing
    torch.testing.assert_close(alone.tensors["encoder_hidden_states"][0], emb[1], atol=1e-5, rtol=1e-5)


def test_the_empty_prompt_is_the_pipelines_negative_prompt(backbone: LongCatBackbone, cond: Conditioning):
    null = backbone.encode_prompts([""])
    pipe = backbone.pipeline()
    # what __call__ encodes for CFG when no negative prompt is given: encode_prompt(prompt="")
    negative, negative_ids = pipe.encode_prompt(prompt="")
    torch.testing.assert_close(null.tensors["encoder_hidden_states"], negative)
    assert torch.equal(null.tensors["txt_ids"][0].float(), negative_ids)
    assert not torch.allclose(null.tensors["encoder_hidden_states"][0], cond.tensors["encoder_hidden_states"][0])


def test_position_ids_survive_a_cast_to_bf16(cond: Conditioning):
    cast = cond.to(dtype=torch.bfloat16)
    assert cast.tensors["encoder_hidden_states"].dtype == torch.bfloat16
    assert torch.equal(cast.tensors["txt_ids"], cond.tensors["txt_ids"])  # bf16 would round 257 to 256


def test_release_text_encoders_then_encode_raises_but_pipeline_reloads(tiny_longcat_dir: Path):
    backbone = LongCatBackbone.from_pretrained(str(tiny_longcat_dir))
    before = backbone.encode_prompts(["a cat"])
    backbone.release_text_encoders()
    with pytest.raises(RuntimeError, match="release_text_encoders"):
        backbone.encode_prompts(["a cat"])
    pipe = backbone.pipeline()
    assert pipe.text_encoder is not None and pipe.transformer is backbone.transformer and pipe.text_processor is None
    torch.testing.assert_close(pipe.encode_prompt(prompt=["a cat"])[0], before.tensors["encoder_hidden_states"])
    assert backbone.text_encoder is None  # reloaded for that pipeline only


# -- velocity -------------------------------------------------------------------------------------


def test_velocity_packs_calls_the_transformer_and_unpacks(backbone: LongCatBackbone, cond: Conditioning):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    x, s = _latents(backbone, 2, height=64, width=32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = backbone.velocity(backbone.transformer, x, s, cond)
        img_ids = prepare_pos_ids(modality_id=1, type="image", start=(512, 512), height=4, width=2)
        direct = backbone.transformer(hidden_states=_pack(x), timestep=s, encoder_hidden_states=cond.tensors[
            "encoder_hidden_states"], txt_ids=cond.tensors["txt_ids"][0].float(), img_ids=img_ids, return_dict=False)[0]  # fmt: skip
    assert v.shape == x.shape
    torch.testing.assert_close(_pack(v), direct)


@pytest.mark.parametrize("size", [(32, 32), (64, 32)])
def test_velocity_and_shift_match_one_euler_step_of_the_pipeline(backbone: LongCatBackbone, cond: Conditioning, size):
    """The pipeline at unshifted level s runs the model at shift(s) and steps to 0: x0 = x - shift(s) * v."""
    pipe, (height, width) = backbone.pipeline(), size
    x, level = _latents(backbone, 2, seed=3, height=height, width=width), 0.6
    out = _call(pipe, latents=_pack(x), sigmas=[level], height=height, width=width, output_type="latent").images
    shifted = backbone.shift(torch.full((2,), level), height, width)
    with torch.no_grad():
        v = backbone.velocity(backbone.transformer, x, shifted, cond)
    torch.testing.assert_close(out, _pack(x - shifted.view(-1, 1, 1, 1) * v), atol=1e-5, rtol=1e-5)


def test_velocity_takes_a_level_per_sample(backbone: LongCatBackbone, cond: Conditioning):
    x, s = _latents(backbone, 2, seed=1), torch.tensor([0.15, 0.95])
    with torch.no_grad():
        both = backbone.velocity(backbone.transformer, x, s, cond)
        for i in range(2):
            alone = backbone.velocity(backbone.transformer, x[i : i + 1], s[i : i + 1], cond.index(slice(i, i + 1)))
            torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(both[0], backbone.velocity(backbone.transformer, x[:1], s[1:], cond.index([0]))[0])


def test_velocity_casts_to_the_model_dtype_and_refuses_mixed_position_ids(backbone: LongCatBackbone,
                                                                          cond: Conditioning):  # fmt: skip
    half = copy.deepcopy(backbone.transformer).to(torch.bfloat16)
    with torch.no_grad():
        v = backbone.velocity(half, _latents(backbone, 2), torch.tensor([0.5, 0.5]), cond.to(dtype=torch.bfloat16))
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()
    odd = Conditioning({**cond.tensors, "txt_ids": cond.tensors["txt_ids"].clone()})
    odd.tensors["txt_ids"][1, 0, 1] = 7
    with pytest.raises(ValueError, match="differ within a batch"):
        backbone.velocity(backbone.transformer, _latents(backbone, 2), torch.tensor([0.5, 0.5]), odd)


def test_velocity_through_a_peft_lora_wrapper(backbone: LongCatBackbone, cond: Conditioning):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(backbone.transformer), LoraConfig(r=2, target_modules=backbone.lora_target_modules()))
    x, s = _latents(backbone, 2), torch.tensor([0.4, 0.7])
    with torch.no_grad():  # LoRA B starts at zero: same output as the base model
        torch.testing.assert_close(backbone.velocity(model, x, s, cond), backbone.velocity(backbone.transformer, x, s, cond))


def test_lora_targets_name_linear_layers_of_both_block_kinds(backbone: LongCatBackbone):
    names = dict(backbone.transformer.named_modules())
    for target in backbone.lora_target_modules():
        hits = [m for n, m in names.items() if n.endswith("." + target)]
        assert hits and all(isinstance(m, torch.nn.Linear) for m in hits), target
    assert any(n.startswith("single_transformer_blocks.") and n.endswith("attn.to_q") for n in names)
    dual, single = backbone.block_classes()
    assert all(isinstance(b, dual) for b in backbone.transformer.transformer_blocks)
    assert all(isinstance(b, single) for b in backbone.transformer.single_transformer_blocks)


def test_lora_student_and_fake_teacher_are_adapters_over_the_teachers_own_tensors(backbone: LongCatBackbone):
    from cdmctl.config import load_preset
    from cdmctl.networks import build_networks

    preset = load_preset("longcat-4nfe", ["model.lora.rank=2", "model.gradient_checkpointing=false"])
    student, teacher, fake = build_networks(copy.deepcopy(backbone), preset, torch.float32)
    base = {n: p.data_ptr() for n, p in teacher.named_parameters()}
    assert not any("lora_" in n for n in base) and not any(p.requires_grad for p in teacher.parameters())
    for module in (student, fake):
        frozen = {n.replace(".base_layer", ""): p for n, p in module.named_parameters() if "lora_" not in n}
        assert {n: p.data_ptr() for n, p in frozen.items()} == base  # the same memory: no copy of the base
        assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters())
    assert {n for n, _ in student.named_parameters()} == {n for n, _ in fake.named_parameters()}


# -- shift, latents, decode -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (64, 32), (1024, 1024)])
def test_shift_is_the_schedulers_with_the_pipelines_mu(backbone: LongCatBackbone, size):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    height, width = size
    seq_len = (height // 16) * (width // 16)
    mu = image_mu(backbone.scheduler.config, backbone.vae_scale_factor, height, width)
    assert mu == calculate_shift(seq_len)  # the scheduler config holds the pipeline's own fallbacks
    scheduler = copy.deepcopy(backbone.scheduler)
    scheduler.set_timesteps(sigmas=LEVELS, mu=mu)
    torch.testing.assert_close(backbone.shift(torch.tensor(LEVELS), height, width), scheduler.sigmas[:-1],
                               atol=1e-6, rtol=0)  # fmt: skip
    if size == (1024, 1024):  # 4096 packed tokens: mu = max_shift, about a static shift of e^1.15
        assert mu == pytest.approx(1.15)
        torch.testing.assert_close(backbone.shift(torch.tensor([0.5]), 1024, 1024),
                                   torch.tensor([3.1582 / 4.1582]), atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("size", [(32, 32), (48, 96)])
def test_shift_equals_the_sigmas_a_pipeline_call_sets(backbone: LongCatBackbone, size):
    pipe, (height, width) = backbone.pipeline(), size
    _call(pipe, prompt=PROMPTS[:1], sigmas=LEVELS, height=height, width=width, output_type="latent")
    torch.testing.assert_close(backbone.shift(torch.tensor(LEVELS), height, width), pipe.scheduler.sigmas[:-1],
                               atol=1e-6, rtol=0)  # fmt: skip
    assert LongCatBackbone.scheduler_kwargs(pipe, height, width, len(LEVELS)) == {"mu": image_mu(pipe.scheduler.config, 8, height, width)}


def test_latent_shape_and_sizes_that_do_not_fit(backbone: LongCatBackbone):
    assert backbone.latent_shape(64, 32) == (16, 8, 4)
    with pytest.raises(UserError, match="multiples of 16"):
        backbone.latent_shape(40, 32)


def test_decode_matches_the_pipeline_decoder(backbone: LongCatBackbone):
    pipe = backbone.pipeline()
    x = _latents(backbone, 1, seed=5)
    decoded = _call(pipe, prompt=PROMPTS[:1], latents=_pack(x), sigmas=[1e-6], height=32, width=32, output_type="pt")
    images = backbone.decode(x)
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    # One step from level ~0 barely moves x, so the pipeline decodes (almost) x itself.
    torch.testing.assert_close(images, decoded.images, atol=1e-3, rtol=0)


def test_family_traits_for_sampling():
    import inspect

    from diffusers import LongCatImagePipeline

    call = inspect.signature(LongCatImagePipeline.__call__).parameters
    assert call["enable_prompt_rewrite"].default is True  # the pipeline's default, which cdmctl turns off
    assert LongCatBackbone.sampling_kwargs() == {"enable_prompt_rewrite": False}
    teacher = LongCatBackbone.teacher_sampling()
    assert teacher == {k: call[k].default for k in ("num_inference_steps", "guidance_scale")}  # 50 and 4.5
    assert LongCatBackbone.unused_parts == ("text_processor",)
