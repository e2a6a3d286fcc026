"""TBCM's engine on the toy backbone: the route, partitioned times, the rollout's pairs, one iteration's calls and cost."""

from __future__ import annotations

import copy

import pytest
import torch

from cdmctl.backbones.tiny.toy import ToyBackbone
from cdmctl.config.schema import MethodConfig, OptimConfig
from cdmctl.engine import trigflow as T
from cdmctl.engine.cost import CostCounter
from cdmctl.engine.rng import generator
from cdmctl.engine.roles import Roles
from cdmctl.engine.step import Batch, Draws
from cdmctl.engine.tbcm import TBCMDistiller, reference_route, sample_guidance, sample_route_times, teacher_rollout
from tests.test_step import FakeAccelerator, Recorder

B, SIGMA_D = 3, 0.5


def shift_by(k: float):
    return lambda s, steps=None: k * s / (1 + (k - 1) * s)


@pytest.mark.parametrize("shift, steps", [(3.0, 16), (6.0, 16), (1.0, 5)])
def test_the_route_is_the_teachers_own_diffusers_schedule_in_trigflow_time(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    route = reference_route(shift_by(shift), steps, 1e-3)
    assert route.dtype == torch.float64 and len(route) == steps and route[0] == T.HALF_PI
    assert torch.allclose(T.flow_level(route[1:]), scheduler.sigmas[1:steps].double(), atol=1e-6)
    assert bool((route[1:] < route[:-1]).all()) and float(route[-1]) > 0


def test_one_time_is_drawn_inside_each_route_interval():
    route = reference_route(shift_by(3.0), 16, 1e-3)
    draws = [sample_route_times(route, generator(0, i, "route")) for i in range(200)]
    for times in draws:
        assert times[0] == route[0] and len(times) == len(route)
        assert bool(((times[1:] >= route[1:]) & (times[1:] <= route[:-1])).all())  # interval i holds time i
    # uniform inside an interval: its mean is the interval's midpoint (200 draws: within 4 standard errors)
    inner = torch.stack([t[1:] for t in draws])
    mid, width = (route[1:] + route[:-1]) / 2, route[:-1] - route[1:]
    assert bool(((inner.mean(0) - mid).abs() < 4 * width / (12 * 200) ** 0.5).all())
    assert torch.equal(sample_route_times(route, generator(0, 5, "route")), draws[5])  # a pure function of the stream


def test_guidance_is_drawn_per_prompt_from_the_set():
    g = sample_guidance([4.0, 4.5, 5.0], 300, generator(0, 0, "guidance"))
    assert g.shape == (300,) and set(g.tolist()) == {4.0, 4.5, 5.0}


def toy_roles():
    toy = ToyBackbone(seed=1, shift=3.0)
    rec = Recorder(toy)
    student = toy.transformer
    teacher = copy.deepcopy(student).requires_grad_(False)
    rec.names = {id(student): "student", id(teacher): "teacher"}
    return rec, Roles(rec, student, teacher, None)


def toy_batch(toy, draws: Draws) -> Batch:
    cond = toy.encode_prompts(["a", "b", "c"])
    noise = torch.randn((B, *toy.latent_shape(32, 32)), generator=draws.whole("sim-noise"))
    return Batch(cond, toy.encode_prompts([""]).expand(B), noise)


@pytest.mark.parametrize("scales, per_call", [([1.0], B), ([2.0, 3.0], 2 * B)])
def test_the_rollout_keeps_every_point_after_the_first_with_the_teachers_own_tangent(scales, per_call):
    rec, roles = toy_roles()
    draws = Draws(0, 0, 0, torch.device("cpu"))
    batch = toy_batch(rec.inner, draws)
    times = sample_route_times(reference_route(shift_by(3.0), 6, 1e-3), draws.whole("route"))
    guidance = sample_guidance(scales, B, draws.whole("guidance"))
    cost = CostCounter()
    pairs = teacher_rollout(roles, batch, times, guidance, SIGMA_D, cost)
    # one batched teacher call per route time (cond + uncond only when guided), nothing else
    assert rec.calls == [("teacher", per_call, False)] * len(times)
    assert cost.as_record()["cost/teacher_fwd"] == per_call * len(times)
    n = (len(times) - 1) * B
    assert pairs.x.shape == (n, *batch.noise.shape[1:]) and pairs.t.shape == (n,) and len(pairs.cond) == n
    assert torch.equal(pairs.t, times[1:].float().repeat_interleave(B))  # point-major
    # each recorded tangent is the teacher's guided dx/dt at that point, and consecutive points are DDIM steps
    with torch.no_grad():
        x_flow, s = T.flow_input(pairs.x / SIGMA_D, pairs.t)
        cond = pairs.cond
        v_c = roles.teacher_module(x_flow, s, cond.tensors["embedding"])
        v_u = roles.teacher_module(x_flow, s, torch.zeros_like(cond.tensors["embedding"]))
        g = guidance.repeat(len(times) - 1).view(-1, 1, 1, 1)
        expected = SIGMA_D * T.trigflow_output(x_flow, s, v_u + g * (v_c - v_u))
    assert torch.allclose(pairs.dxdt, expected, atol=1e-5)
    stepped = T.trig_step(pairs.x[:-B], pairs.t[:-B], pairs.t[B:], pairs.dxdt[:-B])
    assert torch.allclose(stepped, pairs.x[B:], atol=1e-5)


def test_the_unguided_rollout_is_the_teachers_euler_sample_at_the_route_levels():
    """DDIM in TrigFlow = Euler in flow space: the rollout's end is the teacher's Euler sample (flow space)."""
    from cdmctl.engine.simulate import simulate

    rec, roles = toy_roles()
    draws = Draws(0, 3, 0, torch.device("cpu"))
    batch = toy_batch(rec.inner, draws)
    times = sample_route_times(reference_route(shift_by(3.0), 8, 1e-3), draws.whole("route"))
    pairs = teacher_rollout(roles, batch, times, torch.ones(B), SIGMA_D, CostCounter())

    def velocity(x, s, rows):
        return roles.teacher_module(x, s, batch.cond.index(rows).tensors["embedding"])

    levels = T.flow_level(times)
    euler = simulate(velocity, batch.noise, levels, torch.full((B,), len(levels) - 1), keep_final=True).final
    assert torch.allclose(pairs.final, euler, atol=1e-4)


def tbcm_distiller(jvp: str = "finite-difference", **tbcm) -> tuple[Recorder, TBCMDistiller]:
    rec, roles = toy_roles()
    head = T.LogVarHead(channels=8, generator=torch.Generator().manual_seed(0))
    method = MethodConfig(name="tbcm", tbcm={"route_steps": 5, "guidance": [2.0], "jvp": jvp, "tangent_warmup": 2,
                                             **tbcm})  # fmt: skip
    optim = OptimConfig(student_lr=1e-3, warmup_steps=0, grad_clip=0.1, weight_decay=0.0)
    opts = [torch.optim.AdamW(roles.student_module.parameters(), lr=1e-3), torch.optim.AdamW(head.parameters(), lr=1e-3)]
    distiller = TBCMDistiller(FakeAccelerator(), roles, head, method, optim, opts, None,
                              lambda d: toy_batch(rec.inner, d), shift_by(3.0), seed=0)  # fmt: skip
    return rec, distiller


@pytest.mark.parametrize("jvp, jvp_forwards", [("finite-difference", 2), ("autograd", 3)])
def test_an_iteration_rolls_out_the_teacher_and_updates_the_student_and_head_once(jvp, jvp_forwards):
    rec, d = tbcm_distiller(jvp)
    teacher = [p.clone() for p in d.roles.teacher_module.parameters()]
    student = [p.detach().clone() for p in d.roles.student_module.parameters()]
    stats = d.iteration()
    n = 4 * B  # R - 1 = 4 points per prompt
    by_net = [(net, size, grad) for net, size, grad in rec.calls if net == "student"]
    if jvp == "finite-difference":
        assert by_net == [("student", n, False), ("student", n, False), ("student", n, True)]
    else:  # torch.func.jvp's call carries dual tensors (recorded without grad) and the forward with gradient
        assert by_net == [("student", n, False), ("student", n, True)]
    assert [c for c in rec.calls if c[0] == "teacher"] == [("teacher", 2 * B, False)] * 5
    assert (stats["cost/teacher_fwd"], stats["cost/student_fwd"], stats["cost/student_bwd"]) == (10 * B, n, n)
    assert stats["cost/student_jvp_fwd"] == jvp_forwards * n and "cost/fake_fwd" not in stats
    assert (d.counters.iteration, d.counters.student_step, d.counters.fake_step) == (1, 1, 0)
    assert stats["tbcm/r"] == 0.5 and torch.isfinite(stats["loss/student"])  # warm-up over 2 updates
    assert all(torch.equal(a, b) for a, b in zip(teacher, d.roles.teacher_module.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student, d.roles.student_module.parameters()))
    assert float(d.head.linear.weight.detach().abs().sum()) > 0  # the head trained in the same update


def test_a_non_finite_update_is_skipped_and_counted():
    _, d = tbcm_distiller()
    with torch.no_grad():
        for p in d.roles.student_module.parameters():
            p.fill_(float("nan"))
    before = [p.detach().clone() for p in d.head.parameters()]
    stats = d.iteration()
    assert (d.counters.student_step, d.counters.nonfinite, d.counters.nonfinite_streak) == (0, 1, 1)
    assert "grad_norm/student" not in stats
    assert all(torch.equal(a, b) for a, b in zip(before, d.head.parameters()))


def test_the_logged_jvp_norm_is_the_norm_of_the_students_jvp_along_the_rollout():
    from cdmctl.engine.tbcm import student_jvp, tbcm_loss

    rec, roles = toy_roles()
    draws = Draws(0, 0, 0, torch.device("cpu"))
    batch = toy_batch(rec.inner, draws)
    times = sample_route_times(reference_route(shift_by(3.0), 5, 1e-3), draws.whole("route"))
    pairs = teacher_rollout(roles, batch, times, torch.ones(B), SIGMA_D, CostCounter())
    config = MethodConfig(name="tbcm", tbcm={"route_steps": 5, "guidance": [1.0]}).tbcm
    head = T.LogVarHead(channels=8, generator=torch.Generator().manual_seed(0))
    _, stats = tbcm_loss(roles, head, pairs, config, 1.0, CostCounter())
    expected = torch.linalg.vector_norm(student_jvp(roles, pairs, config), dim=(1, 2, 3)).mean()
    assert float(expected) > 0 and torch.allclose(stats["tbcm/jvp_norm"], expected)


class RankAccelerator(FakeAccelerator):
    """Rank `process_index` of two whose peers agree on every flag (the sum over ranks of a flag all ranks hold)."""

    num_processes = 2

    def __init__(self, rank: int):
        self.process_index = rank

    def reduce(self, tensor, reduction="sum"):
        return tensor * 2


def test_two_ranks_draw_the_one_process_batch_and_agree_on_the_unconditional_half():
    """Route times for the whole global batch, each rank its rows of the global guidance draw; a rank whose own
    scales are all 1 still runs the unconditional half when another rank's are not (the same teacher calls)."""
    scales = [1.0, 2.0]
    for iteration in range(50):  # an iteration where rank 0's rows are all 1 and rank 1's are not
        every = sample_guidance(scales, 2 * B, Draws(0, iteration, 0, torch.device("cpu"), 2).whole("guidance"))
        if bool((every[:B] == 1).all()) and bool((every[B:] != 1).any()):
            break
    else:
        pytest.fail("no such iteration in the first 50")
    seen = {}
    for rank in (0, 1):
        rec, d = tbcm_distiller(guidance=scales)
        d.accelerator = RankAccelerator(rank)
        d.counters.iteration = iteration
        captured = {}
        original = teacher_rollout

        def spy(roles, batch, times, guidance, sigma_d, cost, guided=None):
            captured.update(times=times, guidance=guidance, guided=guided)
            return original(roles, batch, times, guidance, sigma_d, cost, guided)

        import cdmctl.engine.tbcm as tbcm_module

        tbcm_module.teacher_rollout, saved = spy, tbcm_module.teacher_rollout
        try:
            d.iteration()
        finally:
            tbcm_module.teacher_rollout = saved
        assert [c for c in rec.calls if c[0] == "teacher"] == [("teacher", 2 * B, False)] * 5  # guided on both ranks
        seen[rank] = captured
    assert torch.equal(seen[0]["times"], seen[1]["times"]) and seen[0]["guided"] and seen[1]["guided"]
    assert torch.equal(torch.cat([seen[0]["guidance"], seen[1]["guidance"]]), every)
