"""A run's prompts, as the loop draws them: the on-disk embedding cache (or live encoding), and each iteration's
batch of prompts and simulation noise."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.config.schema import Preset
from cdmctl.engine.step import Batch, Draws
from cdmctl.prompts import load_prompts

if TYPE_CHECKING:
    from cdmctl.embedcache import EmbeddingCache, Ranks


def prompt_bank(preset: Preset, source: str, backbone: Backbone, compute: torch.dtype,
                acc) -> "tuple[EmbeddingCache | LivePrompts, str | None]":  # fmt: skip
    """The run's prompts (data.prompts): from the embedding cache (built first if need be), or encoded as they are
    drawn (`data.cache_embeddings: false`). Returns (the bank, a line for the user or None)."""
    prompts = load_prompts(preset.data.prompts)
    if preset.data.cache_embeddings:
        return cached_prompts(preset, source, backbone, prompts, compute, acc)
    return LivePrompts(backbone, prompts), None


class LivePrompts:
    """Prompts encoded batch by batch as they are drawn (`data.cache_embeddings: false`); the text encoders stay."""

    def __init__(self, backbone: Backbone, prompts: list[str]):
        self.backbone, self.prompts = backbone, prompts
        self.null = backbone.encode_prompts([""]).to("cpu")

    def __len__(self) -> int:
        return len(self.prompts)

    def conditioning(self, indices: torch.Tensor) -> Conditioning:
        return self.backbone.encode_prompts([self.prompts[i] for i in indices.tolist()]).to("cpu")


def ranks_of(acc) -> "Ranks":
    """The embedding cache's view of the processes: barriers and an any-rank flag through accelerate."""
    from cdmctl.embedcache import Ranks

    def any_true(flag: bool) -> bool:
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)

    return Ranks(acc.process_index, acc.num_processes, acc.wait_for_everyone, any_true)


def cached_prompts(preset: Preset, source: str, backbone: Backbone, prompts: list[str], compute: torch.dtype, acc):
    """The run's prompts from the on-disk embedding cache, encoding it first (all ranks, each its share) if this
    model, text setting and prompt list have none yet. Returns (cache, a line for the user)."""
    import time

    from cdmctl.embedcache import default_root, key_fields, open_or_build

    model, data = preset.model, preset.data
    fields = key_fields(model.backbone, source, model.revision, model.text_length, compute, prompts)
    start = time.perf_counter()
    cache, built = open_or_build(default_root(data.embedding_cache), fields, prompts,
                                 lambda batch: backbone.encode_prompts(batch).to("cpu"), ranks_of(acc),
                                 shard_mb=data.cache_shard_mb, batch_size=data.encode_batch_size)  # fmt: skip
    verb = f"encoded {len(prompts)} prompts on {acc.num_processes} process(es) in {time.perf_counter() - start:.1f} s" \
        if built else f"reused the cache of {len(prompts)} prompts"  # fmt: skip
    return cache, f"prompt embeddings: {verb} ({cache.folder})"


def batch_maker(bank: "EmbeddingCache | LivePrompts", per_process: int, latent: tuple[int, ...], device: torch.device):
    """Per iteration and rank: random prompts and simulation noise from the iteration's own streams."""

    def make(draws: Draws) -> Batch:
        idx = draws.rows("prompts", per_process,
                         lambda g, n: torch.randint(len(bank), (n,), generator=g, device=g.device))  # fmt: skip
        cond = bank.conditioning(idx).to(device)
        noise = draws.rows("sim-noise", per_process, lambda g, n: torch.randn((n, *latent), generator=g, device=device))
        return Batch(cond=cond, null=bank.null.to(device).expand(per_process), noise=noise)

    return make
