"""TrigFlow around a flow-matching network, the sCM objective and the sCM sampler, as float32 tensor functions.

TrigFlow time t in [0, pi/2] (pi/2 = noise): x_t = cos t x0 + sin t z with z ~ N(0, sigma_d^2 I), where the
TrigFlow data is sigma_d times the flow-space latent the teacher was trained on. The flow level of t is
s = sin t / (sin t + cos t), i.e. t = atan(s / (1 - s)), and x_t / sigma_d = (sin t + cos t) x_flow: the same
point of the same trajectory, rescaled. A flow-matching velocity v(x_flow, s) ~ eps - x0 becomes TrigFlow's
F = ((1 - 2s) x_flow + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2), exactly and invertibly (`flow_velocity`),
so the student stays a flow-matching network: it is trained through this wrapper and exported as it is.
Shapes: latents [B, ...], times and levels [B].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cdmctl.engine.losses import _per_sample

HALF_PI = math.pi / 2


def flow_level(t: torch.Tensor) -> torch.Tensor:
    """s = sin t / (sin t + cos t) in [0, 1]; clamped, since float pi/2 rounds to a cos just below zero."""
    return (torch.sin(t) / (torch.sin(t) + torch.cos(t))).clamp(0.0, 1.0)


def trig_time(s: torch.Tensor) -> torch.Tensor:
    """t = atan(s / (1 - s)) = atan2(s, 1 - s): pi/2 at s = 1, 0 at s = 0."""
    return torch.atan2(s, 1 - s)


def flow_input(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TrigFlow's network input y = x_t / sigma_d at t -> (x_flow, s): x_flow = y sqrt(s^2 + (1 - s)^2)."""
    s = flow_level(t)
    return y * _per_sample(torch.sqrt(s**2 + (1 - s) ** 2), y).to(y.dtype), s


