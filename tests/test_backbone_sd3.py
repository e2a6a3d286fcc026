"""The SD3 adapter on a tiny random-weight pipeline of the real classes: loading, prompts, velocity, shift, decode."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from cdmctl.backbones import FAMILIES, load_backbone, register_builtin, resolve_source
from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.backbones.sd3 import SD3Backbone
from cdmctl.backbones.tiny import BUILTINS, ensure_builtin, write_tiny_sd3
from cdmctl.errors import UserError

LEVELS = [1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.02]


@pytest.fixture(scope="module")
def backbone(tiny_sd3_dir: Path) -> SD3Backbone:
    return SD3Backbone.from_pretrained(str(tiny_sd3_dir))


@pytest.fixture(scope="module")
def cond(backbone: SD3Backbone) -> Conditioning:
    return backbone.encode_prompts(["a cat saying hello", "a red house by the sea"])


def _latents(backbone: SD3Backbone, batch: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, *backbone.latent_shape(size, size), generator=torch.Generator().manual_seed(seed))


def _digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _embeds(cond: Conditioning, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """Conditioning as the pipeline's keyword arguments (guidance 1: one conditional call per step)."""
    return {
        "prompt_embeds": cond.tensors["encoder_hidden_states"][rows],
        "pooled_prompt_embeds": cond.tensors["pooled_projections"][rows],
        "guidance_scale": 1.0,
    }


# -- the tiny pipeline factory --------------------------------------------------------------------


def test_tiny_folder_loads_with_both_pipeline_classes_and_generates(tiny_sd3_dir: Path):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    generic = DiffusionPipeline.from_pretrained(tiny_sd3_dir)
    assert isinstance(generic, StableDiffusion3Pipeline)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("A cat saying 'Hello, world!' 42", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    image = out.images
    assert image.shape == (1, 32, 32, 3)
    assert (image >= 0).all() and (image <= 1).all()


def test_tiny_folder_is_small(tiny_sd3_dir: Path):
    size = sum(p.stat().st_size for p in tiny_sd3_dir.rglob("*") if p.is_file())
    assert size < 5 * 2**20


def test_write_tiny_sd3_is_deterministic_for_a_seed_and_leaves_global_rng_alone(tiny_sd3_dir: Path, tmp_path: Path):
    state = torch.random.get_rng_state()
    again = write_tiny_sd3(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _digest(again) == _digest(tiny_sd3_dir)
    other = _digest(write_tiny_sd3(tmp_path / "other", seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != _digest(tiny_sd3_dir)[weights]


def test_tokenizers_cover_any_ascii_prompt(backbone: SD3Backbone):
    prompt = "Zebra-42 ~ {quirky} prompt: xylophone & café? #1"
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = backbone._tokenizers[name]
        ids = tok(prompt).input_ids
        unknown = [i for i in ids if i == tok.unk_token_id and tok.unk_token_id != tok.eos_token_id]
        assert len(unknown) <= 1, name  # only the non-ASCII 'é' may be unknown (T5 has no byte fallback)
        assert len(ids) > 10


def test_ensure_builtin_builds_once_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("CDMCTL_CACHE", str(tmp_path))
    calls = []

    def builder(folder: Path) -> None:
        calls.append(folder)
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "Dummy"}))

    monkeypatch.setitem(BUILTINS, "counting", builder)
    first = ensure_builtin("counting")
    assert ensure_builtin("counting") == first and len(calls) == 1
    assert first.parent.parent == tmp_path and (first / "model_index.json").is_file()
    assert calls[0] != first  # written elsewhere, then renamed into place
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folder left behind


def test_failed_builtin_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("CDMCTL_CACHE", str(tmp_path))

    def broken(folder: Path) -> None:
        folder.mkdir()
        (folder / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(BUILTINS, "broken", broken)
    with pytest.raises(RuntimeError):
        ensure_builtin("broken")
    assert list((tmp_path / "builtin").iterdir()) == []


def test_builtin_source_resolves_to_a_loadable_folder():
    folder = Path(resolve_source("builtin:tiny-sd3"))
    assert (folder / "model_index.json").is_file()
    assert resolve_source("builtin:tiny-sd3") == str(folder)
    hub_id = "stabilityai/stable-diffusion-3-medium-diffusers"
    assert resolve_source(hub_id) == hub_id
    backbone = load_backbone("sd3", "builtin:tiny-sd3", dtype="float32")
    assert isinstance(backbone, SD3Backbone) and isinstance(backbone, Backbone)
    assert backbone.source == str(folder) and backbone.family == "sd3"


def test_unknown_builtin_is_a_user_error_naming_the_known_ones():
    with pytest.raises(UserError) as err:
        resolve_source("builtin:nope")
    assert "builtin:nope" in err.value.message and "builtin:tiny-sd3" in err.value.fix


def test_register_builtin_adds_a_name(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("cdmctl.backbones.tiny.BUILTINS", dict(BUILTINS))
    register_builtin("toy-x", lambda folder: None)
    from cdmctl.backbones import tiny

    assert "toy-x" in tiny.BUILTINS


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError) as err:
        load_backbone("flux9", "builtin:tiny-sd3")
    assert "flux9" in err.value.message and "sd3" in err.value.fix
    assert "sd3" in FAMILIES


# -- loading errors -------------------------------------------------------------------------------


def test_missing_folder_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError) as err:
        SD3Backbone.from_pretrained(str(tmp_path / "no" / "such" / "model"))
    assert "does not exist" in err.value.message and err.value.fix


def test_folder_without_model_index_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError) as err:
        SD3Backbone.from_pretrained(str(tmp_path))
    assert "model_index.json" in err.value.message


