"""TrigFlow around flow matching, the sCM objective and sampler: against hand-derived values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cdmctl.engine import trigflow as T


def test_levels_and_times_correspond_both_ways():
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    t = T.trig_time(s)
    assert torch.allclose(t, torch.tensor([0.0, math.atan(1 / 3), math.pi / 4, math.atan(3.0), math.pi / 2],
                                          dtype=torch.float64))  # fmt: skip
    assert torch.allclose(T.flow_level(t), s)
    # float pi/2 rounds to a cos just below zero: the level stays 1, not above
    assert T.flow_level(torch.tensor([T.HALF_PI], dtype=torch.float32)).item() == 1.0


def test_trigflow_is_the_same_trajectory_as_flow_matching_rescaled():
    """x_t / sigma_d = cos t x0 + sin t eps is (sin t + cos t) x_flow with x_flow = (1 - s) x0 + s eps."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    t = torch.tensor([0.3, 0.8, 1.4])
    y = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * eps
    x_flow, s = T.flow_input(y, t)
    expected = (1 - s).view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    assert torch.allclose(x_flow, expected, atol=1e-6)
    # the exact flow velocity eps - x0 becomes TrigFlow's target dx_t/dt / sigma_d = cos t eps - sin t x0
    F = T.trigflow_output(x_flow, s, eps - x0)
    assert torch.allclose(F, torch.cos(t).view(-1, 1, 1, 1) * eps - torch.sin(t).view(-1, 1, 1, 1) * x0, atol=1e-6)
    # and the two clean estimates agree: cos t y - sin t F = x_flow - s v
    assert torch.allclose(torch.cos(t).view(-1, 1, 1, 1) * y - torch.sin(t).view(-1, 1, 1, 1) * F, x0, atol=1e-5)


def test_the_output_conversion_inverts_exactly_and_matches_hand_values():
    s = torch.tensor([0.5, 0.0, 1.0])
    x = torch.tensor([[2.0], [3.0], [5.0]])
    v = torch.tensor([[1.0], [-1.0], [4.0]])
    F = T.trigflow_output(x, s, v)
    # s = 1/2: (0 x + 1/2 v) / sqrt(1/2) = v / sqrt 2; s = 0: x + v; s = 1: -x + v
    assert torch.allclose(F, torch.tensor([[1 / math.sqrt(2)], [2.0], [-1.0]]))
    assert torch.allclose(T.flow_velocity(x, s, F), v, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    x, v, s = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen), torch.rand(5, generator=gen)
    assert torch.allclose(T.flow_velocity(x, s, T.trigflow_output(x, s, v)), v, atol=1e-5)


def test_a_trigflow_ddim_step_is_a_flow_euler_step_between_the_matching_levels():
    gen = torch.Generator().manual_seed(2)
    x_flow, v = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    s, s_next = torch.tensor([0.9, 0.7, 0.5, 0.2]), torch.tensor([0.6, 0.3, 0.1, 0.0])
    t, t_next = T.trig_time(s), T.trig_time(s_next)
    sigma_d = 0.5
    x = sigma_d * x_flow / torch.sqrt(s**2 + (1 - s) ** 2).view(-1, 1)  # the TrigFlow state of x_flow
    dxdt = sigma_d * T.trigflow_output(x_flow, s, v)
    stepped, _ = T.flow_input(T.trig_step(x, t, t_next, dxdt) / sigma_d, t_next)
    euler = x_flow + (s_next - s).view(-1, 1) * v
    assert torch.allclose(stepped, euler, atol=1e-5)


