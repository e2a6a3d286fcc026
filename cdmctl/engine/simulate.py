"""Backward simulation of the student without gradients, recording one (or K) points per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    """What the simulation recorded, per sample b at its own step i_b (original batch order).

    xt [B, ...] = x_{i_b}; s_t [B] float32 = s_{i_b}; vt [B, ...] = v_{i_b};
    x0t [B, ...] = xt - s_t * vt; final [B, ...] = x_n (only with keep_final, else None);
    student_samples = how many samples went through the network (dummy calls included).
    """

    xt: torch.Tensor
    s_t: torch.Tensor
    vt: torch.Tensor
    x0t: torch.Tensor
    final: torch.Tensor | None
    student_samples: int


def _check(n: int, batch: int, record_index: torch.Tensor, min_steps: int) -> None:
    if record_index.dim() != 2 or record_index.shape[1] != batch or record_index.shape[0] < 1 \
            or int(record_index.min()) < 0 or int(record_index.max()) >= n:  # fmt: skip
        raise ValueError(f"record_index must be [B={batch}] (or [K, B]) with values in 0..{n - 1}")
    if min_steps > n:
        raise ValueError(f"min_steps={min_steps} exceeds the schedule length n={n}")


@torch.no_grad()
def simulate(
    velocity: Velocity,
    noise: torch.Tensor,
    levels: torch.Tensor,
    record_index: torch.Tensor,
    keep_final: bool = False,
    min_steps: int = 0,
) -> Trajectory:
    """Euler-integrate `x_{i+1} = x_i + (s_{i+1} - s_i) v_i` (s_n = 0) from x_0 = noise [B, ...].

    `levels` [n] are already shifted, s_0 first. `velocity(x [B'], s [B'] float32, index [B'])`
    returns v [B', ...]; `index` holds the batch positions of the B' samples so the caller can
    pick their conditioning. At step i only samples with i_b >= i (all, with keep_final) are
    evaluated and integration stops after max(i_b) (after step n - 1 with keep_final).
    `min_steps` forces at least that many calls (FSDP: every rank must call equally often); a
    call with no active sample runs a 1-sample dummy whose output is discarded.
    The caller puts the student in eval mode; the state keeps noise's dtype.
    """
    return simulate_points(velocity, noise, levels, record_index[None], keep_final, min_steps)[0]


@torch.no_grad()
def simulate_points(
    velocity: Velocity,
    noise: torch.Tensor,
    levels: torch.Tensor,
    record_index: torch.Tensor,
    keep_final: bool = False,
    min_steps: int = 0,
) -> list[Trajectory]:
    """`simulate`, recording K points per sample along one trajectory: record_index [K, B] -> K Trajectories.

    Point k equals what `simulate` with record_index[k] returns (the path is the same), but the network
    runs only up to each sample's latest point; the cost (`student_samples`) is counted on the first.
    """
    n, batch = levels.numel(), noise.shape[0]
    _check(n, batch, record_index, min_steps)
    record_index = record_index.cpu()
    latest = record_index.max(0).values
    # sort samples by their latest recorded step, latest first: the active set at step i is then a
    # prefix, so the state is sliced (a view) rather than gathered and scattered every step
    order = torch.sort(latest, descending=True, stable=True).indices
    steps_left, points = latest[order], record_index[:, order]
    order = order.to(noise.device)
    x = noise[order].clone()
    xt = torch.empty((len(points), *noise.shape), dtype=noise.dtype, device=noise.device)
    vt = torch.empty_like(xt)
    last = n - 1 if keep_final else int(steps_left[0])
    calls = max(last + 1, min_steps)
    levels64 = levels.double().cpu().tolist() + [0.0]
    samples = 0
    for i in range(calls):
        active = batch if keep_final else int((steps_left >= i).sum())
        size = max(active, 1)  # the dummy: one sample, output discarded
        s = torch.full((size,), levels64[i], device=noise.device, dtype=torch.float32)
        v = velocity(x[:size], s, order[:size]).to(noise.dtype)
        samples += size
        if active == 0:
            continue
        for k, at in enumerate(points):
            hit = (at[:active] == i).nonzero().squeeze(1).to(noise.device)
            xt[k, order[hit]] = x[hit]
            vt[k, order[hit]] = v[hit]
        x[:active] += (levels64[i + 1] - levels64[i]) * v
    final = torch.empty_like(noise).index_copy_(0, order, x) if keep_final else None
    level_table = levels.to(device=noise.device, dtype=torch.float32)
    trajectories = []
    for k in range(len(points)):
        s_t = level_table[record_index[k].to(noise.device)]
        x0t = xt[k] - s_t.to(noise.dtype).view(-1, *[1] * (noise.dim() - 1)) * vt[k]
        trajectories.append(Trajectory(xt=xt[k], s_t=s_t, vt=vt[k], x0t=x0t, final=final,
                                       student_samples=samples if k == 0 else 0))  # fmt: skip
    return trajectories