def test_non_sd3_folder_is_a_user_error(tmp_path: Path):
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        SD3Backbone.from_pretrained(str(tmp_path))
    assert "FluxPipeline" in err.value.message and "not a Stable Diffusion 3" in err.value.message


def test_incomplete_sd3_folder_is_a_user_error(tiny_sd3_dir: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd3_dir, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(UserError) as err:
        SD3Backbone.from_pretrained(str(broken))
    assert "incomplete" in err.value.message and "transformer" in err.value.message
    shutil.copytree(tiny_sd3_dir / "transformer", broken / "transformer")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError) as err:
        SD3Backbone.from_pretrained(str(broken))
    assert "could not load" in err.value.message


def test_unreachable_hub_id_is_a_user_error(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cdmctl-hub-cache")
    with pytest.raises(UserError) as err:
        SD3Backbone.from_pretrained("cdmctl-test/definitely-not-a-model")
    assert "cdmctl-test/definitely-not-a-model" in err.value.message and "local folder" in err.value.fix


# -- prompts --------------------------------------------------------------------------------------


def test_encode_prompts_shapes_and_the_empty_prompt_differs(backbone: SD3Backbone, cond: Conditioning):
    config = backbone.transformer.config
    emb, pooled = cond.tensors["encoder_hidden_states"], cond.tensors["pooled_projections"]
    clip_length = backbone._tokenizers["tokenizer"].model_max_length  # 77 as in SD3
    assert emb.shape == (2, clip_length + backbone.max_sequence_length, config.joint_attention_dim)
    assert pooled.shape == (2, config.pooled_projection_dim)
    assert not emb.requires_grad and not pooled.requires_grad
    null = backbone.encode_prompts([""])
    assert len(null) == 1
    assert not torch.allclose(null.tensors["encoder_hidden_states"][0], emb[0])
    assert not torch.allclose(null.tensors["pooled_projections"][0], pooled[0])
    # Batching does not change a prompt's embedding.
    alone = backbone.encode_prompts(["a red house by the sea"])
    torch.testing.assert_close(alone.tensors["encoder_hidden_states"][0], emb[1], atol=1e-5, rtol=1e-5)


def test_release_text_encoders_then_encode_raises_but_pipeline_reloads(tiny_sd3_dir: Path):
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    before = backbone.encode_prompts(["a cat"])
    backbone.release_text_encoders()
    assert all(v is None for v in backbone._text.values())
    with pytest.raises(RuntimeError, match="release_text_encoders"):
        backbone.encode_prompts(["a cat"])
    pipe = backbone.pipeline()
    assert pipe.text_encoder_3 is not None and pipe.transformer is backbone.transformer
    embeds = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(embeds, before.tensors["encoder_hidden_states"])
    assert all(v is None for v in backbone._text.values())  # reloaded for that pipeline only


# -- velocity -------------------------------------------------------------------------------------


def test_velocity_matches_calling_the_transformer_directly(backbone: SD3Backbone, cond: Conditioning):
    x, s = _latents(backbone, 2), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v = backbone.velocity(backbone.transformer, x, s, cond)
        direct = backbone.transformer(hidden_states=x, timestep=1000 * s, return_dict=False,
                                      encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                                      pooled_projections=cond.tensors["pooled_projections"])[0]  # fmt: skip
    assert v.shape == x.shape
    torch.testing.assert_close(v, direct)


def test_velocity_and_shift_match_one_euler_step_of_the_pipeline(backbone: SD3Backbone, cond: Conditioning):
    """The pipeline at unshifted level s runs the model at shift(s) and steps to 0: x0 = x - shift(s) * v."""
    pipe = backbone.pipeline()
    x, level = _latents(backbone, 2, seed=3), 0.6
    out = pipe(**_embeds(cond), latents=x, sigmas=[level], height=32, width=32, output_type="latent").images
    shifted = backbone.shift(torch.full((2,), level), 32, 32)
    with torch.no_grad():
        v = backbone.velocity(backbone.transformer, x, shifted, cond)
    torch.testing.assert_close(out, x - shifted.view(-1, 1, 1, 1) * v, atol=1e-5, rtol=1e-5)


def test_velocity_takes_a_level_per_sample(backbone: SD3Backbone, cond: Conditioning):
    x, s = _latents(backbone, 2, seed=1), torch.tensor([0.15, 0.95])
    with torch.no_grad():
        both = backbone.velocity(backbone.transformer, x, s, cond)
        for i in range(2):
            alone = backbone.velocity(backbone.transformer, x[i : i + 1], s[i : i + 1], cond.index(slice(i, i + 1)))
            torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(both[0], backbone.velocity(backbone.transformer, x[:1], s[1:], cond.index([0]))[0])


def test_velocity_casts_inputs_to_the_model_dtype(backbone: SD3Backbone, cond: Conditioning):
    half = copy.deepcopy(backbone.transformer).to(torch.bfloat16)
    with torch.no_grad():
        v = backbone.velocity(half, _latents(backbone, 2), torch.tensor([0.5, 0.5]), cond)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()


def test_velocity_through_a_peft_lora_wrapper(backbone: SD3Backbone, cond: Conditioning):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=backbone.lora_target_modules())
    model = get_peft_model(copy.deepcopy(backbone.transformer), config)
    x, s = _latents(backbone, 2), torch.tensor([0.4, 0.7])
    with torch.no_grad():  # LoRA B starts at zero: same output as the base model
        expected = backbone.velocity(backbone.transformer, x, s, cond)
        torch.testing.assert_close(backbone.velocity(model, x, s, cond), expected)


