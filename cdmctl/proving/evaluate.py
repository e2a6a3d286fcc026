"""Sample a teacher or student of the proving ground on the backbone-shifted schedule: plain Euler (CFG optional), or
sCM's consistency sampler for TBCM students."""

from __future__ import annotations

import torch
from torch import nn

from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.engine.rng import generator
from cdmctl.engine.simulate import simulate
from cdmctl.engine.trigflow import consistency_sample


def inference_levels(backbone: Backbone, steps: int, resolution: int, time_shift: bool = True) -> torch.Tensor:
    """The levels [steps] of an evenly spaced `steps`-step schedule (1, 1 - 1/n, ...), shifted by the backbone
    unless `time_shift` is False, float64."""
    unshifted = torch.tensor([1.0 - i / steps for i in range(steps)], dtype=torch.float64)
    return backbone.shift(unshifted, resolution, resolution).double() if time_shift else unshifted


def paired_noise(count: int, latent: tuple[int, ...], seed: int) -> torch.Tensor:
    """[count, *latent] starting noise, row i drawn from its own stream (seed, i): every model sees the same."""
    return torch.stack([torch.randn(latent, generator=generator(seed, "eval-noise", i)) for i in range(count)])


def paired_renoise(count: int, steps: int, latent: tuple[int, ...], seed: int) -> torch.Tensor:
    """[steps - 1, count, *latent]: the consistency sampler's fresh noise, row i from its own stream (seed, i)."""
    rows = [torch.randn((steps - 1, *latent), generator=generator(seed, "eval-renoise", i)) for i in range(count)]
    return torch.stack(rows, dim=1)


@torch.no_grad()
def sample(
    backbone: Backbone,
    module: nn.Module,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int,
    resolution: int,
    guidance: float = 1.0,
    null: Conditioning | None = None,
    chunk: int = 1024,
    sampler: str = "euler",
    seed: int = 0,
    time_shift: bool = True,
) -> torch.Tensor:
    """Final latents [B, C, h, w] from noise [B, ...] with conditioning [B]: `steps` steps, guidance.

    guidance 1 is one conditional forward per step (how students sample); otherwise the empty prompt's
    conditioning `null` [1] is batched with it: v = v_null + guidance (v_cond - v_null). `sampler`: "euler", or
    "consistency" (TBCM students), whose fresh noise at each step is paired per row like the starting noise.
    """
    if guidance != 1.0 and null is None:
        raise ValueError("guidance != 1 needs the empty prompt's conditioning (null)")
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    levels = inference_levels(backbone, steps, resolution, time_shift).to(device)
    renoise = paired_renoise(len(noise), steps, noise.shape[1:], seed) if sampler == "consistency" else None
    outs = []
    for start in range(0, len(noise), chunk):
        rows = slice(start, start + chunk)
        part_cond, part_noise = cond.index(rows).to(device), noise[rows].to(device)

        def velocity(x: torch.Tensor, s: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            c = part_cond.index(index)
            if guidance == 1.0:
                return backbone.velocity(module, x, s, c).float()
            both = Conditioning.cat([c, null.to(device).expand(len(x))])
            v_cond, v_null = backbone.velocity(module, torch.cat([x, x]), torch.cat([s, s]), both).float().chunk(2)
            return v_null + guidance * (v_cond - v_null)

        if renoise is not None:
            outs.append(consistency_sample(velocity, part_noise, levels, renoise[:, rows].to(device)).cpu())
            continue
        last = torch.full((len(part_noise),), steps - 1, dtype=torch.long)
        outs.append(simulate(velocity, part_noise, levels, last, keep_final=True).final.cpu())
    module.train(was_training)
    return torch.cat(outs)


@torch.no_grad()
def evaluate(backbone: Backbone, module: nn.Module, gt, cond: Conditioning, null: Conditioning, steps: list[int],
             resolution: int, guidance: float = 1.0, per_prompt: int = 32, seed: int = 0,
             sampler: str = "euler", time_shift: bool = True) -> dict[int, dict]:  # fmt: skip
    """metric dict per step count: `per_prompt` samples of every prompt, paired noise, against the reference."""
    from cdmctl.proving import metrics

    ref, ref_idx = metrics.reference_set(gt)
    idx = torch.arange(gt.num_prompts).repeat_interleave(per_prompt)
    noise = paired_noise(len(idx), gt.latent_shape, seed)
    rows = cond.index(idx)
    out = {}
    for n in steps:
        x = sample(backbone, module, rows, noise, n, resolution, guidance, null, sampler=sampler, seed=seed,
                   time_shift=time_shift)
        out[n] = metrics.score(gt, x, idx, ref, ref_idx)
    return out
