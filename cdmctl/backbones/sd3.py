"""Stable Diffusion 3 adapter: loads an SD3 diffusers pipeline (hub id or folder) behind the Backbone interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdmctl.backbones.base import Conditioning
from cdmctl.backbones.family import DiffusersFamily, check_image_size, free_memory
from cdmctl.backbones.flow import batch_levels, decode_latents, scheduler_shift
from cdmctl.backbones.loading import load_parts, resolve_dtype

_TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class SD3Backbone(DiffusersFamily):
    """SD3 / SD3.5 (`StableDiffusion3Pipeline` folders): three text encoders, 2-D latents, shift-3 flow matching.

    Conditioning: `encoder_hidden_states` [B, 77 + max_sequence_length, joint_attention_dim] (77: the CLIP
    tokenizers' length) and
    `pooled_projections` [B, pooled_projection_dim]. Timestep = 1000 * s (the scheduler's
    `num_train_timesteps`).
    """

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    display_name = "Stable Diffusion 3"
    example_id = "stabilityai/stable-diffusion-3-medium-diffusers"
    builtin = "builtin:tiny-sd3"
    unused_parts: tuple[str, ...] = ()

    def __init__(self, parts: dict[str, Any], *, source: str, revision: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_sequence_length: int = 256):  # fmt: skip
        self.source = source
        self.revision = revision
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.transformer: nn.Module = parts["transformer"]
        self.vae = parts["vae"]
        self.scheduler = parts["scheduler"]
        self._text = {k: parts[k] for k in _TEXT_PARTS}
        self._tokenizers = {k: parts[k] for k in ("tokenizer", "tokenizer_2", "tokenizer_3")}
        self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, source: str, *, revision: str | None = None, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", max_sequence_length: int = 256) -> SD3Backbone:  # fmt: skip
        """Load every part from a hub id or a local folder (one code path) onto `device` in `dtype`."""
        dtype = resolve_dtype(dtype)
        parts = load_parts(cls, source, revision=revision, dtype=dtype, device=device)
        return cls(parts, source=source, revision=revision, dtype=dtype, device=device,
                   max_sequence_length=max_sequence_length)  # fmt: skip

    # -- family traits (class-level: usable on a pipeline without loading the adapter) -------------

    @staticmethod
    def sampling_kwargs() -> dict[str, Any]:
        """Nothing beyond the common arguments (the text length is per model: cdmctl.json's max_sequence_length)."""
        return {}

    @staticmethod
    def teacher_sampling() -> dict[str, Any]:
        """StableDiffusion3Pipeline's own defaults."""
        return {"num_inference_steps": 28, "guidance_scale": 7.0}

    @staticmethod
    def guidance_kwargs(scale: float) -> dict[str, Any]:
        """CFG convention: `guidance_scale` is the standard scale (uncond + g (cond - uncond), CFG when g > 1), the
        negative prompt "" by default, the unconditional half of the batch first."""
        return {"guidance_scale": float(scale)}

    @staticmethod
    def image_multiple(pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.patch_size

    @staticmethod
    def scheduler_kwargs(pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        mu = _mu(pipe.scheduler.config, pipe.patch_size, pipe.vae_scale_factor, height, width)
        return {} if mu is None else {"mu": mu}

    @staticmethod
    def embedding_kwargs(cond: Conditioning) -> dict[str, Any]:
        """Both of SD3's prompt tensors, as its pipeline's encode_prompt returns them."""
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "pooled_prompt_embeds": cond.tensors["pooled_projections"]}  # fmt: skip

    # -- prompts ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> `encoder_hidden_states` [B, 77 + max_sequence_length, D] and `pooled_projections` [B, P]."""
        if any(v is None for v in self._text.values()):
            raise RuntimeError(
                "SD3Backbone.encode_prompts called after release_text_encoders(); encode (and cache) every "
                "prompt, including the empty one, before releasing the text encoders"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        pipe = self._assemble(self.transformer, self._text)
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self._text["text_encoder"].device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )  # fmt: skip
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def release_text_encoders(self) -> None:
        """Drop the three text encoders (T5-XXL alone is 4.7B parameters) and return their memory."""
        self._text = {k: None for k in _TEXT_PARTS}
        free_memory()

    # -- latents and the denoiser ----------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, height / f, width / f) with f the VAE scale factor; sizes must be multiples of f * patch."""
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        check_image_size(height, width, multiple, "SD3")
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v [B, C, h, w] of `model` (the transformer, a copy, or a peft/DDP/FSDP wrapper) at x [B, C, h, w], s [B]."""
        param_dtype = next(model.parameters()).dtype

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if t.dtype == param_dtype else t.to(param_dtype)

        s = batch_levels(s, x)
        # The pipeline passes float32 timesteps (sigma * num_train_timesteps) whatever the model dtype.
        timestep = s.float() * self.scheduler.config.num_train_timesteps
        return model(
            hidden_states=cast(x),
            encoder_hidden_states=cast(cond.tensors["encoder_hidden_states"]),
            pooled_projections=cast(cond.tensors["pooled_projections"]),
            timestep=timestep,
            return_dict=False,
        )[0]

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The levels the scheduler would use for unshifted levels s (any shape): set_timesteps(sigmas=s). The step
        count does not matter to SD3's shift."""
        mu = _mu(self.scheduler.config, self.transformer.config.patch_size, self.vae_scale_factor, height, width)
        return scheduler_shift(self.scheduler, s, mu, self.source)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] (as the transformer sees them) -> images [B, 3, H, W] in [0, 1], float32, CPU."""
        return decode_latents(self.vae, latents)

    # -- training and export helpers -------------------------------------------------------------

    def lora_target_modules(self) -> list[str]:
        """Joint-attention projections (image and context streams) and both feed-forwards of every block."""
        return [
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ]  # fmt: skip

    def block_classes(self) -> list[type[nn.Module]]:
        from diffusers.models.attention import JointTransformerBlock

        return [JointTransformerBlock]

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """A StableDiffusion3Pipeline sharing this backbone's parts, with `transformer` (unwrapped) in place.

        If the text encoders were released they are loaded again from `source` for this pipeline only.
        """
        text = self._text
        if any(v is None for v in text.values()):
            reloaded = load_parts(type(self), self.source, revision=self.revision, dtype=self.dtype,
                                  device=self.device, skip=("transformer", "vae"))  # fmt: skip
            text = {k: reloaded[k] for k in _TEXT_PARTS}
        return self._assemble(self.transformer if transformer is None else transformer, text)

    def _assemble(self, transformer: nn.Module, text: dict[str, Any]) -> Any:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=self.scheduler, vae=self.vae,
                                        **text, **self._tokenizers)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _mu(config: Any, patch: int, vae_scale_factor: int, height: int, width: int) -> float | None:
    """The dynamic shift's mu as StableDiffusion3Pipeline.__call__ computes it (same fallbacks); None if static."""
    if not config.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    f = vae_scale_factor
    image_seq_len = (height // f // patch) * (width // f // patch)
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.16),
    )