def test_lora_targets_name_linear_layers_of_every_block(backbone: SD3Backbone):
    names = dict(backbone.transformer.named_modules())
    for target in backbone.lora_target_modules():
        hits = [m for n, m in names.items() if n.endswith("." + target)]
        assert hits, target
        assert all(isinstance(m, torch.nn.Linear) for m in hits), target
    (block_class,) = backbone.block_classes()
    assert all(isinstance(b, block_class) for b in backbone.transformer.transformer_blocks)


# -- shift, latents, decode -----------------------------------------------------------------------


def test_shift_matches_the_scheduler(backbone: SD3Backbone):
    scheduler = copy.deepcopy(backbone.scheduler)
    scheduler.set_timesteps(sigmas=LEVELS)
    shifted = backbone.shift(torch.tensor(LEVELS), 32, 32)
    torch.testing.assert_close(shifted, scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    four_steps = backbone.shift(torch.tensor([1.0, 0.75, 0.5, 0.25]), 32, 32)
    torch.testing.assert_close(four_steps, torch.tensor([1.0, 0.9, 0.75, 0.5]))  # docs/method.md, "Time shift"


@pytest.mark.parametrize("size", [32, 64])
def test_dynamic_shift_matches_what_the_pipeline_sets(backbone: SD3Backbone, cond: Conditioning, size: int,
                                                      monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    from diffusers import FlowMatchEulerDiscreteScheduler

    dynamic = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler.config, use_dynamic_shifting=True,
                                                          base_image_seq_len=16, max_image_seq_len=256)  # fmt: skip
    monkeypatch.setattr(backbone, "scheduler", dynamic)
    pipe = backbone.pipeline()
    pipe(**_embeds(cond, slice(0, 1)), sigmas=LEVELS, height=size, width=size, output_type="latent")
    shifted = backbone.shift(torch.tensor(LEVELS), size, size)
    torch.testing.assert_close(shifted, pipe.scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    assert not torch.allclose(shifted, torch.tensor(LEVELS))


def test_latent_shape_and_sizes_that_do_not_fit(backbone: SD3Backbone):
    assert backbone.vae_scale_factor == 2
    assert backbone.latent_shape(32, 64) == (4, 16, 32)
    with pytest.raises(UserError, match="multiples of 4"):
        backbone.latent_shape(30, 32)


def test_decode_gives_float_images_in_the_unit_range(backbone: SD3Backbone):
    images = backbone.decode(3 * _latents(backbone, 2))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_decode_matches_the_pipeline_decoder(backbone: SD3Backbone, cond: Conditioning):
    pipe = backbone.pipeline()
    x = _latents(backbone, 1, seed=5)
    decoded = pipe(**_embeds(cond, slice(0, 1)), latents=x, sigmas=[1e-6], height=32, width=32, output_type="pt")
    # One step from level ~0 barely moves x, so the pipeline decodes (almost) x itself.
    torch.testing.assert_close(backbone.decode(x), decoded.images, atol=1e-3, rtol=0)
