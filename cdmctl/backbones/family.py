"""What the diffusers family adapters share: the pipeline class by name, the traits most families leave at
their default, the parts and loading of a one-text-encoder family, and the checks and clean-up they all make."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cdmctl.backbones.loading import load_parts, resolve_dtype
from cdmctl.errors import UserError


class DiffusersFamily:
    """Defaults of the family traits (class-level, see `Backbone`); an adapter overrides what its family does
    differently. `pipeline_class` names the diffusers pipeline its folders hold."""

    pipeline_class: str

    @classmethod
    def diffusers_pipeline(cls) -> type:
        import diffusers

        try:
            return getattr(diffusers, cls.pipeline_class)
        except AttributeError as e:
            raise UserError(f"this diffusers has no {cls.pipeline_class}",
                            "upgrade diffusers: pip install -U diffusers") from e  # fmt: skip

    @staticmethod
    def sampling_kwargs() -> dict[str, Any]:
        """Nothing beyond the common arguments."""
        return {}

    @staticmethod
    def student_scheduler(scheduler: Any) -> Any:
        """The pipeline's own scheduler: training shifts levels exactly as it does."""
        return scheduler

    @staticmethod
    def embedding_kwargs(cond: Any) -> dict[str, Any]:
        """The text embeddings alone (the pipeline derives the text positions from their length)."""
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"]}

    @staticmethod
    def accept_embeddings(pipe: Any) -> None:
        """Nothing: the pipeline takes `prompt_embeds` without a prompt."""

    @staticmethod
    def student_pipeline_config() -> dict[str, Any]:
        """None: the family's pipeline has no flag for a few-step model."""
        return {}


class OneTextEncoderFamily(DiffusersFamily):
    """A pipeline of one text encoder and its tokenizer (LongCat, FLUX.2 [klein], Qwen-Image, Z-Image): the parts
    the adapter keeps, loading them from a folder or hub id, releasing the text encoder and loading it again for a
    pipeline, and the family's pipeline over those parts. The adapter adds its traits, encoding and denoiser."""

    display_name: str
    example_id: str  # a hub id, for the fix line of a missing folder
    builtin: str  # its tiny built-in model, likewise
    fixed_text_length: str  # why the family takes no `model.text_length` (completes refuse_text_length's line)

    def __init__(self, parts: dict[str, Any], *, source: str, revision: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):  # fmt: skip
        self.source, self.revision, self.dtype, self.device = source, revision, dtype, torch.device(device)
        self.transformer: nn.Module = parts["transformer"]
        self.vae = parts["vae"]
        self.scheduler = self.student_scheduler(parts["scheduler"])
        self.text_encoder = parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.vae_scale_factor: int = self.vae_factor(self.vae)

    @staticmethod
    def vae_factor(vae: Any) -> int:
        """Pixels per latent cell, as the family's pipeline computes its `vae_scale_factor`."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, source: str, *, revision: str | None = None, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", max_sequence_length: int | None = None) -> Any:  # fmt: skip
        """Load every part but the unused ones from a hub id or a local folder onto `device` in `dtype`."""
        refuse_text_length(max_sequence_length, cls.fixed_text_length)
        dtype = resolve_dtype(dtype)
        parts = load_parts(cls, source, revision=revision, dtype=dtype, device=device)
        return cls(parts, source=source, revision=revision, dtype=dtype, device=device)

    def prompt_list(self, prompts: Sequence[str]) -> list[str]:
        """`prompts` (or one prompt) as a non-empty list, refused once the text encoder is released."""
        if self.text_encoder is None:
            raise RuntimeError(
                f"{type(self).__name__}.encode_prompts called after release_text_encoders(); encode (and cache) "
                "every prompt, including the empty one, before releasing the text encoder"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        return prompts

    def release_text_encoders(self) -> None:
        """Drop the text encoder (a 4B-8B language model in these families) and return its memory."""
        self.text_encoder = None
        free_memory()

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """The family's pipeline sharing this backbone's parts, with `transformer` (unwrapped) in place and its unused
        parts None. A released text encoder is loaded again from `source` for this pipeline only."""
        text_encoder = self.text_encoder
        if text_encoder is None:
            reloaded = load_parts(type(self), self.source, revision=self.revision, dtype=self.dtype,
                                  device=self.device, skip=("transformer", "vae"))  # fmt: skip
            text_encoder = reloaded["text_encoder"]
        return self._assemble(self.transformer if transformer is None else transformer, text_encoder)

    def _assemble(self, transformer: nn.Module, text_encoder: nn.Module | None) -> Any:
        pipe = self.diffusers_pipeline()(scheduler=self.scheduler, vae=self.vae, text_encoder=text_encoder,
                                         tokenizer=self.tokenizer, transformer=transformer,
                                         **dict.fromkeys(self.unused_parts))  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe


def check_image_size(height: int, width: int, multiple: int, model: str) -> None:
    """An image size the family's latents can hold: positive multiples of `multiple`."""
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise UserError(f"image size {height}x{width} does not fit this {model} model",
                        f"use a height and width that are positive multiples of {multiple}")  # fmt: skip


def refuse_text_length(max_sequence_length: int | None, why: str) -> None:
    """A family whose pipeline fixes its text length takes no `model.text_length`; `why` completes the line."""
    if max_sequence_length is not None:
        raise UserError(f"model.text_length does not apply to {why}",
                        "remove model.text_length from the preset (leave it null)")  # fmt: skip


def free_memory() -> None:
    """Return the memory of modules just dropped (text encoders) to the allocator and the GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
