"""What the diffusers flow-matching adapters share once a pipeline is loaded: the scheduler's own time shift of
any levels, and VAE decoding of latents."""

from __future__ import annotations

import torch

from cdmctl.errors import UserError

# Scheduler options that reshape a whole schedule instead of shifting each level: no per-level equivalent.
_PER_SCHEDULE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "shift_terminal")


def batch_levels(s: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Noise levels [B] for latents x [B, ...]: one level for the whole batch is repeated."""
    s = torch.as_tensor(s, device=x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s


def scheduler_shift(scheduler, s: torch.Tensor, mu: float | None, source: str) -> torch.Tensor:
    """Levels s (any shape) as `scheduler.set_timesteps(sigmas=s, mu=mu)` shifts them: the dynamic shift with
    `mu` when the scheduler uses one, else its static `shift`."""
    config = scheduler.config
    per_schedule = [k for k in _PER_SCHEDULE if config.get(k)]
    if per_schedule:
        raise UserError(
            f"the scheduler of '{source}' sets {', '.join(per_schedule)}, which reshapes a whole schedule "
            "rather than shifting each level",
            "turn the time shift off in the preset, or use a scheduler config without these options",
        )
    if config.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("a scheduler with use_dynamic_shifting needs mu")
        return scheduler.time_shift(mu, 1.0, s)
    k = scheduler.shift
    return k * s / (1 + (k - 1) * s)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] (as the transformer sees them, unpacked) -> images [B, 3, H, W] in [0, 1], float32, CPU."""
    config = vae.config
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
    with torch.no_grad():
        images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
