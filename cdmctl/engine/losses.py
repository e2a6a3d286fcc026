"""The student and fake-teacher losses of docs/method.md as pure float32 tensor functions.

Every student loss has one form, `mean (x0 - sg(x0 + D))^2`, and differs only in its update
direction D; the teacher and fake predictions that build D never receive gradient. Inputs may be
bf16; everything is upcast to float32 first. Shapes: x0 and predictions [B, ...], levels [B].
"""

from __future__ import annotations

import torch


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Levels [B] (or a scalar) -> float32 [B, 1, ...] broadcastable against `like` [B, ...]."""
    s = torch.as_tensor(s, device=like.device).float()
    return s.reshape(-1, *[1] * (like.dim() - 1)) if s.dim() else s


def clean_estimate(x: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0_hat = x - s v, float32 [B, ...], for x, v [B, ...] and per-sample s [B]."""
    return x.float() - _per_sample(s, x) * v.float()


def renoise(x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) sg(x0) + s eps, float32 [B, ...].

    Detached: every re-noising in docs/method.md (fake update, CA, DM, CDM, gaussian CDM) uses sg(x0).
    """
    s = _per_sample(s, x0)
    return (1 - s) * x0.detach().float() + s * eps.float()


def normaliser(a: torch.Tensor, x0: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """nrm(a) = max(mean over non-batch dims of |a - sg(x0)|, floor), float32 [B, 1, ...].

    The floor keeps D bounded when the teacher already agrees with the student.
    """
    diff = (a.detach().float() - x0.detach().float()).abs()
    dims = tuple(range(1, diff.dim()))
    return diff.mean(dim=dims, keepdim=True).clamp_min(floor)


def matching_loss(x0: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """L = mean over batch and pixels of (x0 - sg(x0 + D))^2, a float32 scalar.

    Its value is mean(D^2) and its gradient w.r.t. x0 is -2 D / numel: descent moves x0 along +D.
    """
    x0 = x0.float()
    target = (x0 + direction.float()).detach()
    return ((x0 - target) ** 2).mean()


def ca_direction(
    x0c: torch.Tensor, x0u: torch.Tensor, x0: torch.Tensor, guidance: float, floor: float = 0.1
) -> torch.Tensor:
    """CA: D = g (x0c - x0u) / nrm(x0c), nrm against x0; float32 [B, ...], no gradient."""
    delta = x0c.detach().float() - x0u.detach().float()
    return guidance * delta / normaliser(x0c, x0, floor)


def dm_direction(x0r: torch.Tensor, x0f: torch.Tensor, x0: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """DM: D = (x0r - x0f) / nrm(x0r), nrm against x0; float32 [B, ...], no gradient.

    Also CDM's direction (x0 = x0e, teacher/fake at the re-noised x0e) and DMD2's guided DM
    (x0r = the teacher's CFG clean estimate).
    """
    delta = x0r.detach().float() - x0f.detach().float()
    return delta / normaliser(x0r, x0, floor)


def guided_prediction(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance velocity v_u + g (v_c - v_u), float32 [B, ...]."""
    v_uncond = v_uncond.float()
    return v_uncond + guidance * (v_cond.float() - v_uncond)


def extrapolate(xt: torch.Tensor, s_t: torch.Tensor, vt: torch.Tensor, se: torch.Tensor) -> torch.Tensor:
    """CDM's velocity perturbation xe = xt + (se - s_t) vt, float32 [B, ...] for levels s_t, se [B].

    Moves along the recorded student velocity to level se, above or below s_t: off the trajectory.
    """
    return xt.float() + (_per_sample(se, xt) - _per_sample(s_t, xt)) * vt.float()


def flow_matching_loss(v_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Fake-teacher loss mean((v - (eps - sg(x0)))^2), a float32 scalar; v_pred, eps, x0 [B, ...]."""
    target = eps.float() - x0.detach().float()
    return ((v_pred.float() - target) ** 2).mean()
