"""Assemble a distillation run from a preset: folder, Accelerator, backbone, roles, prompts, hooks -> engine."""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cdmctl.backbones import load_backbone, resolve_source
from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.config.schema import SAMPLERS, Preset
from cdmctl.engine import checkpoint as ckpt
from cdmctl.engine.ema import StudentEMA
from cdmctl.engine.loop import Distiller, Schedule, train
from cdmctl.engine.rng import generator
from cdmctl.engine.roles import Roles
from cdmctl.engine.simulate import simulate
from cdmctl.engine.step import Batch, Draws
from cdmctl.engine.tbcm import TBCMDistiller
from cdmctl.engine.trigflow import LogVarHead, consistency_sample
from cdmctl.errors import UserError
from cdmctl.networks import adamw, build_networks, forward_context, lora_key
from cdmctl.prompts import load_prompts, prompt_file_sha256
from cdmctl.quiet import quiet_libraries
from cdmctl.runfolder import trim_metrics

RESUMABLE_CHANGES = {"train.iterations", "run"}  # fields a resumed run may change


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


def run_folder(preset: Preset, out: str | None) -> Path:
    return Path(out or preset.run.output_dir.format(preset=preset.name))


def mixed_precision(precision: str) -> str:
    """bf16/fp16 autocast where the device supports it; float32 elsewhere (e.g. the CPU demo)."""
    if precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return precision


def build_accelerator(preset: Preset, folder: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # several processes without CUDA (torchrun on CPU): accelerate needs cpu=True to form a gloo group
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=multi_cpu,
        mixed_precision=mixed_precision(preset.model.precision),
        project_config=ProjectConfiguration(project_dir=str(folder)),
    )


class PromptBank:
    """Training prompts and the empty prompt, encoded once (cached) or per batch."""

    def __init__(self, backbone: Backbone, prompts: list[str], cache: bool):
        self.backbone, self.prompts, self.cache = backbone, prompts, cache
        self.null = backbone.encode_prompts([""]).to("cpu")
        self.encoded = backbone.encode_prompts(prompts).to("cpu") if cache else None

    def conditioning(self, indices: torch.Tensor) -> Conditioning:
        if self.encoded is not None:
            return self.encoded.index(indices.cpu())
        return self.backbone.encode_prompts([self.prompts[i] for i in indices.tolist()]).to("cpu")


def batch_maker(bank: PromptBank, per_process: int, latent: tuple[int, ...], device: torch.device):
    """Per iteration and rank: random prompts and simulation noise from the iteration's own streams."""

    def make(draws: Draws) -> Batch:
        gen = draws.local("prompts")
        idx = torch.randint(len(bank.prompts), (per_process,), generator=gen, device=gen.device)
        cond = bank.conditioning(idx).to(device)
        noise = torch.randn((per_process, *latent), generator=draws.local("sim-noise"), device=device)
        return Batch(cond=cond, null=bank.null.to(device).expand(per_process), noise=noise)

    return make


class SampleGrid:
    """The student (EMA when kept) at the inference schedule on fixed prompts and seeds -> PNG grid."""

    def __init__(self, backbone: Backbone, preset: Preset, latent: tuple[int, ...], device: torch.device):
        self.backbone, self.preset = backbone, preset
        prompts = preset.data.sample_prompts
        self.cond = backbone.encode_prompts(prompts).to(device)
        gens = [generator(preset.data.sample_seed, i) for i in range(len(prompts))]
        self.noise = torch.stack([torch.randn(latent, generator=g) for g in gens]).to(device)
        levels = torch.tensor(preset.inference.schedule(), dtype=torch.float32)
        self.levels = backbone.shift(levels, preset.model.resolution, preset.model.resolution).to(device)
        self.sampler = SAMPLERS[preset.method.family]
        # the consistency sampler's fresh noise at each step, fixed like the starting noise
        steps = len(self.levels) - 1
        self.renoise = torch.stack([torch.randn((steps, *latent), generator=generator(preset.data.sample_seed, i, "renoise"))
                                    for i in range(len(prompts))], dim=1).to(device)  # fmt: skip

    @torch.no_grad()
    def images(self, module: nn.Module, autocast) -> torch.Tensor:
        """[P, 3, H, W] in [0, 1]: the family's sampler (Euler, or sCM's consistency sampler) with guidance 1 on the
        shifted inference schedule."""
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


