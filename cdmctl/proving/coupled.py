"""The second proving ground's data distribution: coarse object placements whose fine detail depends on them.

Each prompt "a <color> <shape>" draws a *placement* (the shape, in its color, at one of `placements` offsets:
large differences, decided at high noise) and then, independently and uniformly, the sign of each of the
placement's `medium` block features and `fine` pixel features. Where those features lie and which channels they
flip depends on the placement (the same layout for every prompt by default: a small teacher did not learn
96 separate layouts, issue 24's note), so fine detail is coupled to a coarse choice, as in real images (which
detail depends on which object). A sample is its mode plus isotropic Gaussian noise of standard deviation `noise`.
A prompt has placements x 2^(medium + fine) modes: too many to list, so everything uses the structure instead:
given a placement, the features have disjoint supports, so the exact posterior factorises over them.

`exact_x0` is E[x0 | x_s] in closed form (the ideal teacher), `nearest_modes` the closest mode of any prompt
(coverage is counted over placements).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from cdmctl.proving.groundtruth import BACKGROUND, COLORS, SHAPES, ExactDistribution, shape_mask

OFFSETS = ((0, 0), (0, 2), (2, 0), (2, 2), (-2, 0), (0, -2), (-2, -2), (2, -2))  # placements, in latent pixels


@dataclass(frozen=True)
class CoupledSpec:
    """Everything that defines the distribution (defaults: the shipped second toy teacher's)."""

    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    placements: int = 4
    medium: int = 2  # 2 x 2-pixel block features per placement (all channels, a sign pattern per channel)
    fine: int = 4  # 1-pixel features per placement (all channels, a sign pattern per channel)
    medium_amplitude: float = 0.3
    fine_amplitude: float = 0.5
    channels: int = 4
    size: int = 8
    noise: float = 0.02
    shared_layout: bool = True  # a placement's features are the same for every prompt (else drawn per prompt)
    seed: int = 0


@dataclass
class CoupledGroundTruth(ExactDistribution):
    """Prompts, placements [P, K, C, h, w] and features [P, K, F, C, h, w] (each a ±1 pattern times its amplitude)."""

    spec: CoupledSpec = field(default_factory=CoupledSpec)

    def __post_init__(self):
        sp = self.spec
        self.prompts = [f"a {c} {s}" for c, s in itertools.product(sp.colors, sp.shapes)]
        gen = torch.Generator().manual_seed(sp.seed)
        layouts = [self._features(gen) for _ in range(sp.placements)]
        bases, features = [], []
        for color, shape in itertools.product(sp.colors, sp.shapes):
            col, bg = torch.tensor(COLORS[color])[:, None, None], torch.tensor(BACKGROUND)[:, None, None]
            for k, offset in enumerate(OFFSETS[: sp.placements]):
                mask = torch.roll(shape_mask(shape, sp.size), shifts=offset, dims=(0, 1))
                bases.append(bg * (1 - mask) + col * mask)
                features.append(layouts[k] if sp.shared_layout else self._features(gen))
        k = sp.placements
        self.bases = torch.stack(bases).view(len(self.prompts), k, *self.latent_shape)
        self.features = torch.stack(features).view(len(self.prompts), k, -1, *self.latent_shape)

    def _features(self, gen: torch.Generator) -> torch.Tensor:
        """[medium + fine, C, h, w]: disjoint supports (medium blocks on a 2-pixel grid, fine pixels elsewhere)."""
        sp = self.spec
        blocks = torch.randperm((sp.size // 2) ** 2, generator=gen)[: sp.medium]
        taken = torch.zeros(sp.size, sp.size, dtype=torch.bool)
        out = []
        for b in blocks.tolist():
            r, c = divmod(b, sp.size // 2)
            f = torch.zeros(self.latent_shape)
            f[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = self._signs(gen)[:, None, None] * sp.medium_amplitude
            taken[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = True
            out.append(f)
        free = (~taken).flatten().nonzero().squeeze(1)
        for p in free[torch.randperm(len(free), generator=gen)[: sp.fine]].tolist():
            f = torch.zeros(self.latent_shape)
            f[:, p // sp.size, p % sp.size] = self._signs(gen) * sp.fine_amplitude
            out.append(f)
        return torch.stack(out)

    def _signs(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, (self.spec.channels,), generator=gen).float() * 2 - 1

    @property
    def num_modes(self) -> int:
        """The groups coverage counts: a prompt's placements."""
        return self.spec.placements

    def sample(self, prompt_idx: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """x0 [B, C, h, w] for prompt indices [B]: a uniform placement, uniform feature signs, plus noise."""
        prompt_idx = torch.as_tensor(prompt_idx, dtype=torch.long)
        k = torch.randint(self.spec.placements, prompt_idx.shape, generator=gen)
        signs = torch.randint(0, 2, (len(prompt_idx), self.features.shape[2]), generator=gen).float() * 2 - 1
        noise = torch.randn((len(prompt_idx), *self.latent_shape), generator=gen)
        detail = torch.einsum("bf,bfchw->bchw", signs.to(self.features), self.features[prompt_idx, k])
        return self.bases[prompt_idx, k] + detail + self.spec.noise * noise

    def _candidates(self, x: torch.Tensor, prompt_idx: torch.Tensor | None):
        """(bases [B, M, D], features [B, M, F, D]) of every placement x may come from (M = K, or P * K)."""
        d = math.prod(self.latent_shape)
        bases, feats = self.bases.flatten(2).to(x), self.features.flatten(3).to(x)  # [P, K, D], [P, K, F, D]
        if prompt_idx is None:
            return bases.view(1, -1, d).expand(len(x), -1, -1), feats.view(1, -1, *feats.shape[2:]).expand(len(x), -1, -1, -1)
        return bases[prompt_idx], feats[prompt_idx]

    def exact_x0(self, x: torch.Tensor, s: torch.Tensor, prompt_idx: torch.Tensor | None) -> torch.Tensor:
        """E[x0 | x_s = x] [B, C, h, w] for x_s = (1 - s) x0 + s eps; prompt_idx None = unconditional.

        Given a placement the feature signs are independent (disjoint supports): E[b_j] = tanh((1 - s) <r, f_j> / v)
        with r = x - (1 - s) base, v = (1 - s)^2 noise^2 + s^2; the placement's log-likelihood is
        -|r|^2 / 2v + sum_j log cosh((1 - s) <r, f_j> / v) up to a constant shared by all placements.
        """
        s = torch.as_tensor(s, dtype=x.dtype).expand(len(x)).reshape(-1, 1, 1)  # [B, 1, 1]
        flat = x.flatten(1)[:, None]  # [B, 1, D]
        bases, feats = self._candidates(x, prompt_idx)
        var = (1 - s) ** 2 * self.spec.noise**2 + s**2
        r = flat - (1 - s) * bases  # [B, M, D]
        z = (1 - s) * torch.einsum("bmd,bmfd->bmf", r, feats) / var  # [B, M, F]
        logits = -(r**2).sum(-1) / (2 * var[..., 0]) + (z.abs() + torch.log1p(torch.exp(-2 * z.abs()))).sum(-1)
        mean = bases + torch.einsum("bmf,bmfd->bmd", torch.tanh(z), feats)  # E[mode | placement]
        per_placement = mean + (1 - s) * self.spec.noise**2 / var * (flat - (1 - s) * mean)
        return (logits.softmax(-1)[..., None] * per_placement).sum(1).view_as(x)

    def nearest_modes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt [B], placement [B], RMS distance [B]) of each sample's nearest mode over all prompts: per
        placement the nearest mode takes each feature's sign from the sample's projection on it."""
        x = x.double()
        bases, feats = self._candidates(x, None)
        r = x.flatten(1)[:, None] - bases  # [B, P * K, D]
        signs = torch.einsum("bmd,bmfd->bmf", r, feats).sign()
        dist = (r - torch.einsum("bmf,bmfd->bmd", signs, feats)).square().mean(-1).sqrt()
        dist, flat = dist.min(1)
        return flat // self.spec.placements, flat % self.spec.placements, dist

    def min_mode_separation(self) -> float:
        """Smallest RMS distance between two modes of one prompt: one feature's sign flipped (placements differ more)."""
        norms = self.features.flatten(3).norm(dim=-1)  # [P, K, F]
        return float(2 * norms.min() / math.prod(self.latent_shape) ** 0.5)
