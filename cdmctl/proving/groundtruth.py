"""The proving ground's data distribution: per-prompt mixtures of latent patterns with an exact denoiser.

Each prompt "a <color> <shape>" owns `modes_per_prompt` modes. A mode is a latent pattern [C, h, w]: a
dark background, the shape drawn in the color (decided early in sampling: large differences between
prompts), plus one small bright dot at one of `modes_per_prompt` dot positions (the only difference between a
prompt's modes: small, so it is decided late, at low noise, where few-step samplers blur it). A sample
is its mode plus isotropic Gaussian noise of standard deviation `noise`. Everything is a pure function
of `GroundTruthSpec`, so the ground truth is exact and rebuilt anywhere.

Because the distribution is a Gaussian mixture, the exact velocity `E[eps - x0 | x_s]` is known in
closed form (`exact_velocity`): the ideal teacher, which shows how hard the toy is before any training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

COLORS: dict[str, tuple[float, float, float, float]] = {
    # channel values of the shape: channels 0-2 are shown as RGB, channel 3 is a fourth "hidden" one
    "red": (1.0, -0.6, -0.6, 0.6),
    "green": (-0.6, 1.0, -0.6, -0.6),
    "blue": (-0.6, -0.6, 1.0, 0.6),
    "yellow": (1.0, 1.0, -0.6, -0.6),
    "purple": (0.8, -0.6, 0.8, 0.6),
    "white": (1.0, 1.0, 1.0, -0.6),
}
SHAPES = ("cat", "dog", "bird", "fish")  # prompt words; each names one shape mask below
BACKGROUND = (-0.8, -0.8, -0.8, 0.0)


def shape_mask(name: str, size: int) -> torch.Tensor:
    """[size, size] float {0, 1}: cat = centred square, dog = plus, bird = frame, fish = diagonal band."""
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    q = size // 4
    masks = {
        "cat": (i >= q) & (i < size - q) & (j >= q) & (j < size - q),
        "dog": ((i >= 2 * q - q // 2) & (i < 2 * q + q - q // 2)) | ((j >= 2 * q - q // 2) & (j < 2 * q + q - q // 2)),
        "bird": (i < q // 2 + 1) | (i >= size - q // 2 - 1) | (j < q // 2 + 1) | (j >= size - q // 2 - 1),
        "fish": (i - j).abs() <= q // 2,
    }
    return masks[name].float()


@dataclass(frozen=True)
class GroundTruthSpec:
    """Everything that defines the distribution (defaults: the shipped toy teacher's)."""

    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    modes_per_prompt: int = 4
    channels: int = 4
    size: int = 8  # latent height = width
    dot: int = 2  # dot side in latent pixels
    dot_amplitude: float = 0.45
    noise: float = 0.02
    shared_dots: bool = True  # every prompt uses the same dot positions (else each draws its own)
    seed: int = 0  # picks the dot positions


class ExactDistribution:
    """What every proving ground's ground truth shares: its latent shape, prompt count, per-prompt sampling and the
    exact velocity from its exact posterior mean (`exact_x0`, the subclass's)."""

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.size, self.spec.size)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def sample_per_prompt(self, n: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples of every prompt: (x0 [P * n, C, h, w], prompt indices [P * n])."""
        idx = torch.arange(self.num_prompts).repeat_interleave(n)
        return self.sample(idx, gen), idx

    def exact_velocity(self, x: torch.Tensor, s: torch.Tensor, prompt_idx: torch.Tensor | None) -> torch.Tensor:
        """v = E[eps - x0 | x_s] = (x - E[x0 | x_s]) / s, [B, C, h, w]."""
        s_b = torch.as_tensor(s, dtype=x.dtype).expand(len(x)).view(-1, *[1] * (x.dim() - 1))
        return (x - self.exact_x0(x, s, prompt_idx)) / s_b


@dataclass
class GroundTruth(ExactDistribution):
    """The prompts, their modes [P, K, C, h, w] and the sampler, exact denoiser and mode lookup."""

    spec: GroundTruthSpec = field(default_factory=GroundTruthSpec)

    def __post_init__(self):
        sp = self.spec
        self.prompts = [f"a {c} {s}" for c, s in itertools.product(sp.colors, sp.shapes)]
        gen = torch.Generator().manual_seed(sp.seed)
        cells = (sp.size // sp.dot) ** 2
        modes = []
        shared = torch.randperm(cells, generator=gen)[: sp.modes_per_prompt]
        for color, shape in itertools.product(sp.colors, sp.shapes):
            col = torch.tensor(COLORS[color])[:, None, None]
            bg = torch.tensor(BACKGROUND)[:, None, None]
            mask = shape_mask(shape, sp.size)
            base = bg * (1 - mask) + col * mask  # [C, h, w]
            positions = shared if sp.shared_dots else torch.randperm(cells, generator=gen)[: sp.modes_per_prompt]
            modes.append(torch.stack([base + self._dot(int(p)) for p in positions]))
        self.modes = torch.stack(modes)  # [P, K, C, h, w]

    def _dot(self, cell: int) -> torch.Tensor:
        sp = self.spec
        per_row = sp.size // sp.dot
        r, c = divmod(cell, per_row)
        out = torch.zeros(sp.channels, sp.size, sp.size)
        out[:, r * sp.dot : (r + 1) * sp.dot, c * sp.dot : (c + 1) * sp.dot] = sp.dot_amplitude
        return out

    @property
    def num_modes(self) -> int:
        return self.spec.modes_per_prompt

    def sample(self, prompt_idx: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """x0 [B, C, h, w] for prompt indices [B]: a uniformly chosen mode of each prompt plus noise."""
        prompt_idx = torch.as_tensor(prompt_idx, dtype=torch.long)
        k = torch.randint(self.num_modes, prompt_idx.shape, generator=gen)
        noise = torch.randn((len(prompt_idx), *self.latent_shape), generator=gen)
        return self.modes[prompt_idx, k] + self.spec.noise * noise

    def exact_x0(self, x: torch.Tensor, s: torch.Tensor, prompt_idx: torch.Tensor | None) -> torch.Tensor:
        """E[x0 | x_s = x] [B, C, h, w] for x_s = (1 - s) x0 + s eps; prompt_idx None = unconditional."""
        s = torch.as_tensor(s, dtype=x.dtype).expand(len(x)).view(-1, 1)
        flat = x.flatten(1)
        modes = self.modes.flatten(2).to(x)  # [P, K, D]
        means = modes[prompt_idx] if prompt_idx is not None else modes.flatten(0, 1).expand(len(x), -1, -1)
        var = (1 - s) ** 2 * self.spec.noise**2 + s**2  # [B, 1]
        logits = -((flat[:, None] - (1 - s)[:, None] * means) ** 2).sum(-1) / (2 * var)  # [B, M]
        w = logits.softmax(-1)
        gain = (1 - s) * self.spec.noise**2 / var  # posterior mean of x0 given its mode
        per_mode = means + gain[:, None] * (flat[:, None] - (1 - s)[:, None] * means)
        return (w[..., None] * per_mode).sum(1).view_as(x)

    def nearest_modes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt [B], mode [B], RMS distance [B]) of each sample's nearest mode over all prompts."""
        modes = self.modes.flatten(2).flatten(0, 1).double()  # [P * K, D]
        d = torch.cdist(x.flatten(1).double(), modes) / modes.shape[1] ** 0.5
        dist, flat = d.min(1)
        return flat // self.num_modes, flat % self.num_modes, dist

    def min_mode_separation(self) -> float:
        """Smallest RMS distance between two modes of the same prompt."""
        modes = self.modes.flatten(2).double()  # [P, K, D]
        d = torch.cdist(modes, modes) / modes.shape[2] ** 0.5 + 1e9 * torch.eye(self.num_modes, dtype=torch.float64)
        return float(d.min())
