"""The backbone interface the engine sees: batch-first conditioning and a velocity predictor per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@dataclass
class Conditioning:
    """Prompt conditioning as named tensors whose first dimension is the batch.

    Families put whatever their transformer needs here (SD3: `encoder_hidden_states` [B, L, D] and
    `pooled_projections` [B, P]); the engine only indexes, concatenates and moves it.
    """

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx: torch.Tensor | slice | Sequence[int]) -> "Conditioning":
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning({k: move(v) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        keys = parts[0].tensors.keys()
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})

    def expand(self, batch: int) -> "Conditioning":
        """Repeat a batch-1 conditioning (e.g. the empty prompt) `batch` times."""
        return Conditioning({k: v.expand(batch, *v.shape[1:]) for k, v in self.tensors.items()})


@runtime_checkable
class Backbone(Protocol):
    """One model family. `transformer` is the denoiser that the roles copy or adapt.

    Noise level `s` is in [0, 1] (1 = noise); the adapter converts it to the family's timestep.

    The family traits (`family` ... `scheduler_kwargs`) are class-level in every adapter: export, generate and
    eval use them on the adapter class for a diffusers pipeline they loaded themselves, with no weights of the
    adapter loaded, so that none of them needs to name a family.
    """

    transformer: nn.Module
    source: str  # hub id or folder the parts were loaded from

    # -- family traits ------------------------------------------------------------------------------

    family: str  # the name it is registered under (model.backbone)
    pipeline_class: str  # the diffusers pipeline class its folders hold (model_index.json `_class_name`)
    unused_parts: tuple[str, ...]  # pipeline parts cdmctl never calls: not loaded; exports copy them from the base

    def sampling_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of every pipeline call that samples this family (student and teacher)."""
        ...

    def teacher_sampling(self) -> dict[str, Any]:
        """The base model's own many-step settings: `num_inference_steps`, and `guidance_scale` as cdmctl's
        standard CFG scale (translated for the pipeline by `guidance_kwargs`)."""
        ...

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """The pipeline call arguments that sample with the standard CFG `uncond + scale (cond - uncond)`, the
        empty prompt as the unconditional one (the CFG the engine's teacher uses); scale 1 is no guidance.

        This is where a family states its CFG convention: SD3 passes `guidance_scale` as it is, Z-Image's pipeline
        computes `cond + g (cond - uncond)` (so g = scale - 1), Qwen-Image's guides only with `true_cfg_scale`
        and a negative prompt.
        """
        ...

    def student_scheduler(self, scheduler: Any) -> Any:
        """The scheduler a student of this family samples with, from its pipeline's scheduler: the same one unless
        the family's training shift leaves out a whole-schedule option of it (Qwen-Image: `shift_terminal`)."""
        ...

    def student_pipeline_config(self) -> dict[str, Any]:
        """Pipeline config entries (model_index.json) that an exported student sets: how the family's own
        pipeline marks a few-step model (FLUX.2 [klein]: `is_distilled: true`, so guidance is ignored); usually none."""
        ...

    def image_multiple(self, pipe: Any) -> int:
        """Image sizes the family's pipeline `pipe` makes without resizing are multiples of this."""
        ...

    def scheduler_kwargs(self, pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        """What the pipeline `pipe` passes to `scheduler.set_timesteps` besides the sigmas at this size, for a
        `steps`-step call (e.g. `mu`; Flux.2's depends on the step count)."""
        ...

    def embedding_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        """The pipeline call arguments that pass the prompts' cached `Conditioning` (from `encode_prompts`) in
        place of prompt strings, for a call without CFG (how a student samples): `prompt_embeds` and whatever else
        the family's pipeline takes beside it. With them a pipeline samples without its text encoders."""
        ...

    def accept_embeddings(self, pipe: Any) -> None:
        """Make the pipeline `pipe` take `embedding_kwargs` without prompt strings where its diffusers version
        cannot (LongCat); usually nothing to do."""
        ...

    # -- the model ----------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text encoders on `prompts` -> batch-first conditioning (no gradients)."""
        ...

    def release_text_encoders(self) -> None:
        """Free the text encoders (after the embeddings are cached)."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent (without batch) for an image of this size."""
        ...

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity `v ~ eps - x0` of `model` (this family's transformer) at latents x [B, ...], levels s [B]."""
        ...

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The family's time shift of unshifted levels s, exactly as its diffusers scheduler applies it to a
        `steps`-step schedule at this size (None: s is the whole schedule, steps = its size)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, ...] -> images [B, 3, H, W] in [0, 1] (float32, CPU)."""
        ...

    def lora_target_modules(self) -> list[str]:
        """Module names LoRA adapts by default (attention and feed-forward projections)."""
        ...

    def block_classes(self) -> list[type[nn.Module]]:
        """Transformer block classes to wrap for FSDP and gradient checkpointing."""
        ...

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """The family's diffusers pipeline with `transformer` (default: the loaded one) in place."""
        ...
