"""The distillation loop: `train` repeats a method family's iteration and calls the hooks; the CDM family's iteration.

Reads top to bottom: `Distiller.iteration` is one iteration of the CDM family (one simulation, a student update
every k-th, a fake-teacher update, EMA); TBCM's is `engine.tbcm.TBCMDistiller.iteration`. `train` runs either (an
`Iterating`) and calls the hooks (log, samples, checkpoint) that the run layer provides. Optimizer steps go
through accelerate (`optimizer_step`, shared by both families).
"""

from __future__ import annotations

import math

import resource
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from cdmctl.engine.cost import CostCounter
from cdmctl.engine.ema import StudentEMA
from cdmctl.engine.roles import Roles, trainable_parameters
from cdmctl.engine.simulate import Trajectory
from cdmctl.engine.step import Batch, Draws, fake_loss, run_simulation, student_loss, training_schedule

if TYPE_CHECKING:
    from cdmctl.config.schema import MethodConfig, OptimConfig


class TrainingDiverged(RuntimeError):
    """Raised when non-finite losses keep coming: better to stop than to write a broken checkpoint."""


@dataclass
class Counters:
    """Everything that says where training is; stored in every checkpoint manifest."""

    iteration: int = 0
    student_step: int = 0
    fake_step: int = 0
    nonfinite: int = 0
    nonfinite_streak: int = 0  # the longer of the two below
    # skipped updates in a row, per network: one network's finite updates must not hide the other's divergence
    student_streak: int = 0
    fake_streak: int = 0

    def count_update(self, network: str, finite: bool) -> None:
        """One update of `network` ('student' or 'fake'): finite ends its streak, non-finite lengthens it."""
        streak = 0 if finite else getattr(self, f"{network}_streak") + 1
        setattr(self, f"{network}_streak", streak)
        self.nonfinite += 0 if finite else 1
        self.nonfinite_streak = max(self.student_streak, self.fake_streak)

    def diverging(self) -> str:
        """The network whose streak is the longer one, as the user knows it."""
        return "student" if self.student_streak >= self.fake_streak else "fake teacher"


class Iterating(Protocol):
    """What `train` needs of a method family's distiller (CDM's `Distiller`, TBCM's `TBCMDistiller`)."""

    counters: Counters
    cost: CostCounter

    def iteration(self) -> dict[str, float | torch.Tensor]: ...
    def state(self) -> dict[str, int]: ...


@dataclass
class EvalOutcome:
    """What an evaluation asks of the loop: a checkpoint of this iteration (a new best), or to stop after it."""

    checkpoint: bool = False
    stop: bool = False