def preset_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved presets."""
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += preset_differences(a, b, f"{dotted}.")
        elif a != b:
            diffs.append(dotted)
    return diffs


def check_resumable(checkpoint: Path, preset: Preset) -> None:
    from cdmctl.runfolder import stored_preset

    stored = stored_preset(checkpoint)  # what the weights were trained with, not the editable preset.yaml
    current = preset.model_dump(mode="json")
    changed = [
        d for d in preset_differences(stored, current) if not any(d.startswith(p) for p in RESUMABLE_CHANGES)
    ]
    if changed:
        raise UserError(
            f"cannot resume {checkpoint.parent.parent}: the preset differs in {', '.join(changed)}",
            "resume with the run's own preset (only train.iterations and run.* may change), or start a new run",
        )


def check_prompts_unchanged(checkpoint: Path, preset: Preset) -> None:
    """The same path is not the same prompts: refuse a resume over a prompt file edited since the checkpoint.
    Checkpoints from before the hash was recorded (and builtin lists) resume unchecked."""
    stored = ckpt.read_manifest(checkpoint).get("prompts_sha256")
    if stored is None:
        return
    if prompt_file_sha256(preset.data.prompts) != stored:
        raise UserError(
            f"cannot resume {checkpoint.parent.parent}: the prompt file {preset.data.prompts} changed since "
            f"checkpoint {checkpoint.name} (sha256 {stored[:12]}...)",
            "restore the file as it was, or start a new run with --out NEW_DIR",
        )


class RunHooks:
    """What the loop asks for: log lines (JSONL + dashboard), sample grids, checkpoints."""

    def __init__(self, run: "DistillRun", dashboard, stop: StopSignals | None = None):
        self.run, self.dashboard, self.stop = run, dashboard, stop
        self.last_checkpoint: Path | None = None
        self.last_grid: Path | None = None

    def log(self, record: dict[str, Any]) -> None:
        if self.run.accelerator.is_main_process:
            self.run.log.log(record)
        self.dashboard.update(record)

    def sample(self, iteration: int) -> None:
        from cdmctl.runlog import save_grid

        images = self.run.grid_images()
        if self.run.accelerator.is_main_process:
            path = self.run.folder / "samples" / f"step-{iteration:07d}.png"
            self.last_grid = save_grid(images, path)
            self.dashboard.note(f"samples written to {path}")

    def checkpoint(self, iteration: int) -> None:
        self.last_checkpoint = self.run.save_checkpoint(iteration)
        self.dashboard.note(f"checkpoint {self.last_checkpoint.name} written")

    def stop_requested(self) -> bool:
        """A signal reached any process: all stop after the same iteration (a lone rank would hang the rest)."""
        flag = self.stop is not None and self.stop.received is not None
        acc = self.run.accelerator
        if acc.num_processes == 1:
            return flag
        total = acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum")
        return bool(total.item() > 0)


class DistillRun:
    """Everything one distillation needs, assembled from a preset; `start()` trains to the end."""

    def __init__(self, preset: Preset, folder: Path):
        from cdmctl.runlog import RunLog

        self.preset, self.folder = preset, folder
        self.accelerator = acc = build_accelerator(preset, folder)
        self.source = resolve_source(preset.model.pretrained)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        self.backbone = backbone = self.load_backbone(compute)
        res = preset.model.resolution
        self.latent = backbone.latent_shape(res, res)
        bank = PromptBank(backbone, load_prompts(preset.data.prompts), preset.data.cache_embeddings)
        self.prompts_sha256 = prompt_file_sha256(preset.data.prompts)  # of the file as this run read it
        self.grid = SampleGrid(backbone, preset, self.latent, acc.device)
        if preset.data.cache_embeddings:
            backbone.release_text_encoders()
        make_batch = batch_maker(bank, self.per_process_batch(), self.latent, acc.device)
        shift = lambda s: backbone.shift(s, res, res).to(s.device)  # noqa: E731
        # the method family decides the networks and the iteration; the loop, hooks and checkpoints are shared
        build = {"cdm": self.cdm_distiller, "tbcm": self.tbcm_distiller}[preset.method.family]
        self.distiller = build(compute, make_batch, shift)
        self.log = RunLog(folder)

    def cdm_distiller(self, compute: torch.dtype, make_batch, shift) -> Distiller:
        preset = self.preset
        student_opt, fake_opt = self.build_roles(compute)
        return Distiller(self.accelerator, self.roles, preset.method, preset.optim, student_opt, fake_opt, self.ema,
                         make_batch=make_batch, shift=shift, seed=preset.train.seed)  # fmt: skip

    def tbcm_distiller(self, compute: torch.dtype, make_batch, shift) -> TBCMDistiller:
        """Student and teacher (no fake teacher), the log-variance head as a second module of the student's optimizer."""
        preset, acc = self.preset, self.accelerator
        from accelerate.utils import set_seed

        set_seed(preset.train.seed)
        student, teacher, _ = build_networks(self.backbone, preset, compute, fake=False)
        # the head's fixed Fourier features come from their own stream, not the global generator
        head = LogVarHead(generator=generator(preset.train.seed, "logvar-head"))
        optimizer = adamw(student, preset.optim.student_lr, preset, extra=head, extra_lr=preset.method.tbcm.logvar_lr)
        student, head, optimizer = acc.prepare(student, head, optimizer)
        teacher.to(acc.device)
        self.forward_context = forward_context(acc.autocast, preset.model.attention_backend)
        self.roles = Roles(self.backbone, student, teacher, None, autocast=self.forward_context, unwrap=acc.unwrap_model)
        self.ema = self.student_ema(student)
        return TBCMDistiller(acc, self.roles, head, preset.method, preset.optim, optimizer, self.ema,
                             make_batch=make_batch, shift=shift, seed=preset.train.seed)  # fmt: skip

    def load_backbone(self, compute: torch.dtype) -> Backbone:
        """Every part in the compute dtype on the training device; trained copies get float32 masters later."""
        model = self.preset.model
        extra = {"max_sequence_length": model.text_length} if model.text_length else {}
        return load_backbone(model.backbone, self.source, revision=model.revision, dtype=compute,
                             device=self.accelerator.device, **extra)  # fmt: skip

    def build_roles(self, compute: torch.dtype) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Networks, their optimizers (through accelerate), the roles over them and the student EMA."""
        preset, acc = self.preset, self.accelerator
        from accelerate.utils import set_seed

        # adapter initialisation (LoRA A) is random; Python's and numpy's generators are seeded too, so that the
        # RNG states a checkpoint stores (and any library drawing from them) are reproducible as well
        set_seed(preset.train.seed)
        student, teacher, fake = build_networks(self.backbone, preset, compute)
        student_opt, fake_opt = adamw(student, preset.optim.student_lr, preset), adamw(fake, preset.optim.fake_lr, preset)
        student, fake, student_opt, fake_opt = acc.prepare(student, fake, student_opt, fake_opt)
        teacher.to(acc.device)
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

    def manifest(self) -> dict[str, Any]:
        p = self.preset
        return {
            **self.distiller.state(),
            "cost_totals": self.distiller.cost.state_dict(),
            "backbone": p.model.backbone,
            "base_model": self.source,
            "revision": p.model.revision,
            "train": p.model.train,
            "lora": p.model.lora.model_dump() if p.model.train == "lora" else None,
            "preset": p.model_dump(mode="json"),
            "prompts_sha256": self.prompts_sha256,
        }

    def save_checkpoint(self, iteration: int) -> Path:
        """Every process saves its accelerate state into one staging folder; the main one finalizes it."""
        from cdmctl.outputs import reporting_disk_full

        acc = self.accelerator
        staging = ckpt.staging_dir(self.folder, iteration)
        discard = (lambda: shutil.rmtree(staging, ignore_errors=True)) if acc.is_main_process else None
        with reporting_disk_full(staging, cleanup=discard):
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(staging / "state"))
            tensors = self.student_tensors()
            final = staging.parent / ckpt.checkpoint_name(iteration)
            if acc.is_main_process:
                final = ckpt.finalize_checkpoint(staging, iteration, self.manifest(), tensors,
                                                 keep=self.preset.run.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def student_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """What export needs: the full student (or only its adapter, for LoRA) and its EMA, same keys."""
        acc = self.accelerator
        student = acc.unwrap_model(self.roles.student_module)
        if self.preset.model.train == "lora":
            from peft import get_peft_model_state_dict

            tensors = {"student": get_peft_model_state_dict(student)}
            if self.ema is not None:
                tensors["ema"] = {lora_key(k): v for k, v in self.ema.state_dict().items()}
            return tensors
        tensors = {"student": acc.get_state_dict(self.roles.student_module)}  # gathered under FSDP
        if self.ema is not None:
            tensors["ema"] = self.ema.merged_state_dict(student)  # full state dict, loadable strictly
        return tensors

    def restore(self, checkpoint: Path) -> None:
        """Weights, optimizer states, EMA and counters exactly as they were saved. `checkpoint` comes from
        `prepare_folder`, which already checked every one of its files against the manifest."""
        self.accelerator.load_state(str(checkpoint / "state"))
        if self.ema is not None:
            stored = ckpt.load_weights(checkpoint, "ema", verify=False)  # verified with the rest
            if self.preset.model.train == "lora":
                stored = {k: stored[lora_key(k)] for k in self.ema.shadow}
            self.ema.load_state_dict(stored)
        manifest = ckpt.read_manifest(checkpoint)
        self.distiller.load_state(manifest)
        self.distiller.cost.load_state_dict(manifest["cost_totals"])
        trim_metrics(self.folder, self.distiller.counters.iteration)

    def start(self, dashboard, stop: StopSignals | None = None) -> RunHooks:
        p = self.preset
        hooks = RunHooks(self, dashboard, stop)
        if self.distiller.counters.iteration == 0:
            hooks.sample(0)  # the "before" picture: the student still equals the teacher
        schedule = Schedule(p.train.iterations, p.run.log_every, p.run.sample_every, p.run.checkpoint_every,
                            p.train.max_nonfinite)
        train(self.distiller, schedule, hooks, p.train.batch_size)
        return hooks


# Reports written at the end of a run by the main process: report(run) -> a line to show, or None when the
# report does not apply to this run. Plugins register them (the proving ground: the demo's before/after).
RUN_REPORTS: list[Callable[["DistillRun"], str | None]] = []


def register_run_report(report: Callable[["DistillRun"], str | None]) -> None:
    RUN_REPORTS.append(report)


def write_run_reports(run: "DistillRun", dashboard) -> None:
    from cdmctl.plugins import load_plugins

    load_plugins()
    for report in RUN_REPORTS:
        line = report(run)
        if line:
            dashboard.note(line)


def prepare_folder(preset: Preset, folder: Path, resume: bool, checkpoint: str = "latest") -> tuple[Path | None, list[str]]:
    """Check the run folder; return the checkpoint to resume from (None: a fresh run) and notes for the user."""
    from cdmctl.runfolder import start_point
    from cdmctl.runlog import write_preset

    start, notes = start_point(folder, resume, checkpoint)
    if start is not None:
        check_resumable(start, preset)
        check_prompts_unchanged(start, preset)
    folder.mkdir(parents=True, exist_ok=True)
    write_preset(folder, preset.model_dump(mode="json"))
    return start, notes


def distill(preset: Preset, out: str | None = None, resume: bool = False, live: bool | None = None,
            checkpoint: str = "latest") -> RunResult:
    """Train a student as the preset says; returns where its checkpoint, log and last grid are.

    `resume` continues from `checkpoint` ('latest' = the newest intact one) of the run folder. One process
    writes a run folder at a time (a lock). Raises RunInterrupted on Ctrl-C (at once) or SIGTERM (after
    checkpointing the current iteration).
    """
    from cdmctl.outputs import check_not_file
    from cdmctl.runfolder import RunLock, is_main_launch_process

    folder = run_folder(preset, out)
    check_not_file(folder)  # the lock's mkdir would fail on it with a traceback
    lock = RunLock(folder).acquire() if is_main_launch_process() else None  # one writer per run folder
    try:
        # the folder's refusals come before the libraries load (seconds)
        start_from, notes = prepare_folder(preset, folder, resume, checkpoint)
        quiet_libraries()
        return train_until_done_or_stopped(preset, folder, start_from, notes, live)
    finally:
        if lock is not None:
            lock.release()


def train_until_done_or_stopped(preset: Preset, folder: Path, start_from: Path | None, notes: list[str],
                                live: bool | None) -> RunResult:  # fmt: skip
    from cdmctl.outputs import reporting_disk_full

    stop, run = StopSignals(), None
    try:
        with stop.installed(), reporting_disk_full(folder):  # the log and sample grids fill a disk too
            run = DistillRun(preset, folder)
            if start_from is not None:
                run.restore(start_from)
            hooks = train_with_dashboard(run, preset, live, stop, notes)
    except KeyboardInterrupt:
        raise interrupted("SIGINT", run, folder) from None
    if run.distiller.counters.iteration < preset.train.iterations:  # stopped early: only a signal does that
        raise interrupted(stop.received or "signal", run, folder)
    return RunResult(folder, hooks.last_checkpoint, folder / "metrics.jsonl", hooks.last_grid,
                     run.distiller.counters.iteration, run.accelerator.is_main_process)


def train_with_dashboard(run: DistillRun, preset: Preset, live: bool | None, stop: StopSignals,
                         notes: list[str]) -> RunHooks:  # fmt: skip
    from cdmctl.dashboard import Dashboard

    main = run.accelerator.is_main_process
    title = f"cdmctl distill {preset.name}"
    with Dashboard(preset.train.iterations, title, live=live) if main else SilentDashboard() as dashboard:
        for line in notes:
            dashboard.note(line)
        hooks = run.start(dashboard, stop)
        if main and stop.received is None:
            write_run_reports(run, dashboard)
    return hooks


def interrupted(signal_name: str, run: DistillRun | None, folder: Path) -> RunInterrupted:
    """Where the run stands: the newest complete checkpoint on disk (this session's or an earlier one's)."""
    existing = ckpt.list_checkpoints(folder)
    iteration = run.distiller.counters.iteration if run is not None else 0
    main = run.accelerator.is_main_process if run is not None else True
    return RunInterrupted(signal_name, folder, existing[-1] if existing else None, iteration, main)
