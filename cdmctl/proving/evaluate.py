"""Sample a teacher or student of the proving ground: plain Euler (CFG optional) or sCM's consistency sampler (TBCM
students) on a student's levels, or a named training-free sampler (cdmctl.samplers: diffusers' schedulers)."""

from __future__ import annotations

import torch
from torch import nn

from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.engine.rng import generator
from cdmctl.engine.simulate import simulate
from cdmctl.engine.trigflow import consistency_sample
from cdmctl.samplers import unshifted_levels


def inference_levels(backbone: Backbone, steps: int, resolution: int, time_shift: bool = True,
                     rule: str = "uniform", levels: list[float] | None = None) -> torch.Tensor:  # fmt: skip
    """The levels [steps] a student samples at, float64: the preset's own `levels` (inference.levels) when there are
    `steps` of them, else `rule`'s (cdmctl.samplers; "uniform": 1, 1 - 1/n, ...; "trigflow": TBCM's), through the
    backbone's time shift, or without it (`time_shift` False)."""
    own = levels is not None and len(levels) == steps  # as generate and export sample it (Student.schedule)
    unshifted = torch.tensor(list(levels) if own else unshifted_levels(rule, steps), dtype=torch.float64)
    return backbone.shift(unshifted, resolution, resolution).double() if time_shift else unshifted


def paired_noise(count: int, latent: tuple[int, ...], seed: int) -> torch.Tensor:
    """[count, *latent] starting noise, row i drawn from its own stream (seed, i): every model sees the same."""
    return torch.stack([torch.randn(latent, generator=generator(seed, "eval-noise", i)) for i in range(count)])


def paired_renoise(count: int, steps: int, latent: tuple[int, ...], seed: int) -> torch.Tensor:
    """[steps - 1, count, *latent]: the consistency sampler's fresh noise, row i from its own stream (seed, i)."""
    rows = [torch.randn((steps - 1, *latent), generator=generator(seed, "eval-renoise", i)) for i in range(count)]
    return torch.stack(rows, dim=1)


def guided_velocity(backbone: Backbone, module: nn.Module, cond: Conditioning, guidance: float,
                    null: Conditioning | None, device: torch.device):  # fmt: skip
    """velocity(x, s, index) of `module` for rows `index` of `cond`: one conditional forward at guidance 1, else
    the pair with the empty prompt's `null` [1] batched, v = v_null + guidance (v_cond - v_null)."""
    if guidance != 1.0 and null is None:
        raise ValueError("guidance != 1 needs the empty prompt's conditioning (null)")

    def velocity(x: torch.Tensor, s: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        c = cond.index(index)
        if guidance == 1.0:
            return backbone.velocity(module, x, s, c).float()
        both = Conditioning.cat([c, null.to(device).expand(len(x))])
        v_cond, v_null = backbone.velocity(module, torch.cat([x, x]), torch.cat([s, s]), both).float().chunk(2)
        return v_null + guidance * (v_cond - v_null)

    return velocity


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
    rule: str = "uniform",
    levels: list[float] | None = None,
) -> torch.Tensor:
    """Final latents [B, C, h, w] from noise [B, ...] with conditioning [B]: `steps` steps, guidance.

    guidance 1 is one conditional forward per step (how students sample); otherwise the empty prompt's
    conditioning `null` [1] is batched with it (`guided_velocity`). `sampler`: "euler", or "consistency" (TBCM
    students), whose fresh noise at each step is paired per row like the starting noise; the levels as
    `inference_levels(time_shift, rule, levels)`.
    """
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    levels = inference_levels(backbone, steps, resolution, time_shift, rule, levels).to(device)
    renoise = paired_renoise(len(noise), steps, noise.shape[1:], seed) if sampler == "consistency" else None
    outs = []
    for start in range(0, len(noise), chunk):
        rows = slice(start, start + chunk)
        part_noise = noise[rows].to(device)
        velocity = guided_velocity(backbone, module, cond.index(rows).to(device), guidance, null, device)
        if renoise is not None:
            outs.append(consistency_sample(velocity, part_noise, levels, renoise[:, rows].to(device)).cpu())
            continue
        last = torch.full((len(part_noise),), steps - 1, dtype=torch.long)
        outs.append(simulate(velocity, part_noise, levels, last, keep_final=True).final.cpu())
    module.train(was_training)
    return torch.cat(outs)


@torch.no_grad()
def sample_scheduled(backbone: Backbone, module: nn.Module, cond: Conditioning, noise: torch.Tensor, steps: int,
                     scheduler: str, shift: float | None = None, guidance: float = 1.0,
                     null: Conditioning | None = None, chunk: int = 1024, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Final latents [B, ...] of training-free sampler `scheduler` (a cdmctl.samplers name: diffusers' scheduler
    on the backbone's scheduler config, time shift `shift`, None: the backbone's own) in `steps` steps; a
    stochastic sampler's fresh noise comes from one generator per row (seed, row)."""
    from cdmctl.samplers import make_scheduler, run_scheduler, sampler_levels

    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    outs = []
    for start in range(0, len(noise), chunk):
        rows = range(start, min(start + chunk, len(noise)))
        part = guided_velocity(backbone, module, cond.index(slice(start, rows.stop)).to(device), guidance, null,
                               device)  # fmt: skip
        index = torch.arange(len(rows), device=device)
        gens = [generator(seed, "eval-renoise-rows", i) for i in rows]
        outs.append(run_scheduler(make_scheduler(scheduler, shift, backbone.scheduler),
                                  lambda x, s: part(x, s, index), noise[start : rows.stop].to(device),
                                  sampler_levels(scheduler, steps), gens).cpu())  # fmt: skip
    module.train(was_training)
    return torch.cat(outs)


@torch.no_grad()
def evaluate(backbone: Backbone, module: nn.Module, gt, cond: Conditioning, null: Conditioning, steps: list[int],
             resolution: int, guidance: float = 1.0, per_prompt: int = 32, seed: int = 0,
             sampler: str = "euler", time_shift: bool = True, rule: str = "uniform", scheduler: str | None = None,
             shift: float | None = None, levels: list[float] | None = None) -> dict[int, dict]:  # fmt: skip
    """metric dict per step count: `per_prompt` samples of every prompt, paired noise, against the reference.

    A student's sampler and levels (`sampler`, `time_shift`, `rule`, `levels`: see `sample`), or with `scheduler` the
    training-free sampler of that name at time shift `shift` (`sample_scheduled`)."""
    from cdmctl.proving import metrics

    ref, ref_idx = metrics.reference_set(gt)
    idx = torch.arange(gt.num_prompts).repeat_interleave(per_prompt)
    noise = paired_noise(len(idx), gt.latent_shape, seed)
    rows = cond.index(idx)
    out = {}
    for n in steps:
        if scheduler is not None:
            x = sample_scheduled(backbone, module, rows, noise, n, scheduler, shift, guidance, null, seed=seed)
        else:
            x = sample(backbone, module, rows, noise, n, resolution, guidance, null, sampler=sampler, seed=seed,
                       rule=rule, time_shift=time_shift, levels=levels)  # fmt: skip
        out[n] = metrics.score(gt, x, idx, ref, ref_idx)
    return out
