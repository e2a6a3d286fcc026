"""Qwen-Image adapter: a `QwenImagePipeline` (hub id or folder) behind the Backbone interface.

The engine sees unpacked latents [B, 16, h, w] (the VAE's single frame dropped); `velocity` packs them into the
transformer's 2x2 patches with the pipeline's own `_pack_latents`, passes the image shape the pipeline passes,
and unpacks the prediction. Text goes through the pipeline's own `encode_prompt` (its system-prompt chat template,
whose 34 template tokens it drops, the Qwen2.5-VL text encoder's last hidden state, at most 512 tokens as the
pipeline's call does). Prompts have their own lengths: the conditioning holds them zero-padded to 512 with the
pipeline's attention mask, and `velocity` cuts a batch to its longest prompt, as the pipeline pads a batch.

The published scheduler config stretches every schedule so that its last level lands on `shift_terminal` (0.02):
a whole-schedule operation, not a per-level shift, which would pull a 4-step student's last level from 0.4 to 0.02
at 1024 px. The adapter's scheduler (and so every exported pipeline) drops that stretch: the student trains and
samples on the dynamic shift alone, the same levels in training, in `cdmctl generate` and in plain diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdmctl.backbones.base import Conditioning
from cdmctl.backbones.family import OneTextEncoderFamily, check_image_size
from cdmctl.backbones.flow import batch_levels, scheduler_shift

PATCH = 2  # latents are packed in 2x2 patches
ENCODE_BATCH = 16  # prompts per text-encoder forward
TEXT_TOKENS = 512  # QwenImagePipeline.__call__'s max_sequence_length default


class QwenImageBackbone(OneTextEncoderFamily):
    """Qwen-Image (`QwenImagePipeline` folders): Qwen2.5-VL text encoder with masks, packed latents, flow
    matching with the resolution-dependent dynamic shift (its terminal stretch dropped, see the module docstring).

    Conditioning: `encoder_hidden_states` [B, 512, joint_attention_dim] (zero-padded) and
    `encoder_hidden_states_mask` [B, 512] (int64, 1 on a prompt's tokens). Timestep = s: the pipeline passes
    `t / 1000`, and the transformer's time projection scales by 1000.

    CFG convention (stated once, here): `guidance_scale` is unused (the model is not guidance-distilled); real CFG
    is `true_cfg_scale` w with a negative prompt, `uncond + w (cond - uncond)`, conditional and unconditional in
    two calls, and only when a negative prompt is given: cdmctl gives "" (the empty prompt the engine's teacher
    uses). The pipeline then rescales the guided prediction per token to the conditional one's norm; training
    uses plain CFG, as for LongCat-Image, whose pipeline renormalises too.
    """

    family = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    display_name = "Qwen-Image"
    example_id = "Qwen/Qwen-Image"
    builtin = "builtin:tiny-qwenimage"
    unused_parts: tuple[str, ...] = ()
    fixed_text_length = "Qwen-Image: cdmctl encodes up to the pipeline's 512 text tokens"

    @staticmethod
    def vae_factor(vae: Any) -> int:
        """The Wan-style VAE's spatial factor, as QwenImagePipeline computes it."""
        return 2 ** len(vae.temperal_downsample)

    # -- family traits (class-level: usable on a pipeline without loading the adapter) -------------

    @staticmethod
    def teacher_sampling() -> dict[str, Any]:
        """QwenImagePipeline's own defaults: 50 steps, true CFG 4 (with cdmctl's empty negative prompt)."""
        return {"num_inference_steps": 50, "guidance_scale": 4.0}

    @staticmethod
    def guidance_kwargs(scale: float) -> dict[str, Any]:
        """True CFG through `true_cfg_scale` and the empty negative prompt (see the class docstring); 1 is none."""
        if scale > 1:
            return {"true_cfg_scale": float(scale), "negative_prompt": ""}
        return {"true_cfg_scale": 1.0}

    @staticmethod
    def student_scheduler(scheduler: Any) -> Any:
        """The pipeline's scheduler without its terminal stretch (see the module docstring)."""
        return without_terminal_stretch(scheduler)

    @staticmethod
    def image_multiple(pipe: Any) -> int:
        return pipe.vae_scale_factor * PATCH

    @staticmethod
    def scheduler_kwargs(pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        """The pipeline passes mu (for the image's packed sequence length) to every set_timesteps call."""
        return {"mu": image_mu(pipe.scheduler.config, pipe.vae_scale_factor, height, width)}

    @staticmethod
    def embedding_kwargs(cond: Conditioning) -> dict[str, Any]:
        """The embeddings and their mask cut to the batch's longest prompt, as the pipeline pads a batch."""
        embeds, mask = longest_prompt(cond)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    # -- prompts ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> `encoder_hidden_states` [B, 512, D] and `encoder_hidden_states_mask` [B, 512], as the
        pipeline encodes them (zero-padded beyond each prompt). The empty prompt is cdmctl's negative prompt."""
        prompts = self.prompt_list(prompts)
        pipe = self._assemble(self.transformer, self.text_encoder)
        device = self.text_encoder.device
        rows, masks = [], []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_BATCH):
                embeds, mask = pipe.encode_prompt(prompt=prompts[i : i + ENCODE_BATCH], device=device,
                                                  max_sequence_length=TEXT_TOKENS)  # fmt: skip
                if mask is None:  # the pipeline drops an all-ones mask
                    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                pad = TEXT_TOKENS - embeds.shape[1]
                rows.append(torch.nn.functional.pad(embeds, (0, 0, 0, pad)))
                masks.append(torch.nn.functional.pad(mask.to(torch.long), (0, pad)))
        embeds, mask = torch.cat(rows), torch.cat(masks)
        return Conditioning({"encoder_hidden_states": embeds * mask[..., None].to(embeds.dtype),
                             "encoder_hidden_states_mask": mask})  # fmt: skip

    # -- latents and the denoiser ----------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(16, height / f, width / f) with f the VAE scale factor; sizes must be multiples of 2 f (the packing)."""
        multiple = self.vae_scale_factor * PATCH
        check_image_size(height, width, multiple, "Qwen-Image")
        f = self.vae_scale_factor
        return (self.vae.config.z_dim, height // f, width // f)

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v [B, 16, h, w] of `model` (the transformer, a copy, or a peft/DDP/FSDP wrapper) at x [B, 16, h, w], s [B]."""
        pipeline = self.diffusers_pipeline()
        param_dtype = next(model.parameters()).dtype
        batch, channels, h, w = x.shape
        s = batch_levels(s, x)
        embeds, mask = longest_prompt(cond)
        out = model(
            hidden_states=pipeline._pack_latents(x.to(param_dtype), batch, channels, h, w),
            timestep=s.float(),  # the level itself: the time projection scales by 1000
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds if embeds.dtype == param_dtype else embeds.to(param_dtype),
            img_shapes=[[(1, h // PATCH, w // PATCH)]] * batch,
            return_dict=False,
        )[0]
        f = self.vae_scale_factor
        return pipeline._unpack_latents(out, h * f, w * f, f).squeeze(2)

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The levels the adapter's scheduler (the pipeline's, without the terminal stretch) uses for unshifted
        levels s (any shape) at this image size (any step count)."""
        mu = image_mu(self.scheduler.config, self.vae_scale_factor, height, width)
        return scheduler_shift(self.scheduler, s, mu, self.source)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] -> images [B, 3, H, W] in [0, 1], float32, CPU, as the pipeline decodes: the
        VAE's per-channel statistics undone, one frame decoded."""
        vae, config = self.vae, self.vae.config
        latents = latents.to(device=vae.device, dtype=vae.dtype)[:, :, None]
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        with torch.no_grad():
            images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    # -- training and export helpers -------------------------------------------------------------

    def lora_target_modules(self) -> list[str]:
        """Joint-attention projections of both streams and both feed-forwards of every block."""
        return [
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
            "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
        ]  # fmt: skip

    def block_classes(self) -> list[type[nn.Module]]:
        from diffusers.models.transformers.transformer_qwenimage import (
            QwenImageTransformerBlock,
        )

        return [QwenImageTransformerBlock]

def without_terminal_stretch(scheduler: Any) -> Any:
    """The scheduler with `shift_terminal` off (a copy), or itself when it has none."""
    if not scheduler.config.get("shift_terminal"):
        return scheduler
    return type(scheduler).from_config({**scheduler.config, "shift_terminal": None})


def image_mu(config: Any, vae_scale_factor: int, height: int, width: int) -> float:
    """mu of the dynamic shift as QwenImagePipeline.__call__ computes it: its calculate_shift of the packed image
    sequence length, with the scheduler config's values and the same fallbacks."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cells = vae_scale_factor * PATCH
    return calculate_shift(
        (height // cells) * (width // cells),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def longest_prompt(cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cached (512-token, zero-padded) embeddings cut to the batch's longest prompt, with their mask (None when
    no token is padding: the pipeline then passes none)."""
    mask = cond.tensors["encoder_hidden_states_mask"]
    length = int(mask.sum(dim=1).max())
    embeds, mask = cond.tensors["encoder_hidden_states"][:, :length], mask[:, :length]
    return embeds, None if bool(mask.all()) else mask
