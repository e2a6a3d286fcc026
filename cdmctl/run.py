"""Assemble a distillation run from a preset (Accelerator, backbone, networks, prompts, sample grid) and train it
until it ends or a signal stops it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cdmctl.backbones import load_backbone, resolve_source
from cdmctl.backbones.base import Backbone
from cdmctl.backbones.loading import parts_from_rank0, transformer_at, transformer_placement
from cdmctl.config.schema import Preset, sampling_of
from cdmctl.engine import checkpoint as ckpt
from cdmctl.engine.ema import StudentEMA
from cdmctl.engine.loop import Distiller, Schedule, train
from cdmctl.engine.rng import generator
from cdmctl.engine.roles import Roles
from cdmctl.engine.simulate import simulate
from cdmctl.engine.tbcm import TBCMDistiller
from cdmctl.engine.trigflow import LogVarHead, consistency_sample
from cdmctl.errors import UserError
from cdmctl.networks import adamw, build_networks, forward_context
from cdmctl.parallel import (FSDP2, build_accelerator, effective_strategy, grad_clipper, handover, place_teacher,
                             prepare_networks, prepare_trained, receive_weights, wrap_blocks)
from cdmctl.plugins import RUN_REPORTS, register_run_report  # noqa: F401 (plugins register reports; a cheap import)
from cdmctl.prompts import prompt_file_sha256
from cdmctl.quiet import quiet_libraries
from cdmctl.runcheckpoint import restore
from cdmctl.runfolder import run_folder
from cdmctl.runhooks import RunHooks, StopSignals
from cdmctl.runprompts import batch_maker, prompt_bank

if TYPE_CHECKING:
    from cdmctl.runfolder import Start


@dataclass
class RunResult:
    folder: Path
    checkpoint: Path | None
    metrics: Path
    samples: Path | None
    iterations: int
    main_process: bool = True


class RunInterrupted(Exception):
    """Training stopped early by a signal (Ctrl-C, or SIGTERM from SLURM/Kubernetes); the CLI says how to resume."""

    def __init__(self, signal_name: str, folder: Path, checkpoint: Path | None, iteration: int, main_process: bool):
        super().__init__(f"{signal_name} at iteration {iteration}")
        self.signal_name, self.folder, self.checkpoint = signal_name, folder, checkpoint
        self.iteration, self.main_process = iteration, main_process


class SilentDashboard:
    """What ranks other than the main one get: the main process alone draws and prints."""

    def __enter__(self) -> "SilentDashboard":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, record: dict[str, Any]) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class SampleGrid:
    """The student (EMA when kept) at the inference schedule on fixed prompts and seeds -> PNG grid."""

    def __init__(self, backbone: Backbone, preset: Preset, latent: tuple[int, ...], device: torch.device):
        self.backbone, self.preset = backbone, preset
        prompts = preset.data.sample_prompts
        self.cond = backbone.encode_prompts(prompts).to(device)
        gens = [generator(preset.data.sample_seed, i) for i in range(len(prompts))]
        self.noise = torch.stack([torch.randn(latent, generator=g) for g in gens]).to(device)
        self.sampler, rule, time_shift = sampling_of(preset.model_dump(mode="json"))
        levels = torch.tensor(preset.inference.schedule(rule), dtype=torch.float32)
        if time_shift:
            levels = backbone.shift(levels, preset.model.resolution, preset.model.resolution)
        self.levels = levels.to(device)
        # the consistency sampler's fresh noise at each step, fixed like the starting noise
        steps = len(self.levels) - 1
        self.renoise = torch.stack([torch.randn((steps, *latent), generator=generator(preset.data.sample_seed, i, "renoise"))
                                    for i in range(len(prompts))], dim=1).to(device)  # fmt: skip

    @torch.no_grad()
    def images(self, module: nn.Module, autocast) -> torch.Tensor:
        """[P, 3, H, W] in [0, 1]: the family's sampler (Euler, or sCM's consistency sampler) with guidance 1 on the
        inference schedule (through the time shift unless inference.time_shift is false)."""
        was_training = module.training
        module.eval()

        def velocity(x, s, rows):
            with autocast():
                return self.backbone.velocity(module, x, s, self.cond.index(rows)).float()

        if self.sampler == "consistency":
            final = consistency_sample(velocity, self.noise, self.levels, self.renoise)
        else:
            last = torch.full((len(self.noise),), len(self.levels) - 1, device=self.noise.device)
            final = simulate(velocity, self.noise, self.levels, last, keep_final=True).final
        module.train(was_training)
        return self.backbone.decode(final)


class DistillRun:
    """Everything one distillation needs, assembled from a preset; `start()` trains to the end."""

    def __init__(self, preset: Preset, folder: Path):
        from cdmctl.runlog import RunLog

        from cdmctl.trackers import resolve_trackers
        from cdmctl.trainingeval import selection_of

        self.preset, self.folder = preset, folder
        self.strategy = effective_strategy(preset.parallel.strategy)
        trackers, self.notes = resolve_trackers(preset.run.trackers, preset.run.optional_trackers)
        self.accelerator = acc = build_accelerator(preset, folder, self.strategy, trackers)
        self.source = resolve_source(preset.model.pretrained)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        self.backbone = backbone = self.load_backbone(compute)
        wrap_blocks(acc, backbone.block_classes())
        res = preset.model.resolution
        self.latent = backbone.latent_shape(res, res)
        bank, note = prompt_bank(preset, self.source, backbone, compute, acc)
        self.notes += [note] if note else []
        self.prompts_sha256 = prompt_file_sha256(preset.data.prompts)  # of the file as this run read it
        self.grid = SampleGrid(backbone, preset, self.latent, acc.device)
        self.evaluator = self.training_evaluator()  # encodes its prompts: before the text encoders go
        self.selection = selection_of(preset)
        if preset.data.cache_embeddings:
            backbone.release_text_encoders()  # every prompt is on disk now
        make_batch = batch_maker(bank, self.per_process_batch(), self.latent, acc.device)

        def shift(s: torch.Tensor, steps: int | None = None) -> torch.Tensor:  # steps: the schedule's length
            return backbone.shift(s, res, res, steps).to(s.device)

        # the method family decides the networks and the iteration; the loop, hooks and checkpoints are shared
        build = {"cdm": self.cdm_distiller, "tbcm": self.tbcm_distiller}[preset.method.family]
        self.distiller = build(compute, make_batch, shift)
        self.log = RunLog(folder)

    def training_evaluator(self):
        if not self.preset.eval.enabled:
            return None
        from cdmctl.trainingeval import TrainingEvaluator

        acc = self.accelerator
        return TrainingEvaluator(self.backbone, self.preset, self.source, acc.process_index, acc.num_processes)

    def evaluate(self, iteration: int):
        """The evaluator on the student (EMA when kept), every rank taking part."""
        module = self.accelerator.unwrap_model(self.roles.student_module)
        main = self.accelerator.is_main_process
        if self.ema is None:
            return self.evaluator.evaluate(module, iteration, self.folder, main)
        with self.ema.swapped_into(module):
            return self.evaluator.evaluate(module, iteration, self.folder, main)

    def log_picture(self, tag: str, path: Path, iteration: int) -> None:
        """A PNG the run wrote, to the trackers (main process)."""
        if self.accelerator.is_main_process and self.accelerator.trackers:
            from PIL import Image

            from cdmctl.trackers import log_image

            with Image.open(path) as image:
                log_image(self.accelerator, tag, image, iteration)

    def start_trackers(self) -> None:
        from cdmctl.trackers import start_trackers

        self.notes += start_trackers(self.accelerator, self.preset.name, self.preset.model_dump(mode="json"),
                                     self.folder, self.distiller.counters.iteration)  # fmt: skip

    def cdm_distiller(self, compute: torch.dtype, make_batch, shift) -> Distiller:
        preset = self.preset
        student_opt, fake_opt = self.build_roles(compute)
        return Distiller(self.accelerator, self.roles, preset.method, preset.optim, student_opt, fake_opt, self.ema,
                         make_batch=make_batch, shift=shift, seed=preset.train.seed,
                         clip=grad_clipper(self.accelerator), iterations=preset.train.iterations)  # fmt: skip

    def tbcm_distiller(self, compute: torch.dtype, make_batch, shift) -> TBCMDistiller:
        """Student and teacher (no fake teacher) and the log-variance head, each trained module with its own
        optimizer (accelerate's FSDP2 shards one model per optimizer): the checkpoint holds student, then head."""
        preset, acc = self.preset, self.accelerator
        from accelerate.utils import set_seed

        set_seed(preset.train.seed)
        student, teacher, _ = build_networks(self.backbone, preset, compute, fake=False)
        weights = handover(acc, preset.parallel.load, [student, teacher])
        # the head's fixed Fourier features come from their own stream, not the global generator
        head = LogVarHead(generator=generator(preset.train.seed, "logvar-head"))
        student_opt = adamw(student, preset.optim.student_lr, preset)
        head_opt = adamw(head, preset.method.tbcm.logvar_lr or preset.optim.student_lr, preset, weight_decay=0.0)
        pairs = [(student, student_opt), (head, head_opt)]
        (student, student_opt), (head, head_opt) = prepare_trained(acc, pairs, weights)
        teacher = place_teacher(acc, preset.parallel.teacher, teacher, preset.model.teacher_device, weights)
        self.forward_context = forward_context(acc.autocast, preset.model.attention_backend)
        self.roles = Roles(self.backbone, student, teacher, None, autocast=self.forward_context,
                           unwrap=acc.unwrap_model)  # fmt: skip
        self.ema = self.student_ema(student)
        return TBCMDistiller(acc, self.roles, head, preset.method, preset.optim, [student_opt, head_opt], self.ema,
                             make_batch=make_batch, shift=shift, seed=preset.train.seed,
                             clip=grad_clipper(acc), iterations=preset.train.iterations)  # fmt: skip

    def load_backbone(self, compute: torch.dtype) -> Backbone:
        """Every part in the compute dtype on the training device; trained copies get float32 masters later."""
        model = self.preset.model
        extra = {"max_sequence_length": model.text_length} if model.text_length else {}
        acc = self.accelerator
        # rank0: the other ranks build the transformer empty and get its weights in `handover` (sharded, rank 0
        # holds it in host memory and sends it from there), and the text encoders and VAE as they load
        once, main = self.preset.parallel.load == "rank0" and acc.num_processes > 1, acc.is_main_process
        others = parts_from_rank0(lambda parts: receive_weights(acc, parts), empty=not main) if once else None
        with transformer_at(transformer_placement(once, main, acc.is_fsdp2)), others or contextlib.nullcontext():
            return load_backbone(model.backbone, self.source, revision=model.revision, dtype=compute,
                                 device=acc.device, **extra)  # fmt: skip

    def build_roles(self, compute: torch.dtype) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Networks, their optimizers (through accelerate), the roles over them and the student EMA."""
        preset, acc = self.preset, self.accelerator
        from accelerate.utils import set_seed

        # adapter initialisation (LoRA A) is random; Python's and numpy's generators are seeded too, so that the
        # RNG states a checkpoint stores (and any library drawing from them) are reproducible as well
        set_seed(preset.train.seed)
        student, teacher, fake = build_networks(self.backbone, preset, compute)
        weights = handover(acc, preset.parallel.load, [student, teacher, fake])  # before the optimizers
        student_opt, fake_opt = adamw(student, preset.optim.student_lr, preset), adamw(fake, preset.optim.fake_lr, preset)
        student, teacher, fake, student_opt, fake_opt = prepare_networks(
            acc, preset.parallel.teacher, student, teacher, fake, student_opt, fake_opt, preset.model.teacher_device,
            weights)
        self.forward_context = forward_context(acc.autocast, preset.model.attention_backend)
        self.roles = Roles(self.backbone, student, teacher, fake, autocast=self.forward_context, unwrap=acc.unwrap_model)
        self.ema = self.student_ema(student)
        return student_opt, fake_opt

    def student_ema(self, student: nn.Module) -> StudentEMA | None:
        optim = self.preset.optim
        ema_device = "cpu" if optim.ema_device == "cpu" else None
        if not optim.ema:
            return None
        return StudentEMA(self.accelerator.unwrap_model(student), optim.ema_max_decay, device=ema_device)

    def per_process_batch(self) -> int:
        total, n = self.preset.train.batch_size, self.accelerator.num_processes
        if total % n:
            raise UserError(f"train.batch_size {total} is not divisible by {n} processes", "pick a multiple")
        return total // n

    def grid_images(self) -> torch.Tensor:
        module = self.accelerator.unwrap_model(self.roles.student_module)
        if self.ema is None:
            return self.grid.images(module, self.forward_context)
        with self.ema.swapped_into(module):
            return self.grid.images(module, self.forward_context)

    def start(self, dashboard, stop: StopSignals | None = None) -> RunHooks:
        p = self.preset
        hooks = RunHooks(self, dashboard, stop)
        if self.distiller.counters.iteration == 0:
            hooks.sample(0)  # the "before" picture: the student still equals the teacher
        schedule = Schedule(p.train.iterations, p.run.log_every, p.run.sample_every, p.run.checkpoint_every,
                            p.train.max_nonfinite, p.eval.every if p.eval.enabled else 0)
        train(self.distiller, schedule, hooks, p.train.batch_size)
        return hooks


def write_run_reports(run: "DistillRun", dashboard) -> None:
    from cdmctl.plugins import load_plugins

    load_plugins()
    for report in RUN_REPORTS:
        line = report(run)
        if line:
            dashboard.note(line)


def distill(preset: Preset, out: str | None = None, resume: bool = False, live: bool | None = None,
            checkpoint: str = "latest") -> RunResult:
    """Train a student as the preset says; returns where its checkpoint, log and last grid are.

    `resume` continues from `checkpoint` ('latest' = the newest intact one) of the run folder. One process
    writes a run folder at a time (a lock). Raises RunInterrupted on Ctrl-C (at once) or SIGTERM (after
    checkpointing the current iteration).
    """
    from cdmctl.runfolder import opened_run

    with opened_run(preset, run_folder(preset, out), resume, checkpoint) as start:
        return train_opened(preset, start, live)


def train_opened(preset: Preset, start: "Start", live: bool | None) -> RunResult:
    """Train in a run folder `runfolder.opened_run` checked, locked and claimed."""
    quiet_libraries()
    return train_until_done_or_stopped(preset, start.folder, start.checkpoint, start.notes, live)


def train_until_done_or_stopped(preset: Preset, folder: Path, start_from: Path | None, notes: list[str],
                                live: bool | None) -> RunResult:  # fmt: skip
    from cdmctl.outputs import reporting_disk_full

    stop, run = StopSignals(), None
    try:
        with stop.installed(), reporting_disk_full(folder):  # the log and sample grids fill a disk too
            run = DistillRun(preset, folder)
            if start_from is not None:
                restore(run, start_from)
            run.start_trackers()
            hooks = train_with_dashboard(run, preset, live, stop, notes)
    except KeyboardInterrupt:
        raise interrupted("SIGINT", run, folder) from None
    finally:
        if run is not None:
            from cdmctl.trackers import finish_trackers

            finish_trackers(run.accelerator)
    stopped = run.distiller.counters.iteration < preset.train.iterations and not hooks.stopped_by_decline
    if stopped:  # stopped early: a signal (or eval.stop_after_decline, which ends the run normally)
        raise interrupted(stop.received or "signal", run, folder)
    main = run.accelerator.is_main_process
    end_processes(run.accelerator)
    # a resume with nothing left to do wrote no checkpoint: the one it started from is the run's last
    return RunResult(folder, hooks.last_checkpoint or start_from, folder / "metrics.jsonl", hooks.last_grid,
                     run.distiller.counters.iteration, main)


def end_processes(acc) -> None:
    """All ranks finished: tear the process group down before the interpreter does (gloo's threads, left to
    exit-time destructors, abort a rank now and then with 'terminate called without an active exception')."""
    if acc.num_processes > 1:
        acc.wait_for_everyone()
        acc.end_training()


def train_with_dashboard(run: DistillRun, preset: Preset, live: bool | None, stop: StopSignals,
                         notes: list[str]) -> RunHooks:  # fmt: skip
    from cdmctl.dashboard import Dashboard

    main = run.accelerator.is_main_process
    title = f"cdmctl distill {preset.name}"
    with Dashboard(preset.train.iterations, title, live=live) if main else SilentDashboard() as dashboard:
        for line in [*notes, *run.notes]:
            dashboard.note(line)
        hooks = run.start(dashboard, stop)
        if main and stop.received is None and run.strategy == FSDP2:
            # a report samples the student on the main process alone: a sharded one would wait for the other ranks
            dashboard.note("end-of-run reports (the demo's before/after) are skipped under FSDP2: export the run "
                           "and evaluate it on one process")
        elif main and stop.received is None:
            write_run_reports(run, dashboard)
    return hooks


def interrupted(signal_name: str, run: DistillRun | None, folder: Path) -> RunInterrupted:
    """Where the run stands: the newest complete checkpoint on disk (this session's or an earlier one's)."""
    existing = ckpt.list_checkpoints(folder)
    iteration = run.distiller.counters.iteration if run is not None else 0
    main = run.accelerator.is_main_process if run is not None else True
    return RunInterrupted(signal_name, folder, existing[-1] if existing else None, iteration, main)
