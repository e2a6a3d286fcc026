"""What the training loop asks of a run between iterations: log lines, sample grids, evaluations, checkpoints, and
whether a stop signal came."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdmctl.runcheckpoint import save_checkpoint

if TYPE_CHECKING:
    from cdmctl.engine.loop import EvalOutcome
    from cdmctl.run import DistillRun


class StopSignals:
    """SIGTERM sets a flag instead of killing the process: the loop checkpoints at the end of the iteration.

    Ctrl-C (SIGINT) keeps Python's KeyboardInterrupt: it stops at once, mid-iteration, where the state is
    not consistent enough to checkpoint, so the last periodic checkpoint is what a resume starts from.
    """

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    @contextmanager
    def installed(self):
        try:
            previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a worker thread): signals are not ours
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


class RunHooks:
    """What the loop asks for: log lines (JSONL, trackers, dashboard), sample grids, evaluations, checkpoints."""

    def __init__(self, run: "DistillRun", dashboard, stop: StopSignals | None = None):
        self.run, self.dashboard, self.stop = run, dashboard, stop
        self.last_checkpoint: Path | None = None
        self.last_grid: Path | None = None
        self.pending_best: int | None = None  # the iteration of a new best, recorded once its checkpoint exists
        self.stopped_by_decline = False

    def log(self, record: dict[str, Any]) -> None:
        from cdmctl.trackers import log_scalars

        if self.run.accelerator.is_main_process:
            self.run.log.log(record)
            log_scalars(self.run.accelerator, record)
        self.dashboard.update(record)

    def sample(self, iteration: int) -> None:
        from cdmctl.runlog import save_grid

        images = self.run.grid_images()
        if self.run.accelerator.is_main_process:
            path = self.run.folder / "samples" / f"step-{iteration:07d}.png"
            self.last_grid = save_grid(images, path)
            self.dashboard.note(f"samples written to {path}")
            self.run.log_picture("samples", path, iteration)

    def evaluate(self, iteration: int) -> "EvalOutcome":
        """Score the student (EMA when kept); a new best of the selected score is checkpointed and kept."""
        from cdmctl.engine.loop import EvalOutcome

        run, acc = self.run, self.run.accelerator
        result = run.evaluate(iteration)
        self.log(result.record)
        for steps, path in result.grids.items():
            run.log_picture(f"eval/{steps}-steps", path, iteration)
        selection = run.selection
        if selection is None:
            return EvalOutcome()
        improved, warning = selection.update(float(result.record[selection.key]), iteration)
        if warning:
            self.dashboard.note(f"WARNING: {warning}")
        if improved:
            self.pending_best = iteration
            self.dashboard.note(f"new best {selection.key[len('eval/'):]} {selection.best:.4g}")
        limit = run.preset.eval.stop_after_decline
        self.stopped_by_decline = bool(limit and selection.since_best >= limit)
        if self.stopped_by_decline and acc.is_main_process:
            self.dashboard.note(f"stopping: {limit} evaluations without a new best (best at iteration "
                                f"{selection.best_iteration}; export it with --checkpoint best)")  # fmt: skip
        return EvalOutcome(checkpoint=improved, stop=self.stopped_by_decline)

    def checkpoint(self, iteration: int) -> None:
        from cdmctl.trainingeval import write_best

        self.last_checkpoint = save_checkpoint(self.run, iteration)
        self.dashboard.note(f"checkpoint {self.last_checkpoint.name} written")
        if self.pending_best == iteration and self.run.accelerator.is_main_process:
            write_best(self.run.folder, self.run.selection, self.last_checkpoint)
            self.pending_best = None

    def stop_requested(self) -> bool:
        """A signal reached any process: all stop after the same iteration (a lone rank would hang the rest)."""
        flag = self.stop is not None and self.stop.received is not None
        acc = self.run.accelerator
        if acc.num_processes == 1:
            return flag
        total = acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum")
        return bool(total.item() > 0)
