"""Assemble a distillation run from a preset: folder, Accelerator, backbone, roles, prompts, hooks -> engine."""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cdmctl.backbones import load_backbone, resolve_source
from cdmctl.backbones.base import Backbone, Conditioning
from cdmctl.backbones.loading import transformer_on_meta
from cdmctl.config.schema import Preset, sampling_of
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
from cdmctl.parallel import (FSDP2, build_accelerator, effective_strategy, grad_clipper, mixed_precision,
                             place_teacher, prepare_networks, prepare_trained, receive_weights, wrap_blocks)
from cdmctl.plugins import RUN_REPORTS, register_run_report  # noqa: F401 (plugins register reports; a cheap import)
from cdmctl.prompts import load_prompts, prompt_file_sha256
from cdmctl.quiet import quiet_libraries
from cdmctl.runfolder import run_folder, trim_metrics

if TYPE_CHECKING:
    from cdmctl.embedcache import EmbeddingCache, Ranks
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


class LivePrompts:
    """Prompts encoded batch by batch as they are drawn (`data.cache_embeddings: false`); the text encoders stay."""

    def __init__(self, backbone: Backbone, prompts: list[str]):
        self.backbone, self.prompts = backbone, prompts
        self.null = backbone.encode_prompts([""]).to("cpu")

    def __len__(self) -> int:
        return len(self.prompts)

    def conditioning(self, indices: torch.Tensor) -> Conditioning:
        return self.backbone.encode_prompts([self.prompts[i] for i in indices.tolist()]).to("cpu")


def ranks_of(acc) -> "Ranks":
    """The embedding cache's view of the processes: barriers and an any-rank flag through accelerate."""
    from cdmctl.embedcache import Ranks

    def any_true(flag: bool) -> bool:
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)

    return Ranks(acc.process_index, acc.num_processes, acc.wait_for_everyone, any_true)


def cached_prompts(preset: Preset, source: str, backbone: Backbone, prompts: list[str], compute: torch.dtype, acc):
    """The run's prompts from the on-disk embedding cache, encoding it first (all ranks, each its share) if this
    model, text setting and prompt list have none yet. Returns (cache, a line for the user)."""
    import time

    from cdmctl.embedcache import default_root, key_fields, open_or_build

    model, data = preset.model, preset.data
    fields = key_fields(model.backbone, source, model.revision, model.text_length, compute, prompts)
    start = time.perf_counter()
    cache, built = open_or_build(default_root(data.embedding_cache), fields, prompts,
                                 lambda batch: backbone.encode_prompts(batch).to("cpu"), ranks_of(acc),
                                 shard_mb=data.cache_shard_mb, batch_size=data.encode_batch_size)  # fmt: skip
    verb = f"encoded {len(prompts)} prompts on {acc.num_processes} process(es) in {time.perf_counter() - start:.1f} s" \
        if built else f"reused the cache of {len(prompts)} prompts"  # fmt: skip
    return cache, f"prompt embeddings: {verb} ({cache.folder})"


