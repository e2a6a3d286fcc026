"""What the shared family tests need to know of each diffusers family beyond the adapter: how its own pipeline
encodes prompts, which layout its `latents=` argument and `output_type="latent"` result have, and its defaults.

These are facts about the diffusers pipelines, written independently of the adapters, so that the tests compare
the adapters with the pipelines rather than with themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FamilySpec:
    family: str
    pipeline: str  # the diffusers class name
    writer: str  # "module:function" of the tiny factory
    preset: str  # the family's CDM preset
    # pipe, prompts -> the conditioning tensors the adapter must produce (from the pipeline's own encode_prompt)
    encoding: Callable[[Any, list[str]], dict[str, torch.Tensor]]
    # engine latents [B, ...] -> the pipeline's `latents=` argument
    latents_in: Callable[[Any, torch.Tensor], torch.Tensor]
    # pipe, engine latents -> what a pipeline call with output_type="latent" returns for them
    latents_out: Callable[[Any, torch.Tensor], torch.Tensor]
    # the __call__ arguments of the teacher's steps and guidance, and the guidance argument's convention offset
    guidance_arg: str = "guidance_scale"
    guidance_offset: float = 0.0  # pipeline value = standard CFG scale - offset
    latent: tuple[int, int] = (16, 8)  # the engine's latents: channels, and pixels per latent cell
    cfg_renorm: bool = False  # the pipeline rescales a guided prediction per token to the conditional one's norm
    linspace_default: bool = True  # num_inference_steps alone samples linspace(1, 1/n, n) (before the shift)
    no_cfg: dict[str, Any] = field(default_factory=dict)  # pipeline arguments that sample without CFG

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def call_default(self, name: str):
        return inspect.signature(self.pipeline_class().__call__).parameters[name].default


def _flux2_encoding(pipe, prompts):
    embeds, ids = pipe.encode_prompt(prompt=prompts)
    return {"encoder_hidden_states": embeds, "txt_ids": ids}


def _flux2_out(pipe, x):
    """Flux2KleinPipeline's latent output: the batch norm undone and the 2x2 patches unfolded (VAE latents)."""
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    y = x * std + mean
    b, c, h, w = y.shape
    return y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def _zimage_encoding(pipe, prompts):
    """ZImagePipeline's own-length caption features, zero-padded to its 512 tokens, with their lengths."""
    features, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False)
    padded = torch.zeros(len(features), 512, features[0].shape[-1])
    for i, f in enumerate(features):
        padded[i, : len(f)] = f
    return {"cap_feats": padded, "cap_len": torch.tensor([len(f) for f in features])}


def _qwen_encoding(pipe, prompts):
    """QwenImagePipeline's encoding (padded to the batch's longest prompt, its mask dropped when all ones), padded to
    the 512 tokens its call allows."""
    embeds, mask = pipe.encode_prompt(prompt=list(prompts), max_sequence_length=512)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    pad = 512 - embeds.shape[1]
    return {"encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
            "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad))}


def _qwen_pack(pipe, x):
    return pipe._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])


SPECS = {
    "flux2-klein": FamilySpec(
        family="flux2-klein", pipeline="Flux2KleinPipeline",
        writer="cdmctl.backbones.tiny.flux2_klein:write_tiny_flux2_klein", preset="flux2-klein-4nfe",
        encoding=_flux2_encoding, latents_in=lambda pipe, x: x, latents_out=_flux2_out,
        latent=(128, 16), no_cfg={"guidance_scale": 1.0},
    ),
    "qwenimage": FamilySpec(
        family="qwenimage", pipeline="QwenImagePipeline", writer="cdmctl.backbones.tiny.qwenimage:write_tiny_qwenimage",
        preset="qwenimage-4nfe", encoding=_qwen_encoding, latents_in=_qwen_pack, latents_out=_qwen_pack,
        # true CFG: `true_cfg_scale` with a negative prompt, then rescaled per token to the conditional norm
        guidance_arg="true_cfg_scale", cfg_renorm=True, no_cfg={"true_cfg_scale": 1.0},
    ),
    "zimage": FamilySpec(
        family="zimage", pipeline="ZImagePipeline", writer="cdmctl.backbones.tiny.zimage:write_tiny_zimage",
        preset="zimage-4nfe", encoding=_zimage_encoding, latents_in=lambda pipe, x: x, latents_out=lambda pipe, x: x,
        # cond + g (cond - uncond): the standard scale is g + 1; its default sigmas are its own, not a linspace
        guidance_offset=1.0, linspace_default=False, no_cfg={"guidance_scale": 0.0},
    ),
}  # fmt: skip
