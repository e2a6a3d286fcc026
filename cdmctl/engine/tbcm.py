"""TBCM: the reference route, trajectory-sampled pairs from a teacher rollout, and one sCM student update.

One iteration (docs/method.md, "TBCM"): draw one TrigFlow time inside each interval of the reference route,
roll the teacher out from noise through those times with CFG, keep every intermediate (x_t, t, dx_t/dt) after
the first as a training point (R - 1 per prompt; the teacher's own velocity is the tangent, no extra call), and
update the student once with the sCM objective. No fake teacher, no images, no VAE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from cdmctl.backbones.base import Conditioning
from cdmctl.engine import trigflow as T
from cdmctl.engine.cost import CostCounter
from cdmctl.engine.ema import StudentEMA
from cdmctl.engine.jvp import JVP_FORWARDS, jvp_autograd, jvp_finite_difference
from cdmctl.engine.loop import Counters, optimizer_step, scheduled_lr
from cdmctl.engine.roles import Call, Roles
from cdmctl.engine.step import Batch, Draws

if TYPE_CHECKING:
    from cdmctl.config.schema import MethodConfig, OptimConfig, TBCMConfig


def reference_route(shift: Callable[[torch.Tensor], torch.Tensor], steps: int, end: float) -> torch.Tensor:
    """The teacher's own `steps`-level schedule as TrigFlow times, float64 [steps], descending, first pi/2.

    The levels of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(steps) (what the TBCM code re-implements
    with Sana's shift): `shift(linspace(1, shift(end), steps))`, `end` = 1 / num_train_timesteps; then t = atan(s / (1 - s)).
    """
    low = float(shift(torch.tensor([end], dtype=torch.float64)).double()[0])
    levels = shift(torch.linspace(1.0, low, steps, dtype=torch.float64)).double()
    t = T.trig_time(levels)
    t[0] = T.HALF_PI
    return t


def sample_route_times(route: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[route[0], one U(route[i + 1], route[i]) draw per interval], float64 [R], strictly descending."""
    u = torch.rand(len(route) - 1, generator=gen, device=gen.device, dtype=torch.float64).cpu()
    low, high = route[1:], route[:-1]
    return torch.cat([route[:1], low + (high - low) * u])


def sample_guidance(scales: list[float], batch: int, gen: torch.Generator) -> torch.Tensor:
    """One CFG scale per prompt, uniformly from `scales`, float32 [B]."""
    pick = torch.randint(len(scales), (batch,), generator=gen, device=gen.device).cpu()
    return torch.tensor(scales, dtype=torch.float32)[pick]


@dataclass
class Pairs:
    """Training points of one rollout, point-major: x [N, ...] (TrigFlow state x_t), t [N], dxdt [N, ...] (the
    teacher's CFG tangent at x_t), cond [N]; N = (R - 1) B. `final` [B, ...] is the rollout's clean end (flow space)."""

    x: torch.Tensor
    t: torch.Tensor
    dxdt: torch.Tensor
    cond: Conditioning
    final: torch.Tensor


@torch.no_grad()
def teacher_dxdt(roles: Roles, x: torch.Tensor, t: torch.Tensor, batch: Batch, guidance: torch.Tensor,
                 sigma_d: float, guided: bool = True) -> torch.Tensor:  # fmt: skip
    """dx_t/dt = sigma_d F of the teacher with CFG at TrigFlow state x [B, ...], times t [B]: one batched call
    (with the unconditional half when `guided`; a scale of 1 then gives the conditional velocity exactly).

    CFG acts on the velocity: F is affine in v at a fixed input, so guiding v guides F by the same scales.
    """
    x_flow, s = T.flow_input(x / sigma_d, t)
    calls = [Call(x_flow, s, batch.cond)] + ([Call(x_flow, s, batch.null)] if guided else [])
    out = roles.teacher(calls)
    v = out[0].float()
    if guided:
        g = guidance.to(v.device).view(-1, *[1] * (v.dim() - 1))
        v = out[1].float() + g * (v - out[1].float())
    return sigma_d * T.trigflow_output(x_flow, s, v)


@torch.no_grad()
def teacher_rollout(roles: Roles, batch: Batch, times: torch.Tensor, guidance: torch.Tensor, sigma_d: float,
                    cost: CostCounter, guided: bool | None = None) -> Pairs:  # fmt: skip
    """Roll the teacher out from x = sigma_d noise through `times` [R] (DDIM steps in TrigFlow, the last to t = 0),
    keeping (x_t, t, dx_t/dt) at every time but the first. `guided`: run the unconditional half (default: if any
    of this batch's scales is not 1; the distiller decides it for the global batch)."""
    guided = bool((guidance != 1).any()) if guided is None else guided
    x = sigma_d * batch.noise.float()
    n, device = len(x), x.device
    xs, ts, tangents = [], [], []
    for i, ti in enumerate(times.tolist()):
        t = torch.full((n,), ti, device=device, dtype=torch.float32)
        dxdt = teacher_dxdt(roles, x, t, batch, guidance, sigma_d, guided)
        cost.add("teacher", forward=n * (2 if guided else 1))
        if i > 0:
            xs.append(x), ts.append(t), tangents.append(dxdt)
        t_next = torch.full_like(t, float(times[i + 1]) if i + 1 < len(times) else 0.0)
        x = T.trig_step(x, t, t_next, dxdt)
    cond = Conditioning.cat([batch.cond] * len(xs))
    return Pairs(torch.cat(xs), torch.cat(ts), torch.cat(tangents), cond, x / sigma_d)


def student_F(roles: Roles, cond: Conditioning, unwrapped: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """F(y, t) of the student through the TrigFlow wrapper (unwrapped: for torch.func.jvp)."""
    velocity = roles.student_unwrapped if unwrapped else roles.student
    return lambda y, t: T.trigflow_F(lambda x, s: velocity(x, s, cond), y, t)


def student_jvp(roles: Roles, pairs: Pairs, config: "TBCMConfig") -> torch.Tensor:
    """dF/dt of the student along the trajectory (x_t / sigma_d, t) with sCM's cos t sin t tangents, float32."""
    y = pairs.x / config.sigma_data
    tangents = T.jvp_tangents(pairs.t, pairs.dxdt, config.sigma_data)
    if config.jvp == "autograd":
        return jvp_autograd(student_F(roles, pairs.cond, unwrapped=True), (y, pairs.t), tangents)
    return jvp_finite_difference(student_F(roles, pairs.cond), (y, pairs.t), tangents, config.jvp_eps)


def tbcm_loss(roles: Roles, head: torch.nn.Module, pairs: Pairs, config: "TBCMConfig", r: float,
              cost: CostCounter) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The sCM loss of the student on the pairs: a JVP (no gradient), then one forward with gradient."""
    n, sigma_d = len(pairs.x), config.sigma_data
    F_jvp = student_jvp(roles, pairs, config)
    cost.add("student_jvp", forward=JVP_FORWARDS[config.jvp] * n)
    F = student_F(roles, pairs.cond)(pairs.x / sigma_d, pairs.t)
    cost.add("student", forward=n, backward=n)
    g, g_norm = T.scm_tangent(F.detach(), F_jvp, pairs.x, pairs.dxdt, pairs.t, r, sigma_d, config.tangent_norm)
    logvar = head(pairs.t)
    loss, unweighted = T.scm_loss(F, g, pairs.t, logvar, sigma_d)
    jvp_norm = torch.linalg.vector_norm(F_jvp.float(), dim=tuple(range(1, F_jvp.dim())))  # per point, cos t sin t dF/dt
    stats = {"loss/student": loss.detach(), "loss/scm_unweighted": unweighted, "loss/logvar": logvar.detach().mean(),
             "tbcm/g_norm": g_norm.mean(), "tbcm/jvp_norm": jvp_norm.mean(), "tbcm/r": torch.tensor(r),
             "level/t_mean": pairs.t.mean()}  # fmt: skip
    return loss, stats


class TBCMDistiller:
    """TBCM's iteration over the roles (student and frozen teacher): rollout, one student update, EMA.

    `head` is the log-variance head (prepared by accelerate like the student); `optimizers` are the student's
    and the head's, stepped together after one backward and one clip over both. The counters are the CDM
    family's (fake_step stays 0). `clip(parameters, max_norm)` as for the CDM family's `Distiller`.
    """

    def __init__(self, accelerator: Any, roles: Roles, head: torch.nn.Module, method: "MethodConfig",
                 optim: "OptimConfig", optimizers: list[torch.optim.Optimizer], ema: StudentEMA | None,
                 make_batch: Callable[[Draws], Batch], shift: Callable[[torch.Tensor, int], torch.Tensor], seed: int,
                 clip: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None, iterations: int = 0):
        self.accelerator, self.roles, self.head, self.method, self.optim = accelerator, roles, head, method, optim
        self.iterations = iterations  # one student update per iteration: where a decaying learning rate ends
        self.config: "TBCMConfig" = method.tbcm
        self.optimizers, self.ema, self.make_batch, self.seed, self.clip = optimizers, ema, make_batch, seed, clip
        steps = self.config.route_steps  # `shift(levels, steps)`: the backbone's shift for a schedule of `steps`
        self.route = reference_route(lambda s: shift(s, steps), steps, self.config.route_end)
        self.counters = Counters()
        self.cost = CostCounter(networks=("student", "teacher"))  # no fake teacher to count

    def draws(self) -> Draws:
        acc = self.accelerator
        return Draws(self.seed, self.counters.iteration, acc.process_index, acc.device, acc.num_processes)

    def iteration(self) -> dict[str, float | torch.Tensor]:
        """One rollout and one student update; returns the iteration's scalars."""
        draws = self.draws()
        self.cost.reset()
        batch = self.make_batch(draws)
        # one set of route times for the whole global batch, one scale per prompt of it (each rank its rows): a run
        # draws the same on any number of processes; whether the rollout runs the unconditional half is decided
        # for the global batch, so that every rank makes the same teacher calls (collective under FSDP2)
        times = sample_route_times(self.route, draws.whole("route"))
        b, scales = len(batch.cond), self.config.guidance
        every = draws.global_rows("guidance", b, lambda g, n: sample_guidance(scales, n, g))
        guidance, guided = draws.mine(every, b), bool((every != 1).any())
        self.roles.train_mode(student=False, fake=False)  # the rollout: the teacher only, no gradients
        pairs = teacher_rollout(self.roles, batch, times, guidance, self.config.sigma_data, self.cost, guided)
        stats = self.student_update(pairs)
        self.counters.iteration += 1
        stats.update(self.cost.as_record())
        return stats

    def student_update(self, pairs: Pairs) -> dict[str, float | torch.Tensor]:
        c, cfg = self.counters, self.config
        self.roles.train_mode(student=True, fake=False)
        r = T.tangent_weight(c.student_step, cfg.tangent_warmup, cfg.cooldown_start, cfg.cooldown_steps, cfg.final_r)
        loss, stats = tbcm_loss(self.roles, self.head, pairs, cfg, r, self.cost)
        lr = scheduled_lr(self.optim.student_lr, c.student_step, self.optim, self.iterations)
        head_lr = scheduled_lr(cfg.logvar_lr or self.optim.student_lr, c.student_step, self.optim, self.iterations)
        modules = [self.roles.student_module, self.head]
        norm = optimizer_step(self.accelerator, c, loss, self.optimizers, modules, [lr, head_lr], self.optim.grad_clip,
                              self.clip)  # fmt: skip
        if norm is not None:
            c.student_step += 1
            if self.ema is not None:
                self.ema.update(self.accelerator.unwrap_model(self.roles.student_module), c.student_step)
            stats.update({"grad_norm/student": norm, "lr/student": lr})
        return stats

    def state(self) -> dict[str, int]:
        return asdict(self.counters)

    def load_state(self, counters: dict[str, int]) -> None:
        self.counters = Counters(**{k: counters.get(k, 0) for k in asdict(Counters())})  # older: no streak fields
