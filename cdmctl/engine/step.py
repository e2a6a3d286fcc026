"""One training iteration's pieces: draw the schedule, simulate, one fake-teacher update, one student update.

No I/O here. Every random draw comes from a generator derived from (seed, iteration, purpose, rank),
so an iteration is a pure function of the weights, the optimizer state and its number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from cdmctl.backbones.base import Conditioning
from cdmctl.engine import losses as L
from cdmctl.engine.cost import CostCounter
from cdmctl.engine.rng import generator
from cdmctl.engine.roles import Call, Roles
from cdmctl.engine.schedules import (
    fixed_schedule,
    identity,
    levels_from_uniform,
    sample_dynamic_schedule,
    sample_levels,
    sample_record_index,
    uniform,
)
from cdmctl.engine.simulate import Trajectory, simulate_points

if TYPE_CHECKING:  # the engine reads preset sections but never imports the layer above at run time
    from cdmctl.config.schema import MethodConfig


@dataclass
class Batch:
    """The prompts of one iteration on this process: conditioning [B], the empty prompt's [B], noise [B, ...]."""

    cond: Conditioning
    null: Conditioning
    noise: torch.Tensor


@dataclass
class Draws:
    """Random streams of one iteration: `shared` (one value for everyone, e.g. the schedule length) and
    per-sample streams drawn for the whole global batch, of which each rank takes its own rows.

    Per-sample draws do not depend on how many processes share the batch: a run on N processes sees exactly
    the samples (prompts, noise, levels, record steps) of a one-process run with the same global batch, so
    the two agree up to floating-point reduction order, and a resume on another world size continues the
    same stream. The global streams are keyed like rank 0's per-rank streams of earlier versions, so
    single-process runs draw what they always drew.

    Each purpose may be drawn once per iteration: a second draw under the same name would repeat the
    first one's numbers exactly (same seed), silently coupling two quantities meant to be independent.
    """

    seed: int
    iteration: int
    rank: int
    device: torch.device
    world: int = 1
    used: set[str] = field(default_factory=set)

    def claim(self, purpose: str) -> None:
        if purpose in self.used:
            raise RuntimeError(f"random draw {purpose!r} was already taken in iteration {self.iteration}: "
                               "two draws under one purpose would be identical; give each its own purpose")
        self.used.add(purpose)

    def shared(self, purpose: str) -> torch.Generator:
        self.claim(purpose)
        return generator(self.seed, self.iteration, purpose, device=self.device)

    def whole(self, purpose: str) -> torch.Generator:
        """The global batch's stream for `purpose`, identical on every rank."""
        self.claim(purpose)
        return generator(self.seed, self.iteration, purpose, 0, device=self.device)

    def global_rows(self, purpose: str, batch: int,
                    draw: Callable[[torch.Generator, int], torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """`draw(gen, batch * world)`: the whole global batch's values [world * batch, ...] (every rank alike)."""
        return draw(self.whole(purpose), batch * self.world)

    def mine(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's `batch` rows of a global-batch tensor (ranks hold consecutive slices)."""
        return rows[self.rank * batch : (self.rank + 1) * batch]

    def rows(self, purpose: str, batch: int, draw: Callable[[torch.Generator, int], torch.Tensor]) -> torch.Tensor:
        """This rank's `batch` rows of `draw(gen, global batch)`."""
        return self.mine(self.global_rows(purpose, batch, draw), batch)

    def noise_like(self, x: torch.Tensor, purpose: str) -> torch.Tensor:
        """Standard normal noise shaped like x [B, ...] (float32): this rank's rows of the global batch's."""
        return self.rows(purpose, x.shape[0], lambda g, n: torch.randn(
            (n, *x.shape[1:]), generator=g, device=x.device, dtype=torch.float32))


def levels_draw(clamp: tuple[float, float]) -> Callable[[torch.Generator, int], torch.Tensor]:
    """A `Draws.rows` draw of per-sample levels U(0, 1) clamped to `clamp` (float32 [n])."""
    return lambda gen, n: sample_levels(gen, n, clamp)


def training_schedule(method: "MethodConfig", draws: Draws, shift: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The iteration's schedule in the levels the network sees: fixed, or drawn (one schedule for the whole
    global batch, the same on every rank); `shift` is the backbone's time shift (unless the preset turns it off)."""
    sched = method.schedule
    shift = shift if sched.time_shift else identity
    if sched.kind == "fixed":
        return shift(fixed_schedule(sched.levels)).double()
    return sample_dynamic_schedule(
        draws.shared("length"), sched.length, sched.level_range, sched.inner, inner_gen=draws.whole("levels"),
        shift=shift, coverage=sched.coverage, coverage_gen=draws.whole("coverage"),
    )


def run_simulation(
    roles: Roles, method: "MethodConfig", batch: Batch, levels: torch.Tensor, draws: Draws, cost: CostCounter,
    points: int = 1,
) -> list[Trajectory]:
    """Backward simulation with the student (eval mode, guidance 1), recording `points` points per sample
    along one trajectory (several: one per iteration of a TTUR cycle, see `method.simulation`)."""
    n, b = len(levels), len(batch.cond)
    # [world * B, points]: the global batch's recorded steps, one column per point
    def record(gen: torch.Generator, m: int) -> torch.Tensor:
        return torch.stack([sample_record_index(gen, m, n) for _ in range(points)], 1)

    every = draws.global_rows("record", b, record)
    index = draws.mine(every, b).T.contiguous()
    keep_final = method.cdm_target == "full-trajectory" and method.losses.cdm > 0
    # every rank runs the student as often as the rank with the latest recorded step (FSDP gathers the
    # weights in each call, collectively); known without communication since every rank drew them all
    lockstep = int(every.max()) + 1

    def velocity(x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # the simulation evaluates only the samples still before their (latest) recorded step
        return roles.student(x, s, batch.cond.index(rows))

    trajs = simulate_points(velocity, batch.noise, levels.to(batch.noise.device), index, keep_final=keep_final,
                            min_steps=lockstep)
    cost.add("student", forward=trajs[0].student_samples)
    return trajs


def fake_loss(
    roles: Roles, method: "MethodConfig", batch: Batch, traj: Trajectory, draws: Draws, cost: CostCounter
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow matching of the fake teacher on the student's own clean estimates sg(x0t)."""
    x0t = traj.x0t.detach()
    s = draws.rows("fake-level", len(x0t), levels_draw(method.level_clamp)).to(x0t.device)
    eps = draws.noise_like(x0t, "fake-noise")
    v = roles.fake(L.renoise(x0t, s, eps), s, batch.cond)
    cost.add("fake", forward=len(x0t), backward=len(x0t))
    loss = L.flow_matching_loss(v, eps, x0t)
    return loss, {"loss/fake": loss.detach(), "level/fake_mean": s.mean()}


@dataclass
class StudentPrediction:
    """The student's clean estimates at the recorded point (x0) and at the CDM point (x0e)."""

    x0: torch.Tensor | None
    x0e: torch.Tensor | None
    se: torch.Tensor | None
    eps_e: torch.Tensor | None = None  # the gaussian perturbation's noise (only the coupled ablation reuses it)


def cdm_point(method: "MethodConfig", traj: Trajectory, draws: Draws):
    """Move the recorded point off the trajectory: (xe [B, ...], se [B], the gaussian noise [B, ...] or None)."""
    if method.cdm_perturbation == "none":
        return traj.xt, traj.s_t, None
    # se and its noise have their own purposes: the CDM term re-noises at an independent level sc ("cdm-level")
    se = draws.rows("cdm-perturb-level", len(traj.xt), levels_draw(method.level_clamp)).to(traj.xt.device)
    if method.cdm_perturbation == "velocity":
        return L.extrapolate(traj.xt, traj.s_t, traj.vt, se), se, None
    eps = draws.noise_like(traj.xt, "cdm-perturb-noise")
    return L.renoise(traj.x0t, se, eps), se, eps


def predict_student(
    roles: Roles, method: "MethodConfig", batch: Batch, traj: Trajectory, draws: Draws, cost: CostCounter
) -> StudentPrediction:
    """One student forward with gradient over [xt; xe]: it feeds CA, DM and CDM alike."""
    w = method.losses
    need_main = bool(w.ca or w.dm or w.guided_dm)
    need_cdm = bool(w.cdm)
    xe, se, eps_e = cdm_point(method, traj, draws) if need_cdm else (None, None, None)
    shared = need_main and need_cdm and method.cdm_perturbation == "none"  # xe == xt: reuse, never recompute
    calls = []
    if need_main or shared:
        calls.append(Call(traj.xt, traj.s_t, batch.cond))
    if need_cdm and not shared:
        calls.append(Call(xe, se, batch.cond))
    sizes = [len(c.x) for c in calls]
    x = torch.cat([c.x for c in calls])
    s = torch.cat([c.s for c in calls])
    v = roles.student(x, s, Conditioning.cat([c.cond for c in calls]))
    cost.add("student", forward=len(x), backward=len(x))
    x0_all = L.clean_estimate(x, s, v).split(sizes)
    x0 = x0_all[0] if (need_main or shared) else None
    x0e = x0 if shared else (x0_all[-1] if need_cdm else None)
    return StudentPrediction(x0=x0 if need_main else None, x0e=x0e, se=se, eps_e=eps_e)


@dataclass
class Term:
    """One student loss: its teacher and fake calls, and how their outputs become the loss."""

    name: str
    weight: float
    teacher: list[Call]
    fake: list[Call]
    finish: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


def ca_term(method, batch, traj, pred, draws) -> Term:
    """CFG augmentation at a level capped by the student's own: D = g (x0c - x0u) / nrm(x0c)."""
    x0 = pred.x0.detach()
    sa = levels_from_uniform(draws.rows("ca-level", len(x0), uniform), method.level_clamp, cap=traj.s_t).to(x0.device)
    xa = L.renoise(x0, sa, draws.noise_like(x0, "ca-noise"))

    def finish(t: list[torch.Tensor], _: list[torch.Tensor]) -> torch.Tensor:
        x0c, x0u = L.clean_estimate(xa, sa, t[0]), L.clean_estimate(xa, sa, t[1])
        return L.matching_loss(pred.x0, L.ca_direction(x0c, x0u, pred.x0, method.guidance, method.normaliser_floor))

    return Term("ca", method.losses.ca, [Call(xa, sa, batch.cond), Call(xa, sa, batch.null)], [], finish)


def matching_term(name: str, weight: float, method, batch, x0: torch.Tensor, target: torch.Tensor, draws,
                  guided: bool = False, level: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Term:
    """DM-type loss on x0: teacher minus fake at a re-noised `target` (guided: teacher with CFG).

    The re-noise level and noise are fresh draws unless `level` / `noise` are given (coupled ablation)."""
    s = level if level is not None else draws.rows(f"{name}-level", len(x0), levels_draw(method.level_clamp))
    s = s.to(x0.device)
    eps = noise if noise is not None else draws.noise_like(x0, f"{name}-noise")
    xs = L.renoise(target.detach(), s, eps)
    teacher = [Call(xs, s, batch.cond)] + ([Call(xs, s, batch.null)] if guided else [])

    def finish(t: list[torch.Tensor], f: list[torch.Tensor]) -> torch.Tensor:
        v_real = L.guided_prediction(t[0], t[1], method.guidance) if guided else t[0]
        x0r, x0f = L.clean_estimate(xs, s, v_real), L.clean_estimate(xs, s, f[0])
        return L.matching_loss(x0, L.dm_direction(x0r, x0f, x0, method.normaliser_floor))

    return Term(name, weight, teacher, [Call(xs, s, batch.cond)], finish)


def student_terms(method, batch, traj, pred, draws) -> list[Term]:
    w = method.losses
    terms = []
    if w.ca:
        terms.append(ca_term(method, batch, traj, pred, draws))
    if w.dm:
        terms.append(matching_term("dm", w.dm, method, batch, pred.x0, pred.x0, draws))
    if w.cdm:
        target = traj.final if method.cdm_target == "full-trajectory" else pred.x0e
        # coupled (an ablation): the teacher re-noises at the perturbation's own level (and gaussian noise)
        coupled = method.cdm_teacher_level == "coupled" and pred.se is not None and method.cdm_perturbation != "none"
        level, noise = (pred.se, pred.eps_e) if coupled else (None, None)
        terms.append(matching_term("cdm", w.cdm, method, batch, pred.x0e, target, draws, level=level, noise=noise))
    if w.guided_dm:
        terms.append(matching_term("guided_dm", w.guided_dm, method, batch, pred.x0, pred.x0, draws, guided=True))
    return terms


def student_loss(
    roles: Roles, method: "MethodConfig", batch: Batch, traj: Trajectory, draws: Draws, cost: CostCounter
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted CA + DM + CDM (or guided DM); the teacher and the fake teacher each run once, batched."""
    pred = predict_student(roles, method, batch, traj, draws, cost)
    terms = student_terms(method, batch, traj, pred, draws)
    teacher_out = roles.teacher([c for t in terms for c in t.teacher])
    fake_out = roles.fake_predict([c for t in terms for c in t.fake])
    cost.add("teacher", forward=sum(len(c.x) for t in terms for c in t.teacher))
    cost.add("fake", forward=sum(len(c.x) for t in terms for c in t.fake))
    total = torch.zeros((), device=traj.xt.device)
    # statistics stay tensors: reading them is deferred to the log interval (no GPU sync per step)
    stats = {"level/s_t_mean": traj.s_t.mean()}
    for term in terms:
        t_out, teacher_out = teacher_out[: len(term.teacher)], teacher_out[len(term.teacher):]
        f_out, fake_out = fake_out[: len(term.fake)], fake_out[len(term.fake):]
        loss = term.finish(t_out, f_out)
        stats[f"loss/{term.name}"] = loss.detach()
        total = total + term.weight * loss
    stats["loss/student"] = total.detach()
    return total, stats
