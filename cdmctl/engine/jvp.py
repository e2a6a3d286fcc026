"""Forward-mode derivatives of a network: torch.func.jvp under the math attention kernel, or a central difference.

Forward-mode AD is not implemented for the flash and memory-efficient SDPA kernels, so `jvp_autograd` pins the
math kernel; it gets the module without DDP's wrapper (no gradient flows, so DDP's hooks have nothing to do). An
FSDP2 module is its own unwrapped module: its hooks gather the parameters around the dual-tensor forward, which
torch 2.13 runs correctly (tests/test_tbcm_e2e.py: two processes on CPU match one process). `jvp_finite_difference`
calls the network twice as it is (wrapped or sharded, any kernel), as NVlabs FastGen offers for Flash Attention
and FSDP.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# what one JVP of a batch costs, in forwards of that batch (the cost counter's unit): the central difference runs
# the network twice; torch.func.jvp runs the primal and its tangent together, which forward-mode AD bounds by
# about three forwards (and which measured far more on small CPU models: docs/method.md)
JVP_FORWARDS = {"autograd": 3, "finite-difference": 2}


def jvp_autograd(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                 tangents: Sequence[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """d fn(primals + h tangents) / dh at h = 0, exact (torch.func.jvp), without gradients, math SDPA kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]


def jvp_finite_difference(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                          tangents: Sequence[torch.Tensor], eps: float = 1e-3) -> torch.Tensor:  # fmt: skip
    """(fn(p + eps v) - fn(p - eps v)) / (2 eps), float32, error O(eps^2) plus the network's rounding / eps.

    The shifted inputs are formed in float64 (the network rounds them once, to its own dtype); each call starts
    from the same RNG state (fork_rng), so a network that draws random numbers (dropout) draws the same in both.
    """
    devices = sorted({p.device.index or 0 for p in primals if p.device.type == "cuda"})
    plus = [p.double() + eps * v.double() for p, v in zip(primals, tangents)]
    minus = [p.double() - eps * v.double() for p, v in zip(primals, tangents)]
    with torch.no_grad():
        with torch.random.fork_rng(devices=devices):
            f_plus = fn(*plus).double()
        with torch.random.fork_rng(devices=devices):
            f_minus = fn(*minus).double()
    return ((f_plus - f_minus) / (2 * eps)).float()
