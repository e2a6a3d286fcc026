"""Z-Image adapter: a `ZImagePipeline` (hub id or folder) behind the Backbone interface.

The engine sees latents [B, 16, H/8, W/8], the layout the pipeline denoises; `velocity` hands the transformer what
the pipeline does (a list of [16, 1, h, w] frames, the time `1 - s`, a list of each prompt's own-length caption
features) and negates its output: Z-Image's transformer predicts `x0 - eps`, the opposite of the velocity.

Text goes through the pipeline's own `encode_prompt` (Qwen3 chat template with thinking on, as the pipeline asks,
512 tokens, the text encoder's second-to-last hidden state, padding dropped). Captions have their own lengths, so
the conditioning holds them zero-padded to 512 with their lengths, and `velocity` cuts each one back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdmctl.backbones.base import Conditioning
from cdmctl.backbones.family import OneTextEncoderFamily, check_image_size
from cdmctl.backbones.flow import batch_levels, decode_latents, scheduler_shift

PATCH = 2  # the transformer's 2x2 patches (its default patch_size)
ENCODE_BATCH = 16  # prompts per text-encoder forward
TEXT_TOKENS = 512  # the pipeline's max_sequence_length default


class ZImageBackbone(OneTextEncoderFamily):
    """Z-Image (`ZImagePipeline` folders; the CFG base model, not the Turbo student): Qwen3 text encoder,
    variable-length captions, a single-stream transformer that predicts `x0 - eps` at time `1 - s`, flow matching
    with the scheduler's shift (the pipeline passes mu for its dynamic shift; a static-shift config ignores it).

    Conditioning: `cap_feats` [B, 512, text hidden] (each caption's features, zero-padded) and `cap_len` [B]
    (int64).

    CFG convention (stated once, here): the pipeline computes `cond + g (cond - uncond)` with its `guidance_scale` g
    (CFG when g > 0), so the standard scale w (`uncond + w (cond - uncond)`, what the engine's teacher uses) is
    `g + 1`: guidance off is g = 0, the pipeline's default g = 5 is w = 6. Conditional and unconditional run in one
    batched call, conditional first; the negative prompt defaults to "". Its optional CFG normalisation and
    truncation stay off (their defaults) and are not used in training.
    """

    family = "zimage"
    pipeline_class = "ZImagePipeline"
    display_name = "Z-Image"
    example_id = "Tongyi-MAI/Z-Image"
    builtin = "builtin:tiny-zimage"
    unused_parts: tuple[str, ...] = ()
    fixed_text_length = "Z-Image: cdmctl encodes the pipeline's 512 text tokens"

    # -- family traits (class-level: usable on a pipeline without loading the adapter) -------------

    @staticmethod
    def teacher_sampling() -> dict[str, Any]:
        """ZImagePipeline's own defaults: 50 steps at its guidance_scale 5, which is the standard scale 6."""
        return {"num_inference_steps": 50, "guidance_scale": 6.0}

    @staticmethod
    def guidance_kwargs(scale: float) -> dict[str, Any]:
        """The pipeline's `guidance_scale` is the standard scale minus one (see the class docstring)."""
        return {"guidance_scale": float(scale) - 1.0}

    @staticmethod
    def image_multiple(pipe: Any) -> int:
        return pipe.vae_scale_factor * PATCH

    @staticmethod
    def scheduler_kwargs(pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        """The pipeline passes mu (for the image's token count) to every set_timesteps call."""
        return {"mu": image_mu(pipe.scheduler.config, pipe.vae_scale_factor, height, width)}

    @staticmethod
    def embedding_kwargs(cond: Conditioning) -> dict[str, Any]:
        """The pipeline takes one own-length caption feature tensor per prompt."""
        feats = cond.tensors["cap_feats"]
        return {"prompt_embeds": unpad_captions(cond, feats.dtype)}

    # -- prompts ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> `cap_feats` [B, 512, D] (zero-padded) and `cap_len` [B], as the pipeline encodes them.

        The empty prompt gives the pipeline's default negative prompt ("").
        """
        prompts = self.prompt_list(prompts)
        pipe = self._assemble(self.transformer, self.text_encoder)
        features: list[torch.Tensor] = []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_BATCH):
                chunk = list(prompts[i : i + ENCODE_BATCH])  # a copy: the pipeline rewrites the list in place
                embeds, _ = pipe.encode_prompt(prompt=chunk, device=self.text_encoder.device,
                                               do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS)  # fmt: skip
                features.extend(embeds)
        return pad_captions(features)

    # -- latents and the denoiser ----------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(16, height / f, width / f) with f the VAE scale factor; sizes must be multiples of 2 f (the patches)."""
        multiple = self.vae_scale_factor * PATCH
        check_image_size(height, width, multiple, "Z-Image")
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v [B, 16, h, w] of `model` (the transformer, a copy, or a peft/DDP/FSDP wrapper) at x [B, 16, h, w], s [B]."""
        param_dtype = next(model.parameters()).dtype
        s = batch_levels(s, x)
        # the pipeline's time: (1000 - t) / 1000 with the scheduler's float32 t = 1000 sigma
        t = (1000 - s.float() * 1000) / 1000
        frames = list(x.to(param_dtype).unsqueeze(2).unbind(0))
        out = model(frames, t, unpad_captions(cond, param_dtype), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The levels ZImagePipeline's scheduler uses for unshifted levels s (any shape) at this size (any steps)."""
        mu = image_mu(self.scheduler.config, self.vae_scale_factor, height, width)
        return scheduler_shift(self.scheduler, s, mu, self.source)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] -> images [B, 3, H, W] in [0, 1], float32, CPU."""
        return decode_latents(self.vae, latents)

    # -- training and export helpers -------------------------------------------------------------

    def lora_target_modules(self) -> list[str]:
        """Attention projections and the SwiGLU feed-forward of every block (the main layers and both refiners)."""
        return ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]  # fmt: skip

    def block_classes(self) -> list[type[nn.Module]]:
        from diffusers.models.transformers.transformer_z_image import (
            ZImageTransformerBlock,
        )

        return [ZImageTransformerBlock]

def pad_captions(features: Sequence[torch.Tensor], tokens: int = TEXT_TOKENS) -> Conditioning:
    """Own-length caption features [L_i, D] -> `cap_feats` [B, tokens, D] zero-padded and `cap_len` [B] int64."""
    feats = torch.zeros(len(features), tokens, features[0].shape[-1], dtype=features[0].dtype,
                        device=features[0].device)  # fmt: skip
    for i, f in enumerate(features):
        feats[i, : f.shape[0]] = f
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long, device=feats.device)
    return Conditioning({"cap_feats": feats, "cap_len": lengths})


def unpad_captions(cond: Conditioning, dtype: torch.dtype) -> list[torch.Tensor]:
    """The list of own-length caption features the transformer takes."""
    feats, lengths = cond.tensors["cap_feats"], cond.tensors["cap_len"].tolist()
    return [feats[i, :n].to(dtype) for i, n in enumerate(lengths)]


def image_mu(config: Any, vae_scale_factor: int, height: int, width: int) -> float:
    """mu as ZImagePipeline.__call__ computes it: calculate_shift of the image's token count with the scheduler
    config's values (and the same fallbacks)."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    cells = vae_scale_factor * PATCH
    return calculate_shift(
        (height // cells) * (width // cells),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
