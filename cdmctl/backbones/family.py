"""What the diffusers family adapters share: the pipeline class by name, the traits most families leave at
their default, the refusal of a text length a family fixes, and returning the text encoders' memory."""

from __future__ import annotations

import gc
from typing import Any

import torch

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
