"""The student's JVP: torch.func.jvp (math attention kernel) and the central difference agree, on the tiny pipeline too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdmctl.engine import trigflow as T
from cdmctl.engine.jvp import jvp_autograd, jvp_finite_difference
from cdmctl.engine.roles import Roles
from cdmctl.engine.tbcm import Pairs, student_F, student_jvp


def test_both_jvps_equal_the_hand_derivative():
    """f(x, t) = sin t x^2: d/dh f(x + h vx, t + h vt) = 2 sin t x vx + cos t x^2 vt."""
    gen = torch.Generator().manual_seed(0)
    x, vx = torch.randn(4, 3, dtype=torch.float64, generator=gen), torch.randn(4, 3, dtype=torch.float64, generator=gen)
    t, vt = torch.rand(4, 1, dtype=torch.float64, generator=gen), torch.rand(4, 1, dtype=torch.float64, generator=gen)
    exact = 2 * torch.sin(t) * x * vx + torch.cos(t) * x**2 * vt
    fn = lambda a, b: torch.sin(b) * a**2  # noqa: E731
    assert torch.allclose(jvp_autograd(fn, (x, t), (vx, vt)).double(), exact, atol=1e-12)
    assert torch.allclose(jvp_finite_difference(fn, (x, t), (vx, vt), eps=1e-4).double(), exact, atol=1e-6)


def test_finite_difference_sees_one_random_state_and_restores_the_generator():
    """A network drawing random numbers (dropout) must draw the same in both evaluations (fork_rng)."""
    fn = lambda a: a * (1 + torch.rand(()))  # noqa: E731
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    x, v = torch.ones(3), torch.full((3,), 2.0)
    out = jvp_finite_difference(fn, (x,), (v,), eps=1e-3)
    scale = out / v
    assert torch.allclose(scale, scale[0].expand(3)) and 1 <= float(scale[0]) <= 2  # one factor, not noise / eps
    assert torch.equal(torch.random.get_rng_state(), state)


def tiny_pairs(backbone, n: int, dtype: torch.dtype, seed: int = 0) -> Pairs:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *backbone.latent_shape(32, 32))
    x = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    dxdt = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.linspace(0.1, 1.45, n, dtype=dtype)
    cond = backbone.encode_prompts(["a red cube", "a blue ball"] * (n // 2)).to(dtype=dtype)
    return Pairs(x, t, dxdt, cond, x)


@pytest.fixture(scope="module")
def tiny_backbone(tiny_sd3_dir: Path):
    from cdmctl.backbones import load_backbone

    return load_backbone("sd3", str(tiny_sd3_dir), dtype="float32")


def roles_over(backbone, module) -> Roles:
    return Roles(backbone, module, module, None)


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((estimate.double() - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).max())


def test_autograd_jvp_equals_a_finite_difference_on_the_tiny_pipeline(tiny_backbone):
    """The central difference converges to torch.func.jvp as O(eps^2) (SD3's timestep embedding is what curves);
    in float32 (training) at the shipped step it is within 0.2%, and the float32 autograd JVP within rounding."""
    import copy

    from cdmctl.config.schema import TBCMConfig

    exact_model = copy.deepcopy(tiny_backbone.transformer).double().eval()
    pairs = tiny_pairs(tiny_backbone, 4, torch.float64)
    roles = roles_over(tiny_backbone, exact_model)
    auto = student_jvp(roles, pairs, TBCMConfig(jvp="autograd")).double()
    assert auto.abs().mean() > 1e-2  # a derivative worth comparing
    coarse = relative_error(student_jvp(roles, pairs, TBCMConfig(jvp="finite-difference", jvp_eps=1e-3)), auto)
    fine = relative_error(student_jvp(roles, pairs, TBCMConfig(jvp="finite-difference", jvp_eps=3e-4)), auto)
    assert fine < 2e-3 and coarse / fine > 4  # (1e-3 / 3e-4)^2 = 11 for a pure O(eps^2) error
    roles32 = roles_over(tiny_backbone, tiny_backbone.transformer.eval())
    pairs32 = tiny_pairs(tiny_backbone, 4, torch.float32)
    assert relative_error(student_jvp(roles32, pairs32, TBCMConfig(jvp="finite-difference")), auto) < 2e-3
    assert relative_error(student_jvp(roles32, pairs32, TBCMConfig(jvp="autograd")), auto) < 1e-4


def test_the_jvp_is_the_derivative_of_F_along_the_trajectory(tiny_backbone):
    """sCM's JVP: d/dt F(x_t / sigma_d, t) along dx_t/dt, times cos t sin t (checked by moving along it)."""
    import copy

    model = copy.deepcopy(tiny_backbone.transformer).double().eval()
    roles = roles_over(tiny_backbone, model)
    pairs = tiny_pairs(tiny_backbone, 2, torch.float64, seed=1)
    from cdmctl.config.schema import TBCMConfig

    jvp = student_jvp(roles, pairs, TBCMConfig(jvp="autograd", sigma_data=0.5)).double()
    F = student_F(roles, pairs.cond)
    h = 1e-4  # SD3 rounds its timestep to float32: far smaller steps drown in it
    with torch.no_grad():
        ahead = F((pairs.x + h * pairs.dxdt) / 0.5, pairs.t + h)
        behind = F((pairs.x - h * pairs.dxdt) / 0.5, pairs.t - h)
    dFdt = (ahead.double() - behind.double()) / (2 * h)
    c = (torch.cos(pairs.t) * torch.sin(pairs.t)).view(-1, 1, 1, 1)
    assert relative_error(jvp, c * dFdt) < 5e-3


def test_autograd_jvp_needs_the_math_kernel_and_the_unwrapped_module(tiny_backbone):
    """Forward-mode AD has no rule for some SDPA kernels (CPU flash here): the pin is what makes it work."""
    model = tiny_backbone.transformer.eval()
    pairs = tiny_pairs(tiny_backbone, 2, torch.float32)
    fn = student_F(roles_over(tiny_backbone, model), pairs.cond)
    tangents = T.jvp_tangents(pairs.t, pairs.dxdt, 0.5)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.func.jvp(fn, (pairs.x / 0.5, pairs.t), tangents)
    except (NotImplementedError, RuntimeError):
        pass  # the failure the math kernel avoids
    else:
        pytest.skip("this torch build's flash kernel has a forward-AD rule on CPU")
    assert torch.isfinite(jvp_autograd(fn, (pairs.x / 0.5, pairs.t), tangents)).all()
