"""Samplers by name: diffusers' flow-matching schedulers with a chosen time shift, the levels each steps through,
and a tensor loop that runs one over any velocity function (the proving ground's teacher baselines).

A sampler is a diffusers scheduler class with a few fixed settings; `shift` is its static time shift k (levels s ->
k s / (1 + (k - 1) s)), or None to keep the model's own (static or dynamic). Two rules give the unshifted levels of
an n-step schedule:
- "uniform": 1, 1 - 1/n, ..., 1/n, as diffusers' flow-matching pipelines pass them (SD3, FLUX);
- "trigflow": the sCM / TBCM authors' TrigFlow times, t = linspace(pi/2, 0, n + 1)[:-1] (2 steps: [pi/2, 1.0]), at
  flow level s = sin t / (sin t + cos t) (the flow point of x_t = cos t x0 + sin t z).
A scheduler whose `set_timesteps` takes no `sigmas` (DPM-Solver++) spaces its own levels (diffusers' flow sigmas,
(1 - 1/1000)(1 - i/n)).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from cdmctl.errors import UserError

if TYPE_CHECKING:  # torch and diffusers load only when a sampler runs: the level rules serve the presets too
    import torch


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # a diffusers scheduler class name
    config: dict[str, Any] = field(default_factory=dict)  # settings on top of the model's scheduler config
    levels: str = "uniform"  # the rule of its unshifted levels (module docstring)
    about: str = ""
    takes_levels: bool = True  # False: its set_timesteps spaces its own levels (no `sigmas`)


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False},
                         about="flow-matching Euler (the pipelines' default)"),
    "dpmpp-2m": SamplerSpec("DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True,
                             "prediction_type": "flow_prediction"}, about="DPM-Solver++ 2M, flow sigmas",
                            takes_levels=False),
    "unipc": SamplerSpec("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
                         about="UniPC (bh2, order 2), flow sigmas"),
    # sCM's multistep sampler: x0 = x - s v, then fresh noise at the next level (diffusers' stochastic Euler)
    "x0-renoise": SamplerSpec("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, levels="trigflow",
                              about="x0 prediction + fresh noise at uniform TrigFlow levels (TBCM's sampler)"),
}
SHIFT_KEYS = ("shift", "flow_shift")  # FlowMatchEuler's name of the static shift; DPM-Solver's and UniPC's


def check_sampler(name: str | None) -> str | None:
    """A sampler name as given (None stays None); an unknown one is refused with the list."""
    if name is not None and name not in SAMPLERS:
        raise UserError(f"unknown --scheduler '{name}'", f"use one of: {', '.join(SAMPLERS)}")
    return name


def check_levels_fit(name: str | None, sigmas: list[float] | None) -> None:
    """Custom levels (--sigmas) with a sampler that spaces its own are refused."""
    if name is not None and sigmas is not None and not SAMPLERS[name].takes_levels:
        raise UserError(f"--sigmas does not fit --scheduler {name}, which spaces its own levels", "give --steps instead")


def check_shift(shift: float | None) -> float | None:
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise UserError(f"--shift must be a positive number, got {shift}", "use e.g. --shift 1 (no shift) or 3")
    return shift


def trigflow_levels(steps: int) -> list[float]:
    """The flow levels of the authors' TrigFlow times for `steps` steps (module docstring), float64 values."""
    times = [math.pi / 2, 1.0] if steps == 2 else [math.pi / 2 * (1 - i / steps) for i in range(steps)]
    return [1.0 if t == math.pi / 2 else math.sin(t) / (math.sin(t) + math.cos(t)) for t in times]


def unshifted_levels(rule: str, steps: int) -> list[float]:
    """The unshifted levels [steps] of an n-step schedule under `rule` ("uniform" or "trigflow")."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if rule == "trigflow":
        return trigflow_levels(steps)
    if rule != "uniform":
        raise ValueError(f"unknown level rule {rule!r}")
    return [1.0 - i / steps for i in range(steps)]


def build(cls: type, config: dict[str, Any], shift: float | None) -> Any:
    """Scheduler class `cls` from `config` (the model's scheduler config and any settings), its static time shift
    set to `shift` under the name `cls` knows it by (no dynamic shift); None keeps the config's shift."""
    known = inspect.signature(cls.__init__).parameters
    old = next((config[k] for k in SHIFT_KEYS if k in config), 1.0)  # carried over from another class's spelling
    config = {**config, **{k: old for k in SHIFT_KEYS if k in known}}
    if shift is not None:
        config.update({k: float(shift) for k in SHIFT_KEYS if k in known}, use_dynamic_shifting=False)
    # every value given explicitly: diffusers drops the keys a config lists in `_use_default_values`, even set ones
    return cls.from_config({k: v for k, v in config.items() if k in known or k == "_class_name"})


def make_scheduler(name: str | None, shift: float | None, base: Any) -> Any:
    """Sampler `name`'s diffusers scheduler built on the model's scheduler `base` (its training timesteps and time
    shift carry over, `shift` replaces the shift when given); name None: `base`'s own class with the new shift."""
    import diffusers

    if name is None:
        return build(type(base), dict(base.config), shift)
    spec = SAMPLERS[check_sampler(name)]
    return build(getattr(diffusers, spec.scheduler), {**base.config, **spec.config}, shift)


def takes_sigmas(scheduler: Any) -> bool:
    """Whether the scheduler's `set_timesteps` accepts custom levels (else it spaces its own)."""
    return "sigmas" in inspect.signature(scheduler.set_timesteps).parameters


def timestep_kwargs(scheduler: Any, levels: list[float]) -> dict[str, Any]:
    """`set_timesteps` (and pipeline) arguments for the unshifted `levels`: the levels themselves where the scheduler
    takes them, else only their count."""
    import numpy as np

    if not takes_sigmas(scheduler):
        return {"num_inference_steps": len(levels)}
    return {"sigmas": np.array(levels, dtype=np.float64), "num_inference_steps": len(levels)}  # as pipelines pass them


def sampler_levels(name: str, steps: int) -> list[float]:
    """The unshifted levels [steps] sampler `name` is given."""
    return unshifted_levels(SAMPLERS[name].levels, steps)


def scheduler_sigmas(scheduler: Any, levels: list[float], **kwargs: Any) -> list[float]:
    """The levels (shifted, without the final 0) the scheduler steps through for the unshifted `levels`."""
    scheduler.set_timesteps(device="cpu", **timestep_kwargs(scheduler, levels), **kwargs)
    return [float(s) for s in scheduler.sigmas[:-1]]


def run_scheduler(scheduler: Any, velocity: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"],
                  noise: "torch.Tensor", levels: list[float],
                  generators: list["torch.Generator"] | None = None) -> "torch.Tensor":  # fmt: skip
    """The final latents [B, ...] from noise [B, ...] as a pipeline's denoising loop makes them: at each of the
    scheduler's timesteps t, v = velocity(x, t / num_train_timesteps [B]) (what a pipeline's transformer is given),
    then scheduler.step. `generators` (one per row) feed a stochastic scheduler's fresh noise."""
    import torch

    scheduler.set_timesteps(device=noise.device, **timestep_kwargs(scheduler, levels))
    extra = {"generator": generators} if scheduler.config.get("stochastic_sampling") else {}
    x = noise.float()
    with torch.no_grad():
        for t in scheduler.timesteps:
            s = torch.full((len(x),), float(t) / scheduler.config.num_train_timesteps, device=x.device)
            x = scheduler.step(velocity(x, s).float(), t, x, **extra).prev_sample
    return x