class Hooks(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def sample(self, iteration: int) -> None: ...
    def checkpoint(self, iteration: int) -> None: ...
    def stop_requested(self) -> bool: ...  # asked after every iteration: True = checkpoint here and return
    # def evaluate(self, iteration: int) -> EvalOutcome: asked only when Schedule.eval_every > 0


@dataclass
class Cycle:
    """One TTUR cycle's simulation (method.simulation = per-cycle): its first iteration, batch, schedule, points."""

    start: int
    batch: Batch
    levels: torch.Tensor
    points: list[Trajectory]


def all_ranks_agree(accelerator: Any, flag: torch.Tensor) -> bool:
    """True only if `flag` holds on every process (a lone rank skipping backward would hang DDP)."""
    flag = flag.to(accelerator.device, torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def optimizer_step(accelerator: Any, counters: Counters, loss: torch.Tensor, optimizer, modules: list,
                   lr: float | list[float], grad_clip: float,
                   clip: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None,
                   network: str = "student") -> float | None:  # fmt: skip
    """Backward, clip the trainable parameters of `modules`, step; a non-finite loss or gradient skips the step
    (counted in `counters`). The parameters are looked up after the backward: FSDP2 registers the unsharded
    tensors of a root module during forward and its sharded ones (which hold the gradients) after backward.

    `optimizer` is one optimizer or a list (one backward, one clip over all their modules, every one stepped);
    `lr` is every optimizer's learning rate, or one per optimizer. `clip(parameters, max_norm)` returns the norm
    over all ranks (accelerate's by default; the run layer passes a sharding-aware one). `network` ('student' or
    'fake') is whose non-finite streak a skipped step lengthens. Returns the clipped norm, None if skipped.
    """
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    rates = lr if isinstance(lr, list) else [lr] * len(optimizers)
    finite = all_ranks_agree(accelerator, torch.isfinite(loss.detach()))
    norm = None
    if finite:
        accelerator.backward(loss)
        params = [p for module in modules for p in trainable_parameters(module)]
        norm = (clip or accelerator.clip_grad_norm_)(params, grad_clip)  # unscales every optimizer's gradients
        finite = bool(torch.isfinite(norm))  # the clipped norm is already reduced over ranks
    if finite:
        for i, (opt, rate) in enumerate(zip(optimizers, rates)):
            for group in opt.param_groups:
                group["lr"] = rate
            # fp16: accelerate's step runs the loss scaler's step and update; a second optimizer after one update
            # would be unscaled twice, so the others step their own optimizer (gradients unscaled, checked finite)
            scaled = i > 0 and getattr(accelerator, "scaler", None) is not None
            (opt.optimizer if scaled else opt).step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    counters.count_update(network, finite)
    return float(norm) if finite else None


def warmup_lr(base: float, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` optimizer steps of this optimizer, then constant."""
    return base if warmup <= 0 else base * min(1.0, (step + 1) / warmup)


def scheduled_lr(base: float, step: int, optim: "OptimConfig", total: int) -> float:
    """The learning rate of optimizer step `step` of `total`: the linear warm-up, then constant, or (`lr_schedule`
    cosine) a half cosine from `base` down to `lr_floor * base` at step `total` (held there past it)."""
    if optim.lr_schedule == "constant" or step < optim.warmup_steps:
        return warmup_lr(base, step, optim.warmup_steps)
    t = min(1.0, (step - optim.warmup_steps) / max(total - optim.warmup_steps, 1))
    return base * (optim.lr_floor + (1 - optim.lr_floor) * 0.5 * (1 + math.cos(math.pi * t)))


class Distiller:
    """Owns the roles, both optimizers, the EMA and the counters; `iteration()` advances one iteration."""

    def __init__(
        self,
        accelerator: Any,
        roles: Roles,
        method: "MethodConfig",
        optim: "OptimConfig",
        student_opt: torch.optim.Optimizer,
        fake_opt: torch.optim.Optimizer,
        ema: StudentEMA | None,
        make_batch: Callable[[Draws], Batch],
        shift: Callable[[torch.Tensor, int], torch.Tensor],
        seed: int,
        clip: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None,
        iterations: int = 0,
    ):
        self.accelerator, self.roles, self.method, self.optim = accelerator, roles, method, optim
        self.iterations = iterations  # the run's length: where a decaying learning rate reaches its floor
        self.student_opt, self.fake_opt, self.ema = student_opt, fake_opt, ema
        self.make_batch, self.shift, self.seed = make_batch, shift, seed
        # clip(parameters, max_norm) -> the norm over all ranks; the run layer passes a sharding-aware one
        self.clip = clip or accelerator.clip_grad_norm_
        self.counters = Counters()
        self.cost = CostCounter()
        self.cycle: Cycle | None = None  # per-cycle simulation: the current TTUR cycle's

    def draws(self) -> Draws:
        acc = self.accelerator
        return Draws(self.seed, self.counters.iteration, acc.process_index, acc.device, acc.num_processes)

    def iteration(self) -> dict[str, float | torch.Tensor]:
        """One iteration; returns its scalars (losses, levels, norms, cost)."""
        c, draws = self.counters, self.draws()
        self.cost.reset()
        batch, levels, traj = self.simulated(draws)
        stats: dict[str, float | torch.Tensor] = {"level/n": float(len(levels))}
        if (c.iteration + 1) % self.method.ttur_ratio == 0:
            stats.update(self.student_update(batch, traj, draws))
        stats.update(self.fake_update(batch, traj, draws))
        c.iteration += 1
        stats.update(self.cost.as_record())
        return stats

    def simulated(self, draws: Draws) -> tuple[Batch, torch.Tensor, Trajectory]:
        """This iteration's prompts and noise, schedule and recorded point.

        per-iteration: a simulation of its own. per-cycle: one simulation per TTUR cycle (the student does not
        change within a cycle), recording one point per sample for each of the cycle's iterations; an
        iteration inside a cycle whose simulation is not held (just resumed) redoes it from the cycle's first
        iteration's draws, which gives the same points, without counting its cost again.
        """
        if self.method.simulation == "per-iteration":
            batch = self.make_batch(draws)
            levels = training_schedule(self.method, draws, self.shift)
            self.roles.train_mode(student=False, fake=False)  # simulation: eval mode, no gradients
            return batch, levels, self.simulate(batch, levels, draws)
        iteration, k = self.counters.iteration, self.method.ttur_ratio
        start = iteration - iteration % k
        if self.cycle is None or self.cycle.start != start:
            first = draws if start == iteration else Draws(self.seed, start, draws.rank, draws.device, draws.world)
            batch = self.make_batch(first)
            levels = training_schedule(self.method, first, self.shift)
            self.roles.train_mode(student=False, fake=False)
            cost = self.cost if start == iteration else CostCounter()  # a redone simulation is not new work
            points = run_simulation(self.roles, self.method, batch, levels, first, cost, points=k)
            self.cycle = Cycle(start, batch, levels, points)
        return self.cycle.batch, self.cycle.levels, self.cycle.points[iteration - start]

    def simulate(self, batch: Batch, levels: torch.Tensor, draws: Draws) -> Trajectory:
        """The iteration's backward simulation (a seam: the speed benchmark swaps in the reference's)."""
        return run_simulation(self.roles, self.method, batch, levels, draws, self.cost)[0]

    def student_loss(self, batch: Batch, traj, draws: Draws):
        """The student's weighted loss and its statistics (the same seam)."""
        return student_loss(self.roles, self.method, batch, traj, draws, self.cost)

    def student_update(self, batch: Batch, traj, draws: Draws) -> dict[str, float | torch.Tensor]:
        self.roles.train_mode(student=True, fake=False)
        loss, stats = self.student_loss(batch, traj, draws)
        total = self.iterations // self.method.ttur_ratio
        lr = scheduled_lr(self.optim.student_lr, self.counters.student_step, self.optim, total)
        norm = self.apply(loss, self.student_opt, self.roles.student_module, lr, "student")
        if norm is not None:
            self.counters.student_step += 1
            if self.ema is not None:
                self.ema.update(self.accelerator.unwrap_model(self.roles.student_module), self.counters.student_step)
            stats.update({"grad_norm/student": norm, "lr/student": lr})
        return stats

    def fake_update(self, batch: Batch, traj, draws: Draws) -> dict[str, float | torch.Tensor]:
        self.roles.train_mode(student=False, fake=True)
        loss, stats = fake_loss(self.roles, self.method, batch, traj, draws, self.cost)
        lr = scheduled_lr(self.optim.fake_lr, self.counters.fake_step, self.optim, self.iterations)
        norm = self.apply(loss, self.fake_opt, self.roles.fake_module, lr, "fake")
        if norm is not None:
            self.counters.fake_step += 1
            self.roles.merge_student_into_fake(self.method.merge_decay)
            stats.update({"grad_norm/fake": norm, "lr/fake": lr})
        return stats

    def apply(self, loss: torch.Tensor, optimizer, module, lr: float, network: str = "student") -> float | None:
        """Backward, clip, step; a non-finite loss or gradient skips the step (counted for `network`). Returns the
        norm."""
        return optimizer_step(self.accelerator, self.counters, loss, optimizer, [module], lr, self.optim.grad_clip,
                              self.clip, network)  # fmt: skip

    def all_ranks_agree(self, flag: torch.Tensor) -> bool:
        return all_ranks_agree(self.accelerator, flag)

    def state(self) -> dict[str, int]:
        return asdict(self.counters)

    def load_state(self, counters: dict[str, int]) -> None:
        # checkpoints from before the per-network streaks were kept: none running (a checkpoint is never written
        # inside a streak but at the end)
        self.counters = Counters(**{k: counters.get(k, 0) for k in asdict(Counters())})
        self.cycle = None  # recomputed from the cycle's first iteration


@dataclass
class Schedule:
    """When the loop calls the hooks (0 = only at the end)."""

    total: int
    log_every: int
    sample_every: int
    checkpoint_every: int
    max_nonfinite: int
    eval_every: int = 0  # 0: no evaluation during training


def due(iteration: int, every: int, total: int) -> bool:
    return iteration == total or (every > 0 and iteration % every == 0)


def checkpoint_allowed(counters: Counters, final: bool) -> bool:
    """Not in the middle of a non-finite streak: if the run then diverges, that checkpoint would be the
    `latest` a resume starts from, at the very point it went wrong (the one before it is the one to keep).
    The end of the run is the exception: nothing is left to defer to, and the skipped updates left the
    weights at the last finite one."""
    return counters.nonfinite_streak == 0 or final


def train(distiller: Iterating, schedule: Schedule, hooks: Hooks, batch_size: int) -> Counters:
    """Run iterations until `schedule.total`, or until the hooks ask to stop; the hooks log, sample and checkpoint.

    A stop is honoured only between iterations, after a checkpoint of that iteration: the run layer turns
    e.g. SIGTERM into `stop_requested()`, and the run resumes exactly where it stopped. No checkpoint is
    written while updates keep coming out non-finite (a due one waits for the first finite update); a
    stop in such a streak leaves the previous checkpoint as the one to resume from.
    """
    window: dict[str, list] = {}
    tick, done_in_window = time.perf_counter(), 0
    owed = False  # a periodic checkpoint that fell inside a non-finite streak, written once the streak ends
    while distiller.counters.iteration < schedule.total:
        stats = distiller.iteration()
        done_in_window += 1
        for key, value in stats.items():
            window.setdefault(key, []).append(value)
        c = distiller.counters
        if c.nonfinite_streak >= schedule.max_nonfinite:
            raise TrainingDiverged(
                f"the {c.diverging()}'s last {c.nonfinite_streak} updates were non-finite (skipped), at iteration "
                f"{c.iteration}: stopping without writing a checkpoint; lower its learning rate or use fp32/bf16 "
                "instead of fp16"
            )
        if due(c.iteration, schedule.log_every, schedule.total):
            elapsed = time.perf_counter() - tick
            hooks.log(window_record(window, distiller, done_in_window / max(elapsed, 1e-9), batch_size))
            window, tick, done_in_window = {}, time.perf_counter(), 0
        if due(c.iteration, schedule.sample_every, schedule.total):
            hooks.sample(c.iteration)
        outcome = EvalOutcome()
        if schedule.eval_every and due(c.iteration, schedule.eval_every, schedule.total):
            outcome = hooks.evaluate(c.iteration)  # a new best is checkpointed at once, so that it can be kept
        owed = owed or outcome.checkpoint or outcome.stop or due(c.iteration, schedule.checkpoint_every, schedule.total)
        checkpointed = owed and checkpoint_allowed(c, c.iteration == schedule.total)
        if checkpointed:
            hooks.checkpoint(c.iteration)
            owed = False
        if outcome.stop:
            break
        if hooks.stop_requested():
            if not checkpointed and checkpoint_allowed(c, final=False):
                hooks.checkpoint(c.iteration)
            break
    return distiller.counters


def window_record(window: dict[str, list], distiller: Iterating, its: float, batch_size: int) -> dict:
    """Means over the logging window, the counters, throughput, cumulative cost and memory.

    Throughput is of the whole run (the global batch over all processes), memory that of the largest process (a
    collective: every rank builds the record at the same iterations)."""
    record: dict[str, Any] = {**distiller.state()}
    record.update({k: float(sum(v) / len(v)) for k, v in window.items()})  # the window's one read-back
    processes = distiller.accelerator.num_processes
    record["processes"] = processes
    record["throughput/it_s"] = its
    record["throughput/samples_s"] = its * batch_size
    record["throughput/samples_s_per_process"] = its * batch_size / processes
    record.update(distiller.cost.totals_record())
    record.update(peak_memory(distiller.accelerator))
    return record


def peak_memory(accelerator: Any) -> dict[str, float]:
    """Peak GPU memory (when there is a GPU) and peak host RSS, GiB, of the process with the most."""
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    values = torch.tensor([[gpu, host]], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.gather(values)  # [processes, 2]
    gpu, host = values.max(0).values.tolist()
    out = {"memory/host_peak_gb": host}
    if torch.cuda.is_available():
        out["memory/gb"] = gpu
    return out