def batch_maker(bank: "EmbeddingCache | LivePrompts", per_process: int, latent: tuple[int, ...], device: torch.device):
    """Per iteration and rank: random prompts and simulation noise from the iteration's own streams."""

    def make(draws: Draws) -> Batch:
        idx = draws.rows("prompts", per_process,
                         lambda g, n: torch.randint(len(bank), (n,), generator=g, device=g.device))  # fmt: skip
        cond = bank.conditioning(idx).to(device)
        noise = draws.rows("sim-noise", per_process, lambda g, n: torch.randn((n, *latent), generator=g, device=device))
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

        self.last_checkpoint = self.run.save_checkpoint(iteration)
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
        prompts = load_prompts(preset.data.prompts)
        self.prompts_sha256 = prompt_file_sha256(preset.data.prompts)  # of the file as this run read it
        if preset.data.cache_embeddings:
            bank, note = cached_prompts(preset, self.source, backbone, prompts, compute, acc)
            self.notes.append(note)
        else:
            bank = LivePrompts(backbone, prompts)
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
                         clip=grad_clipper(self.accelerator))  # fmt: skip

    def tbcm_distiller(self, compute: torch.dtype, make_batch, shift) -> TBCMDistiller:
        """Student and teacher (no fake teacher) and the log-variance head, each trained module with its own
        optimizer (accelerate's FSDP2 shards one model per optimizer): the checkpoint holds student, then head."""
        preset, acc = self.preset, self.accelerator
        from accelerate.utils import set_seed

        set_seed(preset.train.seed)
        student, teacher, _ = build_networks(self.backbone, preset, compute, fake=False)
        if preset.parallel.load == "rank0":
            receive_weights(acc, [student, teacher])
        # the head's fixed Fourier features come from their own stream, not the global generator
        head = LogVarHead(generator=generator(preset.train.seed, "logvar-head"))
        student_opt = adamw(student, preset.optim.student_lr, preset)
        head_opt = adamw(head, preset.method.tbcm.logvar_lr or preset.optim.student_lr, preset, weight_decay=0.0)
        (student, student_opt), (head, head_opt) = prepare_trained(acc, [(student, student_opt), (head, head_opt)])
        teacher = place_teacher(acc, preset.parallel.teacher, teacher, preset.model.teacher_device)
        self.forward_context = forward_context(acc.autocast, preset.model.attention_backend)
        self.roles = Roles(self.backbone, student, teacher, None, autocast=self.forward_context,
                           unwrap=acc.unwrap_model)  # fmt: skip
        self.ema = self.student_ema(student)
        return TBCMDistiller(acc, self.roles, head, preset.method, preset.optim, [student_opt, head_opt], self.ema,
                             make_batch=make_batch, shift=shift, seed=preset.train.seed,
                             clip=grad_clipper(acc))  # fmt: skip

    def load_backbone(self, compute: torch.dtype) -> Backbone:
        """Every part in the compute dtype on the training device; trained copies get float32 masters later."""
        model = self.preset.model
        extra = {"max_sequence_length": model.text_length} if model.text_length else {}
        acc = self.accelerator
        # rank0: the other ranks build the transformer empty and get its weights in `receive_weights`
        empty = self.preset.parallel.load == "rank0" and acc.num_processes > 1 and not acc.is_main_process
        with transformer_on_meta(empty):
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
        if preset.parallel.load == "rank0":
            receive_weights(acc, [student, teacher, fake])  # before the optimizers take the parameters
        student_opt, fake_opt = adamw(student, preset.optim.student_lr, preset), adamw(fake, preset.optim.fake_lr, preset)
        student, teacher, fake, student_opt, fake_opt = prepare_networks(
            acc, preset.parallel.teacher, student, teacher, fake, student_opt, fake_opt, preset.model.teacher_device)
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
            # how state/ was written: sharded (FSDP2, torch distributed checkpoint) or whole (one process, DDP)
            "parallel": {"strategy": self.strategy, "processes": self.accelerator.num_processes},
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
                                                 keep=self.preset.run.keep_checkpoints, protect=self.kept_apart())
        acc.wait_for_everyone()
        return final

    def kept_apart(self) -> set[str]:
        """Checkpoints that pruning leaves alone: the best one (RUN/best.json)."""
        from cdmctl.trainingeval import read_best

        best = read_best(self.folder)
        return {Path(best["checkpoint"]).name} if best else set()

    def student_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """What export needs: the full student (or only its adapter, for LoRA) and its EMA, same keys, whole
        tensors whatever the sharding. Collective under FSDP2 (every rank gathers); only the main process keeps
        them (it writes them), the others get empty dicts."""
        from cdmctl.engine.sharding import gathered

        acc = self.accelerator
        keep = acc.is_main_process
        student = acc.unwrap_model(self.roles.student_module)
        if self.preset.model.train == "lora":
            from peft import get_peft_model_state_dict

            tensors = {"student": gathered(get_peft_model_state_dict(student), keep=keep)}
            if self.ema is not None:
                tensors["ema"] = {lora_key(k): v for k, v in self.ema.state_dict(keep=keep).items()}
            return tensors
        state = acc.get_state_dict(self.roles.student_module)  # gathered onto the main process under FSDP2
        tensors = {"student": state if keep else {}}
        if self.ema is not None:
            tensors["ema"] = self.ema.merged_state_dict(state=state, keep=keep)  # loadable strictly
        return tensors

    def restore(self, checkpoint: Path) -> None:
        """Weights, optimizer states, EMA and counters exactly as they were saved. `checkpoint` comes from
        `runfolder.opened_run`, which already checked every one of its files against the manifest."""
        self.accelerator.load_state(str(checkpoint / "state"))  # FSDP2: re-sharded onto this world size
        if self.ema is not None:
            # read tensor by tensor (each rank keeps its part), never the whole file at once; verified with the rest
            rename = {k: lora_key(k) for k in self.ema.shadow} if self.preset.model.train == "lora" else None
            stored = checkpoint / ckpt.read_manifest(checkpoint)["files"]["ema"]
            self.ema.load_state_dict(ckpt.LazyWeights(stored, rename))
        manifest = ckpt.read_manifest(checkpoint)
        self.distiller.load_state(manifest)
        self.distiller.cost.load_state_dict(manifest["cost_totals"])
        trim_metrics(self.folder, self.distiller.counters.iteration)
        if self.evaluator is not None:  # evaluations up to the checkpoint are kept, not repeated
            from cdmctl.runlog import read_metrics
            from cdmctl.trainingeval import replay

            self.evaluator.totals = replay(self.selection, read_metrics(self.folder))

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
                run.restore(start_from)
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