def trigflow_output(x_flow: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F = ((1 - 2s) x_flow + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2) from a flow velocity v at (x_flow, s)."""
    a, b = _per_sample(1 - 2 * s, x_flow), _per_sample(1 - 2 * s + 2 * s**2, x_flow)
    q = _per_sample(torch.sqrt(s**2 + (1 - s) ** 2), x_flow)
    return (a * x_flow.float() + b * v.float()) / q


def flow_velocity(x_flow: torch.Tensor, s: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """The inverse of `trigflow_output`: v = (sqrt(s^2 + (1 - s)^2) F - (1 - 2s) x_flow) / (1 - 2s + 2s^2)."""
    a, b = _per_sample(1 - 2 * s, x_flow), _per_sample(1 - 2 * s + 2 * s**2, x_flow)
    q = _per_sample(torch.sqrt(s**2 + (1 - s) ** 2), x_flow)
    return (q * F.float() - a * x_flow.float()) / b


def trigflow_F(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """F(y, t) of a flow-matching `velocity(x_flow, s)`: convert the input, run it, convert the output."""
    x_flow, s = flow_input(y, t)
    return trigflow_output(x_flow, s, velocity(x_flow, s))


def trig_step(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, dxdt: torch.Tensor) -> torch.Tensor:
    """One DDIM step of the PF-ODE in TrigFlow, x_{t'} = cos(t - t') x_t - sin(t - t') dx_t/dt (the TBCM rollout's).

    It equals a flow-matching Euler step between the matching levels (both keep the clean and noise estimates).
    """
    dt = t - t_next
    return _per_sample(torch.cos(dt), x) * x.float() - _per_sample(torch.sin(dt), x) * dxdt.float()


def jvp_tangents(t: torch.Tensor, dxdt: torch.Tensor, sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tangents of (y = x_t / sigma_d, t) along the trajectory, scaled by cos t sin t (sCM's stable form)."""
    c = torch.cos(t) * torch.sin(t)
    return _per_sample(c, dxdt) * dxdt.float() / sigma_d, c.float()


def tangent_weight(step: int, warmup: int, cooldown_start: int | None, cooldown_steps: int, final_r: float) -> float:
    """r of the tangent's second term at student update `step` (0-based): linear warm-up 0 -> 1 over `warmup`
    updates, then (optionally) linear cool-down to `final_r` over `cooldown_steps` from `cooldown_start`."""
    r = 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
    if cooldown_start is not None:
        progress = min(max((step + 1 - cooldown_start) / cooldown_steps, 0.0), 1.0)
        r = r * (1 - progress) + final_r * progress
    return r


def scm_tangent(F_minus: torch.Tensor, F_jvp: torch.Tensor, x_t: torch.Tensor, dxdt: torch.Tensor, t: torch.Tensor,
                r: float, sigma_d: float, c: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The normalised sCM target direction and its norm before normalisation, float32 [B, ...] and [B].

    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d F_jvp), then g / (||g|| + c) per sample;
    F_jvp is the JVP along `jvp_tangents` (it carries the cos t sin t factor already).
    """
    cos, sin = _per_sample(torch.cos(t), x_t), _per_sample(torch.sin(t), x_t)
    g = -cos**2 * (sigma_d * F_minus.float() - dxdt.float()) - r * (cos * sin * x_t.float() + sigma_d * F_jvp.float())
    norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim())))
    return g / _per_sample(norm + c, g), norm


def scm_loss(F: torch.Tensor, g: torch.Tensor, t: torch.Tensor, logvar: torch.Tensor,
             sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """mean(w / exp(logvar) (F - sg(F) - g)^2 + logvar) with w = 1 / (sigma_d tan t); also the unweighted mean.

    Its gradient w.r.t. F is -2 w g / exp(logvar) / numel: it moves F along g, weighted per level.
    """
    F = F.float()
    sq = (F - F.detach() - g.detach()) ** 2
    weight = _per_sample(1.0 / (sigma_d * torch.tan(t)), F)
    lv = _per_sample(logvar.float().reshape(-1), F)
    return (weight / torch.exp(lv) * sq + lv).mean(), sq.mean().detach()


class LogVarHead(nn.Module):
    """Adaptive weighting: logvar(t) = Linear(cos(f log(tan t) / 4 + phi) sqrt 2) [B], zero at initialisation.

    Fixed random Fourier features of EDM2's noise embedding (log sigma / 4; here sigma / sigma_d = tan t) and one
    trainable linear layer; its own module so that the student stays the backbone's plain transformer.
    """

    def __init__(self, channels: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=generator))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=generator))
        with torch.random.fork_rng(devices=[]):  # Linear's own (overwritten) init must not move the global generator
            self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        noise = torch.log(torch.tan(t.float().clamp(1e-4, HALF_PI - 1e-4))) / 4
        features = torch.cos(noise[:, None] * self.freqs + self.phases) * math.sqrt(2)
        # sum over the one output: a new tensor, not a view (FSDP2 hooks its module's output for backward)
        return self.linear(features.to(self.linear.weight.dtype)).float().sum(1)


@torch.no_grad()
def consistency_sample(velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                       noise: torch.Tensor, levels: torch.Tensor, renoise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The sCM multistep sampler in flow coordinates: the final clean estimate [B, ...] from noise [B, ...].

    At each level s_i (shifted, s_0 = 1): x0 = x - s_i v(x, s_i), then x <- (1 - s_{i+1}) x0 + s_{i+1} z_i with
    z_i = renoise[i] [n - 1, B, ...]; the last x0 is the sample. In TrigFlow this is x0 = cos t x - sin t sigma_d F,
    x <- cos t' x0 + sin t' sigma_d z (up to the sigma_d scale of the data), the sampler of sCM and SANA-Sprint.
    `velocity(x, s [B], index [B])` as for `simulate`.
    """
    x, index = noise.float(), torch.arange(len(noise), device=noise.device)
    levels64 = levels.double().cpu().tolist()
    for i, level in enumerate(levels64):
        s = torch.full((len(x),), level, device=noise.device, dtype=torch.float32)
        x0 = x - level * velocity(x, s, index).float()
        if i + 1 == len(levels64):
            return x0
        x = (1 - levels64[i + 1]) * x0 + levels64[i + 1] * renoise[i].to(x0)
    return x
