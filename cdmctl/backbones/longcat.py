"""LongCat-Image adapter: a `LongCatImagePipeline` (hub id or folder) behind the Backbone interface.

The engine sees unpacked latents [B, 16, h, w] like every family; `velocity` packs them into the transformer's
2x2 patches [B, (h/2)(w/2), 64] with the pipeline's own `_pack_latents`, adds the image position ids the
pipeline builds for that size, and unpacks the prediction again. Text goes through the pipeline's own
`encode_prompt` (chat-template prefix and suffix, 512 tokens, the Qwen2.5-VL text encoder's last hidden state),
with the pipeline's prompt rewriting never called: it is a `generate` with the text encoder, which would make a
training prompt's conditioning depend on sampled text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdmctl.backbones.base import Conditioning
from cdmctl.backbones.family import OneTextEncoderFamily, check_image_size
from cdmctl.backbones.flow import batch_levels, decode_latents, scheduler_shift

LATENT_CHANNELS = 16  # the pipeline hard-codes num_channels_latents = 16
PATCH = 2  # latents are packed in 2x2 patches
ENCODE_BATCH = 16  # prompts per text-encoder forward


class LongCatBackbone(OneTextEncoderFamily):
    """LongCat-Image (`LongCatImagePipeline` folders): Qwen2.5-VL text encoder, packed latents with 3-axis
    position ids, flow matching with the resolution-dependent dynamic shift.

    Conditioning: `encoder_hidden_states` [B, 512, joint_attention_dim] and `txt_ids` [B, 512, 3] (int64, so
    mixed precision never rounds a position; identical rows, the transformer takes one). Timestep = s: the
    pipeline passes `t / 1000`, and the transformer multiplies by 1000 itself.
    """

    family = "longcat"
    pipeline_class = "LongCatImagePipeline"
    display_name = "LongCat-Image"
    example_id = "meituan-longcat/LongCat-Image"
    builtin = "builtin:tiny-longcat"
    # The Qwen2VLProcessor serves only prompt rewriting, which cdmctl never calls; loading it needs torchvision.
    unused_parts: tuple[str, ...] = ("text_processor",)
    fixed_text_length = ("LongCat-Image: its pipeline always encodes 512 text tokens (and places the image positions "
                         "after them)")

    def __init__(self, parts: dict[str, Any], **where: Any):  # source, revision, dtype, device
        super().__init__(parts, **where)
        self._image_ids: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        # the pipeline's text length (512, set in its __init__), which is also where its image positions start
        self.text_tokens: int = self._assemble(self.transformer, self.text_encoder).tokenizer_max_length

    # -- family traits (class-level: usable on a pipeline without loading the adapter) -------------

    @staticmethod
    def sampling_kwargs() -> dict[str, Any]:
        """Prompt rewriting off: the pipeline's default would rewrite each prompt with the text encoder."""
        return {"enable_prompt_rewrite": False}

    @staticmethod
    def teacher_sampling() -> dict[str, Any]:
        """LongCatImagePipeline's own defaults (its CFG renormalisation stays on, as the pipeline does)."""
        return {"num_inference_steps": 50, "guidance_scale": 4.5}

    @staticmethod
    def guidance_kwargs(scale: float) -> dict[str, Any]:
        """CFG convention: `guidance_scale` is the standard scale (CFG when > 1, the negative prompt "" by default,
        conditional and unconditional in two calls), then the pipeline renormalises it (`enable_cfg_renorm`)."""
        return {"guidance_scale": float(scale)}

    @staticmethod
    def accept_embeddings(pipe: Any) -> None:
        """LongCatImagePipeline.encode_prompt reads `len(prompt)` even when given `prompt_embeds` (diffusers 0.42;
        diffusers issue #13636), so a call with embeddings alone fails. This pipeline's encode_prompt gets a
        placeholder list of the embeddings' batch size in that case: only its length is read."""
        original = pipe.encode_prompt

        def encode_prompt(prompt=None, num_images_per_prompt=1, prompt_embeds=None):
            if prompt is None and prompt_embeds is not None:
                prompt = [""] * prompt_embeds.shape[0]
            return original(prompt=prompt, num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds)

        pipe.encode_prompt = encode_prompt

    @staticmethod
    def image_multiple(pipe: Any) -> int:
        return pipe.vae_scale_factor * PATCH

    @staticmethod
    def scheduler_kwargs(pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        """The pipeline passes mu (for the image's packed sequence length) to every set_timesteps call."""
        return {"mu": image_mu(pipe.scheduler.config, pipe.vae_scale_factor, height, width)}

    # -- prompts ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> `encoder_hidden_states` [B, 512, D] and `txt_ids` [B, 512, 3], as the pipeline encodes them.

        The empty prompt gives the conditioning the pipeline uses for its negative prompt ("" by default).
        """
        prompts = self.prompt_list(prompts)
        pipe = self._assemble(self.transformer, self.text_encoder)
        with torch.no_grad():  # in chunks: a whole prompt file at once would hold every activation of a 7B model
            chunks = [pipe.encode_prompt(prompt=prompts[i : i + ENCODE_BATCH])
                      for i in range(0, len(prompts), ENCODE_BATCH)]  # fmt: skip
        embeds, text_ids = torch.cat([e for e, _ in chunks]), chunks[0][1]
        ids = text_ids.to(dtype=torch.long, device=embeds.device)
        return Conditioning({"encoder_hidden_states": embeds, "txt_ids": ids.expand(len(prompts), *ids.shape)})

    # -- latents and the denoiser ----------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(16, height / f, width / f) with f the VAE scale factor; sizes must be multiples of 2 f (the packing)."""
        multiple = self.vae_scale_factor * PATCH
        check_image_size(height, width, multiple, "LongCat-Image")
        f = self.vae_scale_factor
        return (LATENT_CHANNELS, height // f, width // f)

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v [B, 16, h, w] of `model` (the transformer, a copy, or a peft/DDP/FSDP wrapper) at x [B, 16, h, w], s [B]."""
        pipeline = self.diffusers_pipeline()
        param_dtype = next(model.parameters()).dtype
        batch, channels, h, w = x.shape
        s = batch_levels(s, x)
        packed = pipeline._pack_latents(x.to(param_dtype), batch, channels, h, w)
        embeds = cond.tensors["encoder_hidden_states"]
        out = model(
            hidden_states=packed,
            timestep=s.float(),  # the level itself: the transformer multiplies by 1000 (in its own dtype)
            guidance=None,
            encoder_hidden_states=embeds if embeds.dtype == param_dtype else embeds.to(param_dtype),
            txt_ids=shared_text_ids(cond.tensors["txt_ids"]),
            img_ids=self.image_ids(h, w, x.device),
            return_dict=False,
        )[0]
        f = self.vae_scale_factor
        return pipeline._unpack_latents(out, h * f, w * f, f)

    def image_ids(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Position ids of the packed latent grid, exactly as `prepare_latents` builds them (cached per size)."""
        key = (h, w, device)
        if key not in self._image_ids:
            from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

            start = self.text_tokens
            ids = prepare_pos_ids(modality_id=1, type="image", start=(start, start), height=h // PATCH,
                                  width=w // PATCH)  # fmt: skip
            self._image_ids[key] = ids.to(device)
        return self._image_ids[key]

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The levels LongCatImagePipeline's scheduler uses for unshifted levels s (any shape) at this image size
        (any step count)."""
        mu = image_mu(self.scheduler.config, self.vae_scale_factor, height, width)
        return scheduler_shift(self.scheduler, s, mu, self.source)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] (unpacked) -> images [B, 3, H, W] in [0, 1], float32, CPU."""
        return decode_latents(self.vae, latents)

    # -- training and export helpers -------------------------------------------------------------

    def lora_target_modules(self) -> list[str]:
        """Attention projections of both block kinds (single blocks match the to_q/k/v names) and the dual blocks'
        feed-forwards: the CDM reference's LongCat list with its feed-forward option on."""
        return [
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ]  # fmt: skip

    def block_classes(self) -> list[type[nn.Module]]:
        from diffusers.models.transformers.transformer_longcat_image import (
            LongCatImageSingleTransformerBlock,
            LongCatImageTransformerBlock,
        )

        return [LongCatImageTransformerBlock, LongCatImageSingleTransformerBlock]

def shared_text_ids(txt_ids: torch.Tensor) -> torch.Tensor:
    """The one [L, 3] row the transformer takes (float32, as the pipeline passes it) of batch-first ids [B, L, 3]."""
    first = txt_ids[0]
    if txt_ids.shape[0] > 1 and not bool((txt_ids == first).all()):
        raise ValueError("LongCat text position ids differ within a batch; the transformer takes one set for all")
    return first.float()


def image_mu(config: Any, vae_scale_factor: int, height: int, width: int) -> float:
    """mu of the dynamic shift as LongCatImagePipeline.__call__ computes it: its own calculate_shift of the packed
    image sequence length, with the same config fallbacks."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    cells = vae_scale_factor * PATCH
    image_seq_len = (height // cells) * (width // cells)
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
