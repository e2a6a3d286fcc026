"""One iteration on the toy backbone: which network sees which samples, batching, gradients, TTUR, merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cdmctl.backbones.tiny.toy import ToyBackbone
from cdmctl.config.schema import MethodConfig, OptimConfig
from cdmctl.engine import losses as L
from cdmctl.engine.cost import CostCounter
from cdmctl.engine.loop import Distiller, scheduled_lr, warmup_lr
from cdmctl.engine.roles import Roles
from cdmctl.engine.simulate import Trajectory
from cdmctl.engine.step import Batch, Draws, student_loss

B = 3


class Recorder:
    """A backbone wrapper that logs (network, batch size, requires grad) of every velocity call."""

    def __init__(self, backbone: ToyBackbone):
        self.inner, self.calls, self.names = backbone, [], {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def velocity(self, model, x, s, cond):
        self.calls.append((self.names[id(model)], x.shape[0], torch.is_grad_enabled()))
        return self.inner.velocity(model, x, s, cond)


def make_roles(fake_offset: float = 0.05):
    """Student = teacher; the fake teacher is nudged off the teacher so DM/CDM directions are non-zero."""
    toy = ToyBackbone(seed=1)
    rec = Recorder(toy)
    student = toy.transformer
    teacher = copy.deepcopy(student).requires_grad_(False)
    fake = copy.deepcopy(student)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in fake.parameters():
            p.add_(fake_offset * torch.randn(p.shape, generator=gen))
    rec.names = {id(student): "student", id(teacher): "teacher", id(fake): "fake"}
    return rec, Roles(rec, student, teacher, fake)


def make_batch(toy, draws: Draws) -> Batch:
    cond = toy.encode_prompts(["a", "b", "c"])
    noise = draws.rows("noise", B, lambda g, n: torch.randn((n, *toy.latent_shape(32, 32)), generator=g))
    return Batch(cond, toy.encode_prompts([""]).expand(B), noise)


def trajectory(toy, batch) -> Trajectory:
    xt = batch.noise * 0.7
    s_t = torch.tensor([0.9, 0.6, 0.3])
    vt = torch.randn_like(xt)
    return Trajectory(xt, s_t, vt, L.clean_estimate(xt, s_t, vt), None, 0)


@pytest.mark.parametrize(
    "method, student_calls, teacher_calls, fake_calls",
    [
        (MethodConfig(), [2 * B], [4 * B], [2 * B]),  # CA+DM share x0; CDM point in the same forward
        (MethodConfig(cdm_perturbation="none"), [B], [4 * B], [2 * B]),  # xe == xt: one forward serves all
        (MethodConfig(name="ddmd", schedule={"kind": "fixed"}, losses={"cdm": 0}), [B], [3 * B], [B]),
        (MethodConfig(name="dmd2", schedule={"kind": "fixed"}, losses={"ca": 0, "dm": 0, "cdm": 0, "guided_dm": 1}),
         [B], [2 * B], [B]),
        (MethodConfig(losses={"ca": 0, "dm": 0}), [B], [B], [B]),  # CDM only
    ],
)
def test_each_network_runs_once_per_student_update(method, student_calls, teacher_calls, fake_calls):
    rec, roles = make_roles()
    draws = Draws(0, 0, 0, torch.device("cpu"))
    batch = make_batch(rec.inner, draws)
    cost = CostCounter()
    loss, stats = student_loss(roles, method, batch, trajectory(rec.inner, batch), draws, cost)
    by_net = {n: [b for m, b, _ in rec.calls if m == n] for n in ("student", "teacher", "fake")}
    assert by_net == {"student": student_calls, "teacher": teacher_calls, "fake": fake_calls}
    # only the student's forward is recorded for autograd
    assert all(grad == (net == "student") for net, _, grad in rec.calls)
    rec_cost = cost.as_record()
    assert rec_cost["cost/student_fwd"] == rec_cost["cost/student_bwd"] == sum(student_calls)
    assert rec_cost["cost/teacher_fwd"] == sum(teacher_calls) and rec_cost["cost/fake_fwd"] == sum(fake_calls)
    loss.backward()
    assert all(p.grad is None for p in roles.teacher_module.parameters())
    assert all(p.grad is None for p in roles.fake_module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in roles.student_module.parameters())
    parts = sum(v for k, v in stats.items() if k.startswith("loss/") and k != "loss/student")
    assert torch.isclose(loss.detach(), parts, rtol=1e-5)


def test_dm_direction_vanishes_when_fake_equals_teacher():
    """F = R (as at initialisation) makes the DM and CDM directions exactly zero: no signal, no noise."""
    rec, roles = make_roles(fake_offset=0.0)
    draws = Draws(0, 0, 0, torch.device("cpu"))
    batch = make_batch(rec.inner, draws)
    _, stats = student_loss(roles, MethodConfig(), batch, trajectory(rec.inner, batch), draws, CostCounter())
    # (not bit-exact: the teacher and fake batches differ in size, so their matmuls round differently)
    assert stats["loss/dm"] < 1e-12 and stats["loss/cdm"] < 1e-12 and stats["loss/ca"] > 1e-6


class FakeAccelerator:
    device, process_index, num_processes = torch.device("cpu"), 0, 1

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unwrap_model(self, m):
        return m


def distiller(method: MethodConfig, warmup: int = 0, iterations: int = 0, **optim) -> Distiller:
    rec, roles = make_roles()
    optim = OptimConfig(warmup_steps=warmup, student_lr=1e-3, fake_lr=1e-3, **optim)
    s_opt = torch.optim.AdamW(roles.student_module.parameters(), lr=1.0)
    f_opt = torch.optim.AdamW(roles.fake_module.parameters(), lr=1.0)
    return Distiller(FakeAccelerator(), roles, method, optim, s_opt, f_opt, None,
                     lambda d: make_batch(rec.inner, d), lambda s, steps: s, seed=0, iterations=iterations)


def test_a_cosine_run_ends_each_optimizer_at_its_floor_on_its_own_step_count():
    d = distiller(MethodConfig(ttur_ratio=2), iterations=4, lr_schedule="cosine", lr_floor=0.25)
    rates = [d.iteration() for _ in range(4)]
    assert [r["lr/fake"] for r in rates] == pytest.approx([1e-3 * (0.25 + 0.75 * (1 + math.cos(math.pi * k / 4)) / 2)
                                                           for k in range(4)])  # fmt: skip
    # two student updates in four iterations: its half cosine spans those two
    assert [r["lr/student"] for r in rates if "lr/student" in r] == pytest.approx([1e-3, 1e-3 * (0.25 + 0.75 / 2)])
    assert d.student_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.625)


def test_ttur_student_updates_every_kth_iteration_and_fake_merges_student():
    d = distiller(MethodConfig(ttur_ratio=3, merge_decay=0.5))
    teacher_before = [p.clone() for p in d.roles.teacher_module.parameters()]
    for _ in range(6):
        d.iteration()
    assert (d.counters.iteration, d.counters.student_step, d.counters.fake_step) == (6, 2, 6)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, d.roles.teacher_module.parameters()))
    # with merge decay 0.5 after a fake step, fake = (fake' + student) / 2 exactly
    d.method.merge_decay = 0.5
    student = [p.detach().clone() for p in d.roles.student_module.parameters()]
    fake = [p.detach().clone() for p in d.roles.fake_module.parameters()]
    d.roles.merge_student_into_fake(0.5)
    for f0, s0, f1 in zip(fake, student, d.roles.fake_module.parameters()):
        torch.testing.assert_close(f1, (f0 + s0) / 2)


def test_iteration_is_a_function_of_its_number():
    """Two distillers from the same weights produce identical weights: draws come from (seed, iteration)."""
    a, b = distiller(MethodConfig()), distiller(MethodConfig())
    for _ in range(4):
        a.iteration(), b.iteration()
    for p, q in zip(a.roles.student_module.parameters(), b.roles.student_module.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_loss_skips_the_step_and_is_counted():
    d = distiller(MethodConfig())
    before = [p.clone() for p in d.roles.fake_module.parameters()]
    assert d.apply(torch.tensor(float("nan"), requires_grad=True), d.fake_opt, d.roles.fake_module, 1e-3) is None
    assert d.counters.nonfinite == 1 and d.counters.nonfinite_streak == 1
    assert all(torch.equal(a, b) for a, b in zip(before, d.roles.fake_module.parameters()))


def test_warmup_counts_optimizer_steps():
    assert [warmup_lr(1.0, s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(2e-5, 0, 0) == 2e-5


def test_cosine_learning_rate_warms_up_then_falls_to_its_floor_at_the_last_step():
    from cdmctl.config.schema import OptimConfig

    cosine = OptimConfig(warmup_steps=2, lr_schedule="cosine", lr_floor=0.1)
    # warm-up 0.5, 1.0; then 0.1 + 0.9 * (1 + cos(pi * t)) / 2 at t = 0, 1/4, 1/2, 1, and held past the end
    got = [scheduled_lr(1.0, s, cosine, total=6) for s in (0, 1, 2, 3, 4, 6, 9)]
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 2**-0.5), 0.55, 0.1, 0.1]
    assert got == pytest.approx(want)
    constant = OptimConfig(warmup_steps=2)
    assert [scheduled_lr(1.0, s, constant, total=6) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_draws_refuse_a_purpose_taken_twice_in_one_iteration():
    draws = Draws(0, 3, 0, torch.device("cpu"))
    draws.whole("cdm-level")
    with pytest.raises(RuntimeError, match="cdm-level"):
        draws.whole("cdm-level")
    with pytest.raises(RuntimeError, match="cdm-level"):
        draws.shared("cdm-level")
    draws.noise_like(torch.zeros(2), "ca-noise")
    with pytest.raises(RuntimeError, match="ca-noise"):
        draws.noise_like(torch.zeros(2), "ca-noise")
    # a new iteration starts with every purpose free again, and redraws the same numbers
    a, b = Draws(0, 3, 0, torch.device("cpu")), Draws(0, 3, 0, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a.whole("x")), torch.rand(4, generator=b.whole("x")))


class LevelRecorder(Recorder):
    """Also keeps the noise levels [B'] of every call."""

    def velocity(self, model, x, s, cond):
        self.levels = getattr(self, "levels", []) + [(self.names[id(model)], s.detach().clone())]
        return super().velocity(model, x, s, cond)


def cdm_levels(method: MethodConfig, iterations: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """(se, sc) over `iterations` student updates: the student's CDM-point level and the CDM teacher's level."""
    ses, scs = [], []
    for it in range(iterations):
        rec, roles = make_roles()
        rec.__class__ = LevelRecorder
        draws = Draws(0, it, 0, torch.device("cpu"))
        batch = make_batch(rec.inner, draws)
        student_loss(roles, method, batch, trajectory(rec.inner, batch), draws, CostCounter())
        student = [s for n, s in rec.levels if n == "student"][0]
        teacher = [s for n, s in rec.levels if n == "teacher"][0]
        ses.append(student[B:])  # the student's forward is [xt; xe]
        scs.append(teacher[3 * B:])  # the teacher's is [CA cond; CA uncond; DM; CDM]
    return torch.cat(ses), torch.cat(scs)


@pytest.mark.parametrize("perturbation", ["velocity", "gaussian"])
def test_cdm_teacher_level_is_drawn_independently_of_the_perturbation_level(perturbation):
    se, sc = cdm_levels(MethodConfig(cdm_perturbation=perturbation))
    assert se.shape == sc.shape == (40 * B,)
    assert not torch.isclose(se, sc).any()
    assert abs(float(torch.corrcoef(torch.stack([se, sc]))[0, 1])) < 0.3  # 120 pairs: |r| of independent ~0.09
    # both are U(0, 1) clamped: their means are near 0.5
    assert abs(float(se.mean()) - 0.5) < 0.1 and abs(float(sc.mean()) - 0.5) < 0.1


def test_coupled_cdm_teacher_level_is_an_explicit_ablation():
    se, sc = cdm_levels(MethodConfig(cdm_perturbation="gaussian", cdm_teacher_level="coupled"), iterations=3)
    torch.testing.assert_close(se, sc)


def weights(d: Distiller) -> list[torch.Tensor]:
    return [p.detach().clone() for m in (d.roles.student_module, d.roles.fake_module) for p in m.parameters()]


def test_one_simulation_per_cycle_with_ttur_1_is_the_per_iteration_method():
    a = distiller(MethodConfig(ttur_ratio=1))
    b = distiller(MethodConfig(ttur_ratio=1, simulation="per-cycle"))
    for _ in range(3):
        a.iteration(), b.iteration()
    assert all(torch.equal(p, q) for p, q in zip(weights(a), weights(b)))


def test_one_simulation_per_cycle_simulates_once_per_cycle_and_resumes_mid_cycle_exactly():
    method = MethodConfig(ttur_ratio=3, simulation="per-cycle", merge_decay=1.0)
    a, b = distiller(method), distiller(method)
    sims = []
    for _ in range(4):
        sims.append(a.iteration()["cost/student_fwd"])
        b.iteration()
    # iterations 0 and 3 start a cycle: only they simulate; the student update (iteration 2) adds its 2B forwards
    per_iteration = distiller(MethodConfig(ttur_ratio=3, merge_decay=1.0))
    assert sims[1] == 0 and sims[2] == 2 * B and sims[0] > 0 and sims[3] > 0
    assert sims[0] < sum(per_iteration.iteration()["cost/student_fwd"] for _ in range(3)) - 2 * B
    # b forgets its cycle (what a resume at iteration 4 holds): it redoes iteration 3's simulation, same points
    b.load_state(b.state())
    assert b.cycle is None
    ra, rb = a.iteration(), b.iteration()
    assert rb["cost/student_fwd"] == ra["cost/student_fwd"] == 0  # redone, not counted again
    assert all(torch.equal(p, q) for p, q in zip(weights(a), weights(b)))
    assert (a.counters.student_step, a.counters.fake_step) == (1, 5)
