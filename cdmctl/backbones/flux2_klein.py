"""FLUX.2 [klein] base adapter: a `Flux2KleinPipeline` (hub id or folder) behind the Backbone interface.

The engine's latents are the transformer's patch grid [B, 128, H/16, W/16] (the VAE's 32 channels in 2x2 patches,
normalised by the VAE's batch-norm statistics, exactly what the pipeline denoises before packing); `velocity`
flattens the grid into the token sequence [B, (H/16)(W/16), 128] with the pipeline's own `_pack_latents`, adds
the 4-axis position ids `_prepare_latent_ids` builds, and reshapes the prediction back. Text goes through the
pipeline's own `encode_prompt` (Qwen3 chat template without thinking, 512 tokens, hidden states of layers 9, 18
and 27 side by side).

The shift is the pipeline's: `compute_empirical_mu` of the image's token count *and the number of steps*, so
`shift` and `scheduler_kwargs` take the step count and `cdmctl generate` passes `num_inference_steps` with its
sigmas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdmctl.backbones.base import Conditioning
from cdmctl.backbones.family import OneTextEncoderFamily, check_image_size
from cdmctl.backbones.flow import batch_levels, scheduler_shift
from cdmctl.backbones.loading import local_folder, read_index
from cdmctl.errors import UserError

PATCH = 2  # VAE latents are patchified 2x2 before the transformer
ENCODE_BATCH = 16  # prompts per text-encoder forward
TEXT_TOKENS = 512  # the pipeline's max_sequence_length default (and tokenizer_max_length)


class Flux2KleinBackbone(OneTextEncoderFamily):
    """FLUX.2 [klein] base (`Flux2KleinPipeline` folders with `is_distilled: false`): Qwen3 text encoder, packed
    latents with 4-axis position ids, flow matching with the step-dependent empirical shift.

    Conditioning: `encoder_hidden_states` [B, 512, 3 x text hidden] and `txt_ids` [B, 512, 4] (int64, as the
    pipeline builds them). Timestep = s: the pipeline passes `t / 1000`, and the transformer multiplies by 1000.

    CFG convention (stated once, here): real classifier-free guidance, `uncond + g (cond - uncond)` with the
    pipeline's `guidance_scale` g (CFG when g > 1), conditional and unconditional in two transformer calls, the
    unconditional prompt hard-coded to "" (the pipeline takes no negative prompt). The transformer's guidance
    embedding is unused (`guidance=None`): the base is not guidance-distilled.
    """

    family = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    display_name = "FLUX.2 [klein]"
    example_id = "black-forest-labs/FLUX.2-klein-base-4B"
    builtin = "builtin:tiny-flux2-klein"
    unused_parts: tuple[str, ...] = ()
    fixed_text_length = "FLUX.2 [klein]: cdmctl encodes the pipeline's 512 text tokens"

    @classmethod
    def from_pretrained(cls, source: str, *, revision: str | None = None, **options: Any) -> Flux2KleinBackbone:
        """As every family loads; a step-distilled klein is refused first (it has no CFG to distil and is already a
        few-step model)."""
        folder = local_folder(source, cls.example_id, cls.builtin)
        if read_index(str(folder) if folder else source, source, revision).get("is_distilled"):
            raise UserError(
                f"'{source}' is a step-distilled FLUX.2 [klein] (is_distilled: true): its pipeline ignores guidance",
                "distil the base model instead, e.g. black-forest-labs/FLUX.2-klein-base-4B",
            )
        return super().from_pretrained(source, revision=revision, **options)

    # -- family traits (class-level: usable on a pipeline without loading the adapter) -------------

    @staticmethod
    def teacher_sampling() -> dict[str, Any]:
        """Flux2KleinPipeline's own defaults (50 steps, guidance 4), as its docstring samples the base."""
        return {"num_inference_steps": 50, "guidance_scale": 4.0}

    @staticmethod
    def guidance_kwargs(scale: float) -> dict[str, Any]:
        """The pipeline's `guidance_scale` is the standard CFG scale (see the class docstring)."""
        return {"guidance_scale": float(scale)}

    @staticmethod
    def student_pipeline_config() -> dict[str, Any]:
        """An exported student is marked as the step-distilled klein models are: its pipeline then ignores
        `guidance_scale` (one conditional call per step), whatever a plain diffusers caller passes."""
        return {"is_distilled": True}

    @staticmethod
    def image_multiple(pipe: Any) -> int:
        return pipe.vae_scale_factor * PATCH

    @staticmethod
    def scheduler_kwargs(pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        """The pipeline passes mu (for the image's token count and the step count) to every set_timesteps call."""
        return {"mu": image_mu(pipe.vae_scale_factor, height, width, steps)}

    # -- prompts ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> `encoder_hidden_states` [B, 512, D] and `txt_ids` [B, 512, 4], as the pipeline encodes them.

        The empty prompt gives what the pipeline encodes for its unconditional branch ("", hard-coded there).
        """
        prompts = self.prompt_list(prompts)
        pipe = self._assemble(self.transformer, self.text_encoder)
        device = self.text_encoder.device
        with torch.no_grad():
            chunks = [pipe.encode_prompt(prompt=prompts[i : i + ENCODE_BATCH], device=device,
                                         max_sequence_length=TEXT_TOKENS)
                      for i in range(0, len(prompts), ENCODE_BATCH)]  # fmt: skip
        embeds = torch.cat([e for e, _ in chunks])
        ids = torch.cat([i for _, i in chunks]).to(device=embeds.device, dtype=torch.long)
        return Conditioning({"encoder_hidden_states": embeds, "txt_ids": ids})

    # -- latents and the denoiser ----------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(128, height / 2f, width / 2f): the transformer's patch grid; sizes must be multiples of 2f."""
        multiple = self.vae_scale_factor * PATCH
        check_image_size(height, width, multiple, "FLUX.2 [klein]")
        return (self.transformer.config.in_channels, height // multiple, width // multiple)

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v [B, 128, h, w] of `model` (the transformer, a copy, or a peft/DDP/FSDP wrapper) at x [B, 128, h, w], s [B]."""
        pipeline = self.diffusers_pipeline()
        param_dtype = next(model.parameters()).dtype
        batch, channels, h, w = x.shape
        s = batch_levels(s, x)
        embeds = cond.tensors["encoder_hidden_states"]
        out = model(
            hidden_states=pipeline._pack_latents(x.to(param_dtype)),
            timestep=s.float(),  # the level itself: the transformer multiplies by 1000
            guidance=None,
            encoder_hidden_states=embeds if embeds.dtype == param_dtype else embeds.to(param_dtype),
            txt_ids=cond.tensors["txt_ids"],
            img_ids=pipeline._prepare_latent_ids(x).to(x.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(batch, channels, h, w)

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The levels Flux2KleinPipeline's scheduler uses for unshifted levels s at this size in a `steps`-step
        call (None: s is the whole schedule)."""
        steps = int(s.numel()) if steps is None else int(steps)
        return scheduler_shift(self.scheduler, s, image_mu(self.vae_scale_factor, height, width, steps), self.source)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Patch-grid latents [B, 128, h, w] -> images [B, 3, 16h, 16w] in [0, 1], float32, CPU, as the pipeline
        decodes: undo the batch norm, unpatchify, VAE decode."""
        vae = self.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        latents = self.diffusers_pipeline()._unpatchify_latents(latents * std + mean)
        with torch.no_grad():
            images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    # -- training and export helpers -------------------------------------------------------------

    def lora_target_modules(self) -> list[str]:
        """Every block's attention and feed-forward projections: the dual blocks' q/k/v/out of both streams and
        both SwiGLU feed-forwards, the single blocks' fused qkv+MLP input and output projections. Full module
        names, because the single blocks' `attn.to_out` is a Linear where the dual blocks' is a ModuleList."""
        dual = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                "ff_context.linear_out")  # fmt: skip
        single = ("attn.to_qkv_mlp_proj", "attn.to_out")
        config = self.transformer.config
        return [f"transformer_blocks.{i}.{name}" for i in range(config.num_layers) for name in dual] + [
            f"single_transformer_blocks.{i}.{name}" for i in range(config.num_single_layers) for name in single
        ]

    def block_classes(self) -> list[type[nn.Module]]:
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2SingleTransformerBlock,
            Flux2TransformerBlock,
        )

        return [Flux2TransformerBlock, Flux2SingleTransformerBlock]

def image_mu(vae_scale_factor: int, height: int, width: int, steps: int) -> float:
    """mu as Flux2KleinPipeline.__call__ computes it: `compute_empirical_mu` of the packed token count and the
    call's `num_inference_steps` (the scheduler config's shift values are not used by this pipeline)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    cells = vae_scale_factor * PATCH
    return compute_empirical_mu(image_seq_len=(height // cells) * (width // cells), num_steps=steps)
