"""Noise-level schedules of the backward simulation and the per-sample level and index samplers.

Levels are written in the *unshifted* space; the backbone's time shift maps them to the levels the
network sees (a dynamic schedule takes the shift as a function and returns shifted levels). Schedules are float64 (exact, so sorting never creates ties from rounding); per-sample
levels are float32. All draws happen on the generator's device and are then moved, so a CPU
generator gives the same numbers whatever device training runs on.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch


def fixed_schedule(levels: Sequence[float]) -> torch.Tensor:
    """The given levels as a float64 tensor [n]; must start at 1.0 and strictly decrease to > 0."""
    out = torch.tensor(list(levels), dtype=torch.float64)
    if out.numel() == 0 or out[0] != 1.0 or out[-1] <= 0 or bool((out[1:] >= out[:-1]).any()):
        raise ValueError(f"a schedule must start at 1.0 and strictly decrease to a value > 0, got {list(levels)}")
    return out


def sample_schedule_length(gen: torch.Generator, length: tuple[int, int]) -> int:
    """n ~ U{n_min..n_max} (both inclusive)."""
    n_min, n_max = length
    if not 1 <= n_min <= n_max:
        raise ValueError(f"length must satisfy 1 <= n_min <= n_max, got {list(length)}")
    return int(torch.randint(n_min, n_max + 1, (1,), generator=gen, device=gen.device).item())


def sample_inner_levels(
    gen: torch.Generator,
    count: int,
    level_range: tuple[float, float],
    inner: Literal["uniform", "stratified"] = "uniform",
) -> torch.Tensor:
    """`count` levels in [lo, hi], sorted descending, float64 [count] on the CPU.

    uniform: i.i.d. U(lo, hi). stratified: [lo, hi] cut into `count` equal bins, one U draw per bin.
    """
    lo, hi = level_range
    u = torch.rand(count, generator=gen, device=gen.device, dtype=torch.float64).cpu()
    if inner == "stratified":
        # bin k covers [lo + k w, lo + (k + 1) w); one draw in each keeps every level distinct
        u = (torch.arange(count, dtype=torch.float64) + u) / max(count, 1)
    elif inner != "uniform":
        raise ValueError(f"inner must be 'uniform' or 'stratified', got {inner!r}")
    return (lo + (hi - lo) * u).sort(descending=True).values


def identity(s: torch.Tensor) -> torch.Tensor:
    return s


def sample_dynamic_schedule(
    gen: torch.Generator,
    length: tuple[int, int] = (1, 28),
    level_range: tuple[float, float] = (0.25, 0.95),
    inner: Literal["uniform", "stratified"] = "uniform",
    inner_gen: torch.Generator | None = None,
    shift: Callable[[torch.Tensor], torch.Tensor] = identity,
    coverage: float = 0.0,
    coverage_gen: torch.Generator | None = None,
) -> torch.Tensor:
    """CDM's dynamic schedule, shifted: float64 [n] = [1.0, n - 1 inner levels descending].

    n ~ U{n_min..n_max} is drawn from `gen`, the inner levels from `inner_gen` (default `gen`).
    Multi-process runs must draw n identically on every rank (a `gen` derived from (seed, iteration));
    the engine draws the inner levels identically too (one schedule per global batch), though per-rank
    `inner_gen`s would also give a valid schedule on each. With lo == hi the levels would tie, so that
    needs n_max <= 2.

    Each inner level is a position u in [0, 1] (uniform or stratified) mapped to a noise level:
    through the backbone's `shift` (`shift(lo + (hi - lo) u)`, the paper's schedule, dense near 1),
    or, with probability `coverage` per level (drawn from `coverage_gen`), linearly between the
    shifted ends (`shift(lo) + (shift(hi) - shift(lo)) u`), which reaches the low levels that
    many-step inference visits as often as the high ones.
    """
    lo, hi = level_range
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"level_range must satisfy 0 < lo <= hi < 1, got {list(level_range)}")
    if lo == hi and length[1] > 2:
        raise ValueError(f"level_range {list(level_range)} has no width: inner levels would repeat when n > 2")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must lie in [0, 1], got {coverage}")
    n = sample_schedule_length(gen, length)
    u = sample_inner_levels(inner_gen if inner_gen is not None else gen, n - 1, (0.0, 1.0), inner)
    levels = shift(lo + (hi - lo) * u).double()
    if coverage > 0 and n > 1:
        ends = shift(torch.tensor([lo, hi], dtype=torch.float64)).double()
        linear = ends[0] + (ends[1] - ends[0]) * u
        mix_gen = coverage_gen if coverage_gen is not None else gen
        pick = torch.rand(n - 1, generator=mix_gen, device=mix_gen.device, dtype=torch.float64).cpu() < coverage
        levels = torch.where(pick, linear, levels).sort(descending=True).values
    return torch.cat([torch.ones(1, dtype=torch.float64), levels])


def uniform(gen: torch.Generator, batch: int) -> torch.Tensor:
    """U(0, 1) float32 [B] on the generator's device: the raw draw behind `sample_levels`."""
    return torch.rand(batch, generator=gen, device=gen.device, dtype=torch.float32)


def sample_levels(
    gen: torch.Generator,
    batch: int,
    clamp: tuple[float, float] = (0.02, 0.98),
    cap: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample noise levels float32 [B]: U(0, 1), times `cap` [B] if given, then clamped.

    Without cap: the DM / CDM / fake-teacher levels `U(0,1)` clamped to [s_min, s_max].
    With cap = s_t: CA's level `sa = U(0,1) * s_t` clamped, so sa <= s_t whenever s_t >= s_min
    (the clamp wins below that). Output on `device`, else cap's device, else the generator's.
    """
    return levels_from_uniform(uniform(gen, batch), clamp, cap, device)


def levels_from_uniform(
    u: torch.Tensor,
    clamp: tuple[float, float] = (0.02, 0.98),
    cap: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`sample_levels` from given U(0, 1) draws u [B] (e.g. this rank's rows of a global batch's draws)."""
    s_min, s_max = clamp
    if device is None:
        device = cap.device if cap is not None else u.device
    u = u.to(device)
    if cap is not None:
        u = u * cap.to(device=device, dtype=torch.float32)
    return u.clamp(s_min, s_max)


def sample_record_index(
    gen: torch.Generator, batch: int, n: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-sample recorded step i_b ~ U{0..n-1}, int64 [B] on `device` (default: the generator's)."""
    idx = torch.randint(0, n, (batch,), generator=gen, device=gen.device)
    return idx.to(device if device is not None else gen.device)
