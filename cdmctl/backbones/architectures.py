"""The published architectures of every family's networks (transformer, text encoders, VAE), built without weights.

Each `Architecture` holds the configuration of the real networks behind one hub id, with where each config comes
from, so that the memory plan, the FLOP count and the GPU check all meet the real sizes without downloading a byte.
`build(part)` makes a part on the `meta` device (the real diffusers / transformers class, no storage);
`meta_backbone(arch)` makes the family's adapter around a meta transformer and VAE, with the real scheduler and no
text encoders (its conditioning shapes are `conditioning`); `meta_backbone(arch, "cuda")` makes the same with random
weights on a GPU (benchmarks/gpu_check.py).

Sources. The hub repositories' own config.json files could not be read from the machine this was written on; every
value below was taken from public copies of those files (quoted verbatim, with the hub repo and file named, in
open-source loaders, converters and ports) and cross-checked by the parameter count against the size each publisher
states (tests/test_architectures.py). "published" is that stated size, in parameters, of the weights the hub
repository holds: parameters plus persistent buffers (SD3's fixed position table is a buffer there).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HF = "https://huggingface.co/"


@dataclass(frozen=True)
class Part:
    """One network: its class ("diffusers:Name" or "transformers:Name"), config, and its published size."""

    cls: str
    config: dict[str, Any]
    source: str  # the hub repo and file the config is from
    published: float | None = None  # parameters the publisher states (None: no stated figure)
    published_source: str = ""


@dataclass(frozen=True)
class Architecture:
    """The networks behind one hub id, and the family adapter that runs them."""

    name: str
    family: str
    hub_id: str
    transformer: Part
    text_encoders: tuple[Part, ...]
    vae: Part
    scheduler: dict[str, Any]  # FlowMatchEulerDiscreteScheduler config
    scheduler_source: str
    # conditioning tensor -> (shape without batch, dtype): what the adapter's encode_prompts returns per prompt
    conditioning: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    adapter_kwargs: dict[str, Any] = field(default_factory=dict)  # what the adapter takes beside the parts


# -- text encoders and VAEs shared by several families ---------------------------------------------------------------

_CLIP_L = Part("transformers:CLIPTextModelWithProjection",
               {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "projection_dim": 768, "vocab_size": 49408, "hidden_act": "quick_gelu", "max_position_embeddings": 77},
               "stabilityai/stable-diffusion-3-medium-diffusers text_encoder/config.json (CLIP ViT-L/14 text tower)",
               123.65e6, "openai/clip-vit-large-patch14: text tower with projection, 123.65M")  # fmt: skip
_CLIP_G = Part("transformers:CLIPTextModelWithProjection",
               {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                "projection_dim": 1280, "vocab_size": 49408, "hidden_act": "gelu", "max_position_embeddings": 77},
               "stabilityai/stable-diffusion-3-medium-diffusers text_encoder_2/config.json (OpenCLIP ViT-bigG/14)",
               694.7e6, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k: text tower with projection, 694.7M")  # fmt: skip
_T5_XXL = Part("transformers:T5EncoderModel",
               {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
                "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32},
               "stabilityai/stable-diffusion-3-medium-diffusers text_encoder_3/config.json (T5 v1.1 XXL encoder)",
               4.762e9, "google/t5-v1_1-xxl encoder alone: 4.76B (of the 11B encoder-decoder)")  # fmt: skip
_QWEN25_VL_7B = Part("transformers:Qwen2_5_VLForConditionalGeneration",
                     {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                      "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
                      "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                        "out_hidden_size": 3584},
                      "tie_word_embeddings": False},
                     "Qwen/Qwen2.5-VL-7B-Instruct config.json (the text_encoder of LongCat-Image and Qwen-Image)",
                     8.29e9, "Qwen/Qwen2.5-VL-7B-Instruct model page: 8.29B parameters")  # fmt: skip
_QWEN3_4B = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
             "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000}  # fmt: skip
_VAE_16 = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
           "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
_VAE_16_PUBLISHED = (83.8e6, "FLUX.1 / SD3 16-channel autoencoder: 83.8M (the diffusers weights' tensor count)")

_SD3_TEXT = (_CLIP_L, _CLIP_G, _T5_XXL)
_SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
_SD3_TEXT_LENGTH = 256  # the T5 tokens of SD3Backbone's default max_sequence_length (the presets keep it)


def _sd3(name: str, hub_id: str, transformer: dict[str, Any], published: float, stated: str) -> Architecture:
    config = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
              "joint_attention_dim": 4096, "pooled_projection_dim": 2048, **transformer}  # fmt: skip
    return Architecture(
        name, "sd3", hub_id,
        Part("diffusers:SD3Transformer2DModel", config, f"{hub_id} transformer/config.json", published, stated),
        _SD3_TEXT, Part("diffusers:AutoencoderKL", {**_VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
                        f"{hub_id} vae/config.json", *_VAE_16_PUBLISHED),
        _SD3_SCHEDULER, f"{hub_id} scheduler/scheduler_config.json",
        {"encoder_hidden_states": ((77 + _SD3_TEXT_LENGTH, 4096), torch.bfloat16),  # 77 CLIP tokens + T5's
         "pooled_projections": ((2048,), torch.bfloat16)},
        {"max_sequence_length": _SD3_TEXT_LENGTH},
    )  # fmt: skip


ARCHITECTURES: dict[str, Architecture] = {}


def _register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


_register(_sd3("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers",
               {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                "pos_embed_max_size": 192},
               2.0e9, "stabilityai/stable-diffusion-3-medium model card: 'a 2 billion parameter' MMDiT"))  # fmt: skip
_register(_sd3("sd35-medium", "stabilityai/stable-diffusion-3.5-medium",
               {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"},
               2.5e9, "stabilityai/stable-diffusion-3.5-medium model card: MMDiT-X, 2.5 billion parameters"))  # fmt: skip
_register(_sd3("sd35-large", "stabilityai/stable-diffusion-3.5-large",
               {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
               8.1e9, "stabilityai/stable-diffusion-3.5-large model card: 8.1 billion parameters"))  # fmt: skip

_register(Architecture(
    "longcat-image", "longcat", "meituan-longcat/LongCat-Image",
    Part("diffusers:LongCatImageTransformer2DModel",
         {"patch_size": 1, "in_channels": 64, "num_layers": 10, "num_single_layers": 20, "attention_head_dim": 128,
          "num_attention_heads": 24, "joint_attention_dim": 3584, "pooled_projection_dim": 3584,
          "axes_dims_rope": [16, 56, 56]},
         "meituan-longcat/LongCat-Image transformer/config.json (as LongCat-Image-Edit's, which ports quote)",
         6.0e9, "meituan-longcat/LongCat-Image model card: a 6B-parameter model"),
    (_QWEN25_VL_7B,),
    Part("diffusers:AutoencoderKL", {**_VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
         "meituan-longcat/LongCat-Image vae/config.json (FLUX.1's 16-channel autoencoder)", *_VAE_16_PUBLISHED),
    {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
     "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "meituan-longcat/LongCat-Image scheduler/scheduler_config.json (dynamic shift 0.5-1.15 over 256-4096 tokens)",
    {"encoder_hidden_states": ((512, 3584), torch.bfloat16), "txt_ids": ((512, 3), torch.int64)},
))  # fmt: skip

_register(Architecture(
    "flux2-klein-base-4b", "flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B",
    Part("diffusers:Flux2Transformer2DModel",
         {"patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
          "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256,
          "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6,
          "guidance_embeds": False},
         "black-forest-labs/FLUX.2-klein-base-4B transformer/config.json (identical to FLUX.2-klein-4B's)",
         4.0e9, "black-forest-labs/FLUX.2-klein-base-4B model card: a 4 billion parameter flow transformer"),
    (Part("transformers:Qwen3ForCausalLM", _QWEN3_4B,
          "black-forest-labs/FLUX.2-klein-base-4B text_encoder/config.json (Qwen3-4B)",
          4.0e9, "Qwen/Qwen3-4B model card: 4.0B parameters"),),
    Part("diffusers:AutoencoderKLFlux2",
         {"in_channels": 3, "out_channels": 3, "latent_channels": 32, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "patch_size": (2, 2), "norm_num_groups": 32,
          "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
          "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1},
         "black-forest-labs/FLUX.2-klein-base-4B vae/config.json (FLUX.2's autoencoder, shared by the family)",
         84.05e6, "FLUX.2 [klein] vae/diffusion_pytorch_model.safetensors: 84,046,115 values (as counted by a port)"),
    {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    "black-forest-labs/FLUX.2-klein-base-4B scheduler/scheduler_config.json (its pipeline computes mu itself)",
    {"encoder_hidden_states": ((512, 7680), torch.bfloat16), "txt_ids": ((512, 4), torch.int64)},
))  # fmt: skip

_register(Architecture(
    "qwen-image", "qwenimage", "Qwen/Qwen-Image",
    Part("diffusers:QwenImageTransformer2DModel",
         {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
          "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56),
          "guidance_embeds": False},
         "Qwen/Qwen-Image transformer/config.json", 20.0e9, "Qwen/Qwen-Image model card: a 20B MMDiT"),
    (_QWEN25_VL_7B,),
    Part("diffusers:AutoencoderKLQwenImage",
         {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
          "temperal_downsample": [False, True, True], "dropout": 0.0},
         "Qwen/Qwen-Image vae/config.json (the Wan 2.1 autoencoder)", 127e6,
         "Wan 2.1 report: its causal 3-D VAE has 127M parameters"),
    {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
     "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"},
    "Qwen/Qwen-Image scheduler/scheduler_config.json (cdmctl.backbones.tiny_qwenimage.SCHEDULER_CONFIG)",
    {"encoder_hidden_states": ((512, 3584), torch.bfloat16), "encoder_hidden_states_mask": ((512,), torch.int64)},
))  # fmt: skip

_register(Architecture(
    "z-image", "zimage", "Tongyi-MAI/Z-Image",
    Part("diffusers:ZImageTransformer2DModel",
         {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
          "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
          "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
          "axes_lens": [1536, 512, 512]},
         "Tongyi-MAI/Z-Image transformer/config.json (the same architecture as Z-Image-Turbo's)",
         6.0e9, "Tongyi-MAI/Z-Image model card: a 6B-parameter single-stream DiT"),
    (Part("transformers:Qwen3Model", _QWEN3_4B, "Tongyi-MAI/Z-Image text_encoder/config.json (Qwen3-4B)",
          4.0e9, "Qwen/Qwen3-4B model card: 4.0B parameters"),),
    Part("diffusers:AutoencoderKL", {**_VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
         "Tongyi-MAI/Z-Image vae/config.json (FLUX.1's 16-channel autoencoder)", *_VAE_16_PUBLISHED),
    {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False},
    "Tongyi-MAI/Z-Image scheduler/scheduler_config.json (static shift 6; Z-Image-Turbo's is 3)",
    {"cap_feats": ((512, 2560), torch.bfloat16), "cap_len": ((), torch.int64)},
))  # fmt: skip


def for_model(hub_id: str) -> Architecture:
    """The architecture published under `hub_id` (a preset's model.pretrained); KeyError naming the known ones."""
    for arch in ARCHITECTURES.values():
        if arch.hub_id == hub_id:
            return arch
    raise KeyError(f"no real architecture recorded for {hub_id!r}; known: {sorted(a.hub_id for a in ARCHITECTURES.values())}")


def part_class(part: Part) -> type:
    library, _, name = part.cls.partition(":")
    return getattr(importlib.import_module(library), name)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """torch's default float dtype for the block (None: unchanged)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(part: Part, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The network of `part`: on `meta` shapes only, no storage; on any other device its classes' own random
    initialisation, made there in `dtype` (bf16: a 20B transformer is never held in float32 on the way)."""
    cls = part_class(part)
    with torch.device(device), default_dtype(dtype):
        if part.cls.startswith("transformers:"):
            return cls(cls.config_class(**part.config))
        return cls(**part.config)


def weight_count(module: nn.Module) -> int:
    """Values in the module's saved weights: parameters and persistent buffers, tied tensors once."""
    tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() for t in tensors.values())


def meta_backbone(arch: Architecture, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16) -> Any:
    """The family's adapter over the transformer and VAE (on `meta` by default; on another device with random
    weights, see `build`), the published scheduler and no text encoders or tokenizers (encode_prompts is
    unavailable: feed it conditioning of `arch.conditioning`'s shapes)."""
    from collections import defaultdict

    from diffusers import FlowMatchEulerDiscreteScheduler

    from cdmctl.backbones import adapter_class

    made_in = None if str(device) == "meta" else dtype  # meta: as before (the adapter casts), no values either way
    parts: dict[str, Any] = defaultdict(lambda: None)  # every text part the adapter asks for: absent
    parts.update(transformer=build(arch.transformer, device, made_in), vae=build(arch.vae, device, made_in),
                 scheduler=FlowMatchEulerDiscreteScheduler(**arch.scheduler))
    return adapter_class(arch.family)(parts, source=arch.hub_id, dtype=dtype, device=device,
                                      **arch.adapter_kwargs)  # fmt: skip
