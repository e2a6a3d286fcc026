"""A pure-torch toy backbone (tiny MLP over small latents) for fast engine tests and the proving ground."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cdmctl.backbones.base import Conditioning
from cdmctl.errors import UserError


def _text_seed(text: str) -> int:
    """Stable seed of a prompt (blake2b, not the per-process salted hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & ((1 << 63) - 1)


class ToyVelocityNet(nn.Module):
    """v(x [B, C, H, W], s [B], emb [B, D]) -> [B, C, H, W]: an MLP on [flat x, Fourier(s), emb]."""

    def __init__(self, channels: int, size: int, embed_dim: int, hidden: int, n_freqs: int = 4):
        super().__init__()
        self.latent = (channels, size, size)
        self.register_buffer("freqs", math.pi * torch.arange(1, n_freqs + 1, dtype=torch.float32), persistent=False)
        features = channels * size * size + 1 + 2 * n_freqs + embed_dim
        self.proj_in = nn.Linear(features, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.proj_out = nn.Linear(hidden, channels * size * size)

    def forward(self, x: torch.Tensor, s: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        dtype = self.proj_in.weight.dtype
        ang = s.float()[:, None] * self.freqs
        # s itself plus sin/cos features: the network must resolve small level differences
        time = torch.cat([s.float()[:, None], ang.sin(), ang.cos()], dim=1)
        h = torch.cat([x.flatten(1).to(dtype), time.to(dtype), emb.to(dtype)], dim=1)
        h = F.silu(self.proj_in(h))
        h = F.silu(self.hidden(h))
        return self.proj_out(h).view(x.shape[0], *self.latent).to(x.dtype)


class ToyBackbone:
    """The Backbone protocol over ToyVelocityNet; prompts embed deterministically from their text.

    Latents are [B, channels, size, size]; images are `size * scale_factor` pixels square. The time
    shift is the static `k s / (1 + (k - 1) s)` (k = 1: none). Weights are a pure function of `seed`.
    """

    family = "toy"  # not registered: built directly by tests and the proving ground
    pipeline_class = ""  # no diffusers pipeline
    unused_parts: tuple[str, ...] = ()

    @staticmethod
    def sampling_kwargs() -> dict[str, Any]:
        return {}

    @staticmethod
    def teacher_sampling() -> dict[str, Any]:
        return {}

    @staticmethod
    def guidance_kwargs(scale: float) -> dict[str, Any]:
        return {"guidance_scale": float(scale)}

    @staticmethod
    def student_scheduler(scheduler: Any) -> Any:
        """The pipeline's own scheduler: training shifts levels exactly as it does."""
        return scheduler

    @staticmethod
    def student_pipeline_config() -> dict[str, Any]:
        """None: the family's pipeline has no flag for a few-step model."""
        return {}

    @staticmethod
    def image_multiple(pipe: Any) -> int:
        return 1

    @staticmethod
    def scheduler_kwargs(pipe: Any, height: int, width: int, steps: int) -> dict[str, Any]:
        return {}

    @staticmethod
    def accept_embeddings(pipe: Any) -> None:
        """No pipeline (see `pipeline`)."""

    @staticmethod
    def embedding_kwargs(cond: Conditioning) -> dict[str, Any]:
        """No pipeline to pass them to (see `pipeline`)."""
        raise UserError("the toy backbone has no diffusers pipeline", fix="sample a diffusers backbone's student")

    def __init__(
        self,
        channels: int = 2,
        size: int = 4,
        embed_dim: int = 8,
        hidden: int = 64,
        shift: float = 1.0,
        scale_factor: int = 8,
        seed: int = 0,
    ):
        self.source = "toy"
        self.channels, self.size, self.embed_dim = channels, size, embed_dim
        self.shift_k, self.scale_factor = shift, scale_factor
        # fork_rng: a seeded init that leaves the caller's global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer: nn.Module = ToyVelocityNet(channels, size, embed_dim, hidden)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> Conditioning({"embedding": [B, D]}); "" -> zeros (the null conditioning)."""
        rows = []
        for text in prompts:
            if text == "":
                rows.append(torch.zeros(self.embed_dim))
            else:
                gen = torch.Generator().manual_seed(_text_seed(text))
                rows.append(torch.randn(self.embed_dim, generator=gen))
        return Conditioning({"embedding": torch.stack(rows) if rows else torch.zeros(0, self.embed_dim)})

    def release_text_encoders(self) -> None:
        """Nothing to free: the toy has no text encoder."""

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        pixels = self.size * self.scale_factor
        if (height, width) != (pixels, pixels):
            raise UserError(
                f"the toy backbone makes {pixels}x{pixels} images, not {height}x{width}",
                fix=f"set model.resolution = {pixels}",
            )
        return (self.channels, self.size, self.size)

    def velocity(self, model: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v of `model` at x [B, C, H, W], levels s [B], cond {"embedding": [B, D]} -> [B, C, H, W]."""
        return model(x, s, cond.tensors["embedding"])

    def shift(self, s: torch.Tensor, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        k = self.shift_k
        return k * s / (1 + (k - 1) * s)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, 3, h * scale, w * scale] in [0, 1]: channels cycled to RGB, sigmoid, upsampled."""
        rgb = latents.detach().float().cpu()[:, [j % self.channels for j in range(3)]]
        return F.interpolate(torch.sigmoid(rgb), scale_factor=self.scale_factor, mode="nearest")

    def lora_target_modules(self) -> list[str]:
        return [name for name, m in self.transformer.named_modules() if isinstance(m, nn.Linear)]

    def block_classes(self) -> list[type[nn.Module]]:
        return []

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        raise UserError(
            "the toy backbone has no diffusers pipeline",
            fix="export and sample with a diffusers backbone (model.backbone = sd3); the toy is for engine tests",
        )