def test_consistency_sampler_is_scms_sampler_written_in_trigflow():
    """x0 = cos t x - sin t sigma_d F, x' = cos t' x0 + sin t' sigma_d z, against our flow-space version."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 3, generator=gen)

    def velocity(x, s, index):  # any network: a level-dependent linear map
        return x @ weight * (1 + s[:, None])

    noise, levels = torch.randn(2, 3, generator=gen), torch.tensor([1.0, 0.7, 0.3], dtype=torch.float64)
    renoise = torch.randn(2, 2, 3, generator=gen)
    ours = T.consistency_sample(velocity, noise, levels, renoise)
    sigma_d, x = 0.5, 0.5 * noise  # TrigFlow: the state scaled by sigma_d, noise std sigma_d
    times = T.trig_time(levels.float())
    for i, t in enumerate(times):
        tt = t.expand(2)
        F = T.trigflow_F(lambda xf, s: velocity(xf, s, None), x / sigma_d, tt)
        x0 = torch.cos(t) * x - torch.sin(t) * sigma_d * F
        x = x0 if i + 1 == len(times) else torch.cos(times[i + 1]) * x0 + torch.sin(times[i + 1]) * sigma_d * renoise[i]
    assert torch.allclose(ours, x / sigma_d, atol=1e-5)
    one_step = T.consistency_sample(velocity, noise, levels[:1], renoise[:0])
    assert torch.allclose(one_step, noise - velocity(noise, torch.ones(2), None))  # x0 = x - v at s = 1


def test_scm_tangent_and_its_normalisation_by_hand():
    t = torch.tensor([math.pi / 4])
    c2 = 0.5  # cos^2 = cos sin = 1/2 at pi/4
    x, dxdt = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    F_minus, F_jvp = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, -1.0]])
    sigma_d, r = 0.5, 0.5
    raw = -c2 * (sigma_d * F_minus - dxdt) - r * (c2 * x + sigma_d * F_jvp)
    assert torch.allclose(raw, torch.tensor([[0.25 - 0.5 * (1.0 + 0.25), -0.25 - 0.5 * (0.0 - 0.5)]]))
    g, norm = T.scm_tangent(F_minus, F_jvp, x, dxdt, t, r, sigma_d, c=0.1)
    assert torch.allclose(norm, raw.norm(dim=1)) and torch.allclose(g, raw / (raw.norm() + 0.1), atol=1e-6)


def test_scm_loss_value_and_gradient_move_F_along_g_weighted_per_level():
    t = torch.tensor([math.pi / 4, math.atan(0.5)])  # tan t = 1 and 1/2
    F = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    g = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    logvar = torch.tensor([0.0, math.log(2.0)])
    loss, unweighted = T.scm_loss(F, g, t, logvar, sigma_d=0.5)
    w = 1 / (0.5 * torch.tan(t))  # 2 and 4
    expected = ((w / logvar.exp()).view(-1, 1) * g**2 + logvar.view(-1, 1)).mean()
    assert torch.allclose(loss, expected) and torch.allclose(unweighted, (g**2).mean())
    loss.backward()
    assert torch.allclose(F.grad, -2 * (w / logvar.exp()).view(-1, 1) * g / F.numel())


def test_tangent_weight_warms_up_then_cools_down():
    assert T.tangent_weight(0, 4, None, 2, 0.75) == 0.25 and T.tangent_weight(3, 4, None, 2, 0.75) == 1.0
    assert T.tangent_weight(99, 0, None, 2, 0.75) == 1.0
    assert [T.tangent_weight(k, 4, 10, 2, 0.75) for k in (9, 10, 11, 50)] == [1.0, 0.875, 0.75, 0.75]


def test_logvar_head_starts_at_zero_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    head = T.LogVarHead(channels=16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), before)
    out = head(torch.tensor([0.1, 1.0, T.HALF_PI]))
    assert out.shape == (3,) and torch.equal(out, torch.zeros(3))
    again = T.LogVarHead(channels=16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.freqs, head.freqs) and "freqs" in head.state_dict()  # checkpointed with the head


@pytest.mark.parametrize("s", [0.02, 0.5, 0.98])
def test_conversions_hold_in_float64_to_rounding(s):
    x = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    level = torch.tensor([s], dtype=torch.float64)
    y = x / torch.sqrt(level**2 + (1 - level) ** 2)
    back, got = T.flow_input(y, T.trig_time(level))
    assert torch.allclose(back, x, atol=1e-12) and torch.allclose(got, level, atol=1e-12)
