"""Few-step sampling of a student (exported folder, run checkpoint or hub id), PNGs with metadata, teacher sheets."""

from __future__ import annotations

import inspect
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cdmctl.backbones.loading import dtype_kwarg
from cdmctl.config.schema import sampling_of
from cdmctl.errors import UserError
from cdmctl.outputs import reporting_disk_full
from cdmctl.studentload import INFO_FILE, inference_levels, parse_dtype, read_info

DEFAULT_STEPS = 4
GRID_FILE = "grid.png"
COMPARE_FILE = "compare.png"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------- the student


@dataclass
class Student:
    """A loaded few-step student: its diffusers pipeline and how it should be sampled.

    `levels` is the recommended inference schedule in the *unshifted* space (as in training);
    the pipeline's scheduler applies its time shift to whatever it is given (shift 1 for a student sampled without
    it). Other step counts get `level_rule`'s levels (cdmctl.samplers: "uniform", or TBCM's "trigflow").
    """

    pipe: Any
    model: str  # what the user pointed at (folder, run@checkpoint, hub id)
    steps: int = DEFAULT_STEPS
    levels: list[float] | None = None
    resolution: int | None = None
    max_sequence_length: int | None = None  # text tokens as in training (preset model.text_length)
    base_model: str | None = None  # the teacher, for --compare-teacher
    revision: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the family adapter class of the pipeline (its class-level sampling traits), None for other pipelines
    adapter: Any = None
    text_source: str | None = None  # where its text encoders were loaded from (a folder or hub id)
    text_revision: str | None = None
    # prompts -> their cached Conditioning, when the student samples from an embedding cache (see use_embeddings)
    embeddings: Callable[[list[str]], Any] | None = None
    level_rule: str = "uniform"
    scheduler_name: str | None = None  # a training-free sampler chosen with --scheduler (cdmctl.samplers), if any

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def sampler(self) -> str:
        """The --scheduler chosen, else 'consistency' (a TBCM student: the scheduler's stochastic_sampling) or
        'euler'."""
        if self.scheduler_name is not None:
            return self.scheduler_name
        return "consistency" if self.pipe.scheduler.config.get("stochastic_sampling") else "euler"

    def use_sampler(self, name: str | None = None, shift: float | None = None) -> None:
        """Sample with training-free sampler `name` (cdmctl.samplers: diffusers' scheduler of that name on this
        model's scheduler config) and/or static time shift `shift` (None: the model's own) from now on; its levels
        replace the recommended ones."""
        from cdmctl.samplers import SAMPLERS, make_scheduler

        if name is None and shift is None:
            return
        self.pipe.scheduler = make_scheduler(name, shift, self.pipe.scheduler)
        if name is not None:
            self.scheduler_name, self.level_rule, self.levels = name, SAMPLERS[name].levels, None

    def schedule(self, steps: int | None = None, sigmas: Sequence[float] | None = None) -> list[float]:
        """The unshifted levels to sample with: `sigmas` as given, else the recommended schedule when
        `steps` is its length, else `steps` evenly spaced levels 1, 1 - 1/steps, ..."""
        if sigmas is not None:
            levels = check_levels(sigmas)
            if steps is not None and steps != len(levels):
                raise UserError(f"--steps {steps} disagrees with {len(levels)} --sigmas", "give one of them")
            return levels
        steps = self.steps if steps is None else int(steps)
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}", "use e.g. --steps 4")
        if self.levels and steps == len(self.levels):
            return list(self.levels)
        from cdmctl.samplers import unshifted_levels

        return unshifted_levels(self.level_rule, steps)

    def shifted(self, levels: Sequence[float], size: tuple[int, int] | None = None) -> list[float] | None:
        """The levels after the scheduler's time shift at this image size (what the transformer sees), set as the
        family's pipeline sets them; None for a dynamic shift of a pipeline of no known family."""
        config = self.pipe.scheduler.config
        height, width = size or self.image_size()
        if self.adapter is not None:
            extra = self.adapter.scheduler_kwargs(self.pipe, height, width, len(levels))
        elif config.get("use_dynamic_shifting"):
            return None  # depends on the image size in a way only the pipeline knows
        else:
            extra = {}
        from cdmctl.samplers import scheduler_sigmas

        scheduler = type(self.pipe.scheduler).from_config(config)
        return [round(s, 6) for s in scheduler_sigmas(scheduler, list(levels), **extra)]

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width): given, else the training resolution, else the pipeline's default."""
        pipe = self.pipe
        default = self.resolution or getattr(pipe, "default_sample_size", 64) * getattr(pipe, "vae_scale_factor", 8)
        height, width = int(height or default), int(width or default)
        if self.adapter is not None:
            multiple = self.adapter.image_multiple(pipe)
        else:
            multiple = getattr(pipe, "vae_scale_factor", 8) * (getattr(pipe, "patch_size", None) or 1)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise UserError(f"image size {height}x{width} does not fit this model", f"use multiples of {multiple}")
        return height, width

    def describe(self, steps: int | None = None, sigmas: Sequence[float] | None = None) -> dict[str, Any]:
        """The sampling settings as plain data: model, steps, unshifted schedule, shifted sigmas, shift."""
        levels = self.schedule(steps, sigmas)
        config = self.pipe.scheduler.config
        return {
            "model": self.model,
            "steps": len(levels),
            "schedule": levels,
            "sigmas": self.shifted(levels),
            "shift": "dynamic" if config.get("use_dynamic_shifting") else float(config.get("shift",
                                                                                       config.get("flow_shift", 1.0))),
            "level_rule": self.level_rule,
            "sampler": self.sampler,
            "guidance_scale": 1.0,
            "max_sequence_length": self.max_sequence_length,
            "base_model": self.base_model,
        }

    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 4,
        progress: Callable[[int], None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[Any]:
        """One PIL image per (prompt, seed): the student's sampler (Euler, or a TBCM student's consistency sampler) on the schedule, guidance 1, no negative prompt.

        Each image's starting noise comes from its own CPU generator seeded with its seed, so an
        image depends only on its prompt, seed and the settings, not on the batch it ran in or on
        the device: in float32, batch size and position change a pixel by at most 1/255 (CPU and
        H100), and CPU vs GPU likewise. In bf16 on a GPU the matrix kernels depend on the batch
        shape, so pixels may differ by a few levels between batch sizes (5/255 seen on an H100).
        `progress(n)` is called after each batch with the number of images it made; `extra`: more pipeline
        arguments (training's evaluation passes a step-end callback that keeps the final latents).
        """
        levels = self.schedule(steps, sigmas)
        # the step count too: a pipeline may compute its shift from it (Flux.2) even when given the sigmas
        settings = {**self.timestep_kwargs(levels, sigmas is not None), **self.guidance_kwargs(1.0),
                    **self.call_kwargs(), **(extra or {})}  # fmt: skip
        return run_pipeline(self.pipe, prompts, seeds, settings, self.image_size(height, width), batch_size, progress,
                            self.prompt_kwargs)  # fmt: skip

    def timestep_kwargs(self, levels: list[float], given: bool = False) -> dict[str, Any]:
        """The pipeline's schedule arguments for `levels`: the levels, or only their count for a scheduler that
        spaces its own (DPM-Solver++), which refuses levels the user gave (`given`)."""
        from cdmctl.samplers import timestep_kwargs

        kwargs = timestep_kwargs(self.pipe.scheduler, levels)
        if given and "sigmas" not in kwargs:
            raise UserError(f"--sigmas does not fit --scheduler {self.sampler}, which spaces its own levels",
                            "give --steps instead")  # fmt: skip
        return kwargs

    def prompt_kwargs(self, prompts: list[str]) -> dict[str, Any]:
        """How one pipeline call gets its prompts: as strings, or as their cached embeddings."""
        if self.embeddings is None:
            return {"prompt": prompts}
        return self.adapter.embedding_kwargs(self.embeddings(prompts).to(self.device, self.dtype))

    def text_encoder(self) -> Any:
        """The family adapter over this pipeline's own parts: its `encode_prompts` encodes as training did."""
        text_length = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        if "max_sequence_length" not in inspect.signature(self.adapter).parameters:
            text_length = {}  # a family whose pipeline fixes its text length
        return self.adapter(dict(self.pipe.components), source=self.text_source, revision=self.text_revision,
                            dtype=self.dtype, device=self.device, **text_length)  # fmt: skip

    def use_embeddings(self, embeddings: Callable[[list[str]], Any]) -> None:
        """Sample from `embeddings(prompts)` (cached Conditioning) from now on, and free the text encoders."""
        from cdmctl.backbones.family import free_memory

        self.embeddings = embeddings
        self.adapter.accept_embeddings(self.pipe)
        loaded = [name for name, part in self.pipe.components.items() if is_text_encoder(name) and part is not None]
        self.pipe.register_modules(**dict.fromkeys(loaded))
        free_memory()

    def load_text_encoders(self) -> None:
        """Load the text encoders it was opened without (`open_model(text_encoders=False)`) from `text_source`."""
        from diffusers import DiffusionPipeline

        missing = [name for name, part in self.pipe.components.items() if is_text_encoder(name) and part is None]
        index = DiffusionPipeline.load_config(self.text_source, revision=self.text_revision) if missing else {}
        missing = [name for name in missing if (index.get(name) or [None])[0] is not None]  # the model has them
        if not missing:
            return
        others = [part for part in index if not part.startswith("_") and part not in missing]
        loaded = DiffusionPipeline.from_pretrained(self.text_source, revision=self.text_revision,
                                                   **dict.fromkeys(others), **dtype_kwarg(self.dtype))  # fmt: skip
        self.pipe.register_modules(**{name: loaded.components[name].to(self.device) for name in missing})

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """The pipeline's arguments for standard CFG at `scale` (1: none) in its family's convention."""
        return self.adapter.guidance_kwargs(scale) if self.adapter is not None else {"guidance_scale": float(scale)}

    def call_kwargs(self) -> dict[str, Any]:
        """What every call of this pipeline passes besides the schedule and guidance, student and teacher alike:
        the family's own arguments (LongCat: prompt rewriting off) and the text length as in training."""
        extra = dict(self.adapter.sampling_kwargs()) if self.adapter is not None else {}
        return {**extra, **self.text_kwargs()}

    def text_kwargs(self) -> dict[str, int]:
        """`max_sequence_length` as in training, for pipelines that take it (SD3, Flux)."""
        if self.max_sequence_length and "max_sequence_length" in inspect.signature(self.pipe.__call__).parameters:
            return {"max_sequence_length": int(self.max_sequence_length)}
        return {}

    def teacher_defaults(self) -> dict[str, Any]:
        """The base model's own many-step settings (steps and guidance of its family's pipeline)."""
        defaults = {"num_inference_steps": 28, "guidance_scale": 7.0}
        return {**defaults, **(self.adapter.teacher_sampling() if self.adapter is not None else {})}


def run_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: dict[str, Any],
    size: tuple[int, int],
    batch_size: int,
    progress: Callable[[int], None] | None,
    prompt_kwargs: Callable[[list[str]], dict[str, Any]] = lambda chunk: {"prompt": chunk},
) -> list[Any]:
    """Call `pipe` in batches with one seeded CPU generator per image; returns PIL images in order.
    `prompt_kwargs(chunk)` gives a call its prompts (strings by default, or their embeddings)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. --batch-size 4")
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        call = dict(settings)
        if isinstance(call.get("negative_prompt"), str):  # one per prompt: pipelines do not broadcast a single one
            call["negative_prompt"] = [call["negative_prompt"]] * len(chunk)
        with torch.inference_mode(), per_image_renoise(pipe, generators):
            out = pipe(height=size[0], width=size[1], generator=generators, output_type="pil",
                       **prompt_kwargs(chunk), **call)  # fmt: skip
        images.extend(out.images)
        if progress is not None:
            progress(len(chunk))
    return images


@contextmanager
def per_image_renoise(pipe: Any, generators: list[torch.Generator]):
    """A stochastic-sampling scheduler (a TBCM student's consistency sampler) draws its fresh noise from each
    image's own generator, continuing after its starting noise, for one pipeline call: the pipeline does not pass
    its generator to the scheduler, and torch's global generator would tie an image to its batch."""
    original = pipe.scheduler
    if not original.config.get("stochastic_sampling"):
        yield
        return

    class PerImageNoise(type(original)):
        def step(self, *args, generator=None, **kwargs):
            return super().step(*args, generator=generators if generator is None else generator, **kwargs)

    pipe.scheduler = PerImageNoise.from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


def deterministic_scheduler(scheduler: Any) -> Any:
    """The scheduler without stochastic sampling: how a teacher samples beside a consistency-sampled student."""
    if not scheduler.config.get("stochastic_sampling"):
        return scheduler
    return type(scheduler).from_config({**scheduler.config, "stochastic_sampling": False})


def check_levels(levels: Sequence[float]) -> list[float]:
    """A user schedule: starts at 1.0 (pure noise, as in training) and strictly decreases to > 0."""
    levels = [float(s) for s in levels]
    finite = all(math.isfinite(s) for s in levels)  # nan compares false with everything: checked explicitly
    decreasing = all(b < a for a, b in zip(levels, levels[1:]))
    if not finite or not levels or levels[0] != 1.0 or levels[-1] <= 0 or not decreasing:
        raise UserError(
            f"bad --sigmas {levels}",
            "give unshifted levels starting at 1.0 and strictly decreasing, e.g. 1,0.75,0.5,0.25",
        )
    return levels


def parse_sigmas(text: str | None) -> list[float] | None:
    """'1,0.75,0.5,0.25' (commas or spaces) -> checked levels; None stays None."""
    if text is None or not str(text).strip():
        return None
    try:
        return check_levels([float(t) for t in re.split(r"[,\s]+", str(text).strip()) if t])
    except ValueError as exc:
        fix = "write numbers separated by commas, e.g. 1,0.75,0.5,0.25"
        raise UserError(f"cannot read --sigmas '{text}'", fix) from exc


# A distilled student samples in 1-8 steps, its teacher in ~28: far beyond that is a typo (1000 for 10), and
# would cost minutes per image while looking like a hang. A longer custom schedule can still go in --sigmas.
MAX_STEPS = 100


def check_steps(steps: int | None) -> int | None:
    """--steps as given, refused below 1 or above MAX_STEPS (before any model is loaded)."""
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        fix = "a distilled student samples in 1-8 steps, e.g. --steps 4; a long schedule goes in --sigmas"
        raise UserError(f"--steps {steps} is outside 1..{MAX_STEPS}", fix)
    return steps


def check_device(name: str | None) -> str | None:
    """--device as given, refused when torch cannot parse it or this machine/build has no such device."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device '{name}'", "use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
            raise UserError(f"--device {name}: {build}", "use --device cpu, or install torch with CUDA")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)", "use --device cuda:0")
        return name
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise UserError(f"--device {name}: no {device.type} device available", "use --device cpu")
    return name


# ----------------------------------------------------------------------------- opening a model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_model(
    model: str,
    *,
    checkpoint: str | int = "latest",
    ema: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    text_encoders: bool = True,
) -> Student:
    """An exported folder (model_index.json), a LoRA-only export, a run folder (checkpoints/), a hub id, or a
    built-in model (`builtin:toy-sd3`).

    Defaults: device cuda when available, else cpu; dtype bf16 on cuda, fp32 on cpu. `text_encoders=False` leaves
    an export's text encoders unloaded (`Student.load_text_encoders` loads them later); a run folder's student is
    built with them.
    """
    device = torch.device(device or default_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch_dtype = parse_dtype(dtype)
    if str(model).startswith("builtin:"):  # a built-in model (the toy teacher, a tiny pipeline): its cached folder
        from cdmctl.backbones import resolve_source

        model = resolve_source(str(model))
    path = Path(str(model)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {model} is a file", "point at an exported folder, a run folder or a hub id")
        if (path / "model_index.json").is_file():
            student = _from_pipeline(str(path), read_info(path), torch_dtype, str(path), text_encoders)
        elif (path / "checkpoints").is_dir() or (path / "preset.yaml").is_file():
            student = _from_run(path, checkpoint, ema, torch_dtype)
        elif read_info(path).get("kind") == "lora":
            student = _from_lora(str(path), read_info(path), torch_dtype, str(path), text_encoders)
        else:
            raise UserError(
                f"{model} is neither an exported model (model_index.json) nor a run folder (checkpoints/)",
                "export a run with `cdmctl export RUN --out DIR`, or point at the run folder",
            )
    elif HUB_ID.match(str(model)) and ".." not in str(model):
        student = _from_hub(str(model), torch_dtype, text_encoders)
    else:
        raise UserError(f"model {model} not found", "give an exported folder, a run folder or a hub id (owner/name)")
    student.pipe.to(device)
    return student


def _student(pipe: Any, model: str, info: dict[str, Any], text_source: str, text_revision: str | None = None) -> Student:
    """`text_source` (and its revision): where the pipeline's text encoders came from (the embedding cache's key)."""
    from cdmctl.backbones import adapter_for_pipeline

    steps, levels = info.get("steps") or DEFAULT_STEPS, info.get("levels")
    rule = info.get("level_rule") or "uniform"  # exports made before it existed sample at uniform levels
    if levels and len(levels) != steps:
        levels = None
    adapter = adapter_for_pipeline(type(pipe).__name__)
    if adapter is not None:  # e.g. a LoRA on a Qwen-Image base: the scheduler as the student trained with
        pipe.scheduler = adapter.student_scheduler(pipe.scheduler)
    return Student(
        pipe=pipe, model=model, steps=int(steps), levels=levels, resolution=info.get("resolution"),
        max_sequence_length=info.get("max_sequence_length"), base_model=info.get("base_model"),
        revision=info.get("revision"), info=info, adapter=adapter, text_source=text_source, text_revision=text_revision,
        level_rule=rule,
    )  # fmt: skip


def is_text_encoder(part: str) -> bool:
    """diffusers names every text encoder of a pipeline text_encoder, text_encoder_2, ..."""
    return part.startswith("text_encoder")


def load_pipeline(source: str, dtype: torch.dtype, revision: str | None = None, text_encoders: bool = True) -> Any:
    """Any diffusers pipeline folder or hub id, without the parts its family never uses (LongCat: the text
    processor, which only prompt rewriting needs and which needs torchvision to load), and without its text
    encoders if asked."""
    from diffusers import DiffusionPipeline

    from cdmctl.backbones import adapter_for_pipeline

    index = DiffusionPipeline.load_config(source, revision=revision)
    adapter = adapter_for_pipeline(index.get("_class_name"))
    skipped = [*(adapter.unused_parts if adapter is not None else ()),
               *([] if text_encoders else [part for part in index if is_text_encoder(part)])]  # fmt: skip
    return DiffusionPipeline.from_pretrained(source, revision=revision, **dict.fromkeys(skipped), **dtype_kwarg(dtype))


def _from_pipeline(source: str, info: dict[str, Any], dtype: torch.dtype, model: str, text_encoders: bool = True) -> Student:
    try:
        pipe = load_pipeline(source, dtype, text_encoders=text_encoders)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for a bad folder or id
        raise UserError(f"cannot load {source} as a diffusers pipeline: {exc}", "check the folder or hub id") from exc
    return _student(pipe, model, info, source)


def _from_lora(source: str, info: dict[str, Any], dtype: torch.dtype, model: str, text_encoders: bool = True) -> Student:
    """A `--lora-only` export: the base model named in cdmctl.json plus the adapter (on its transformer, the
    one way every family's pipeline takes it)."""
    from cdmctl.studentload import LORA_PREFIX, LORA_WEIGHT_NAME

    base = info.get("base_model")
    if not base:
        raise UserError(f"{source}: cdmctl.json names no base model for the LoRA", "re-export the run")
    if str(base).startswith("builtin:"):
        from cdmctl.backbones import resolve_source

        base = str(resolve_source(base))
    try:
        pipe = load_pipeline(base, dtype, revision=info.get("revision"), text_encoders=text_encoders)
        pipe.transformer.load_lora_adapter(source, prefix=LORA_PREFIX, weight_name=LORA_WEIGHT_NAME)
    except Exception as exc:  # noqa: BLE001
        fix = "check that the base model is reachable"
        raise UserError(f"cannot load the LoRA {source} on {base}: {exc}", fix) from exc
    return _student(pipe, model, info, base, info.get("revision"))


def _from_run(run_dir: Path, checkpoint: str | int, ema: bool, dtype: torch.dtype) -> Student:
    from cdmctl.engine.checkpoint import find_checkpoint
    from cdmctl.studentload import student_pipeline

    ckpt = find_checkpoint(run_dir, checkpoint)
    pipe, manifest = student_pipeline(ckpt, ema=ema, dtype=dtype)
    preset = manifest.get("preset") or {}
    steps, levels = inference_levels(preset)
    info = {
        "steps": steps, "levels": levels, "level_rule": sampling_of(preset)[1],
        "resolution": (preset.get("model") or {}).get("resolution"),
        "max_sequence_length": (preset.get("model") or {}).get("text_length"),
        "base_model": manifest.get("base_model"), "revision": manifest.get("revision"),
    }  # fmt: skip
    return _student(pipe, f"{run_dir}@{ckpt.name}:{'ema' if ema else 'student'}", info, manifest["base_model"],
                    manifest.get("revision"))  # fmt: skip


def _from_hub(model_id: str, dtype: torch.dtype, text_encoders: bool = True) -> Student:
    info = _hub_info(model_id)
    if info.get("kind") == "lora":
        return _from_lora(model_id, info, dtype, model_id, text_encoders)
    return _from_pipeline(model_id, info, dtype, model_id, text_encoders)


def _hub_info(model_id: str) -> dict[str, Any]:
    """cdmctl.json of a hub model when it has one (a student published from `cdmctl export`)."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_id, INFO_FILE)).read_text())
    except Exception:  # noqa: BLE001 - no such file, offline, gated: sample with the defaults
        return {}


# ----------------------------------------------------------------------------- teacher


def sample_teacher(
    student: Student,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    teacher: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
    scheduler: str | None = None,
    shift: float | None = None,
) -> list[Any]:
    """The base model's images for the same prompts and seeds (its own schedule, `steps`, `guidance`; by default
    its family's own settings, e.g. 28 steps at guidance 7 for SD3).

    Only the teacher's transformer is loaded; the text encoders, VAE and scheduler config are the student's.
    `scheduler` names a training-free sampler (cdmctl.samplers: diffusers' scheduler class, its levels) and `shift`
    a static time shift (None: the model's own) instead of the pipeline's default sampler.
    """
    source = teacher or student.base_model
    if not source:
        raise UserError(f"the base model of {student.model} is unknown", "name it with --teacher MODEL")
    if str(source).startswith("builtin:"):
        from cdmctl.backbones import resolve_source

        source = str(resolve_source(source))
    pipe = student.pipe
    revision = student.revision if teacher is None else None
    try:
        transformer = type(pipe.transformer).from_pretrained(
            source, subfolder="transformer", revision=revision, **dtype_kwarg(student.dtype)
        )
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the teacher's transformer from {source}: {exc}", "check --teacher") from exc
    from cdmctl.samplers import make_scheduler, sampler_levels, timestep_kwargs

    base = deterministic_scheduler(pipe.scheduler)
    sampler = make_scheduler(scheduler, shift, base) if scheduler is not None or shift is not None else base
    components = {**pipe.components, "transformer": transformer.to(student.device), "scheduler": sampler}
    teacher_pipe = type(pipe)(**components)
    # Same prompt encoding as the student (and as the teacher saw in training).
    defaults = student.teacher_defaults()
    n = int(defaults["num_inference_steps"] if steps is None else steps)
    settings = {
        **(timestep_kwargs(sampler, sampler_levels(scheduler, n)) if scheduler else {"num_inference_steps": n}),
        **student.guidance_kwargs(defaults["guidance_scale"] if guidance is None else guidance),
        **student.call_kwargs(),
    }
    try:
        return run_pipeline(teacher_pipe, prompts, seeds, settings, student.image_size(height, width), batch_size,
                            progress)  # fmt: skip
    except ValueError as exc:  # a pipeline that passes its own levels to a scheduler that spaces its own
        if scheduler is None or "sigmas" not in str(exc):
            raise
        raise UserError(f"--scheduler {scheduler} does not fit {type(pipe).__name__}: {exc}",
                        "use --scheduler euler or unipc") from exc  # fmt: skip


# ----------------------------------------------------------------------------- writing


def images_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL images of one size -> float tensor [B, 3, H, W] in [0, 1] (exact k/255 values)."""
    import numpy as np

    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def png_text(prompt: str, seed: int, settings: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks of one image: prompt, seed and every setting (lists as JSON)."""
    text = {"prompt": prompt, "seed": str(seed)}
    for key, value in settings.items():
        if value is not None:
            text[key] = value if isinstance(value, str) else json.dumps(value)
    return text


def write_images(
    images: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int], settings: dict[str, Any], out: str | Path
) -> list[Path]:
    """Save `images` as `out/0000-seed<seed>.png` with text metadata, plus the contact sheet `out/grid.png`.

    `settings` (e.g. steps, sigmas, model) goes into every PNG's text chunks next to its prompt and
    seed; read them back with `PIL.Image.open(path).text`. Returns the image paths (not the grid).
    """
    from PIL.PngImagePlugin import PngInfo

    from cdmctl.runlog import save_grid

    out = Path(out)
    with reporting_disk_full(out):
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
            meta = PngInfo()
            for key, value in png_text(prompt, seed, settings).items():
                meta.add_text(key, value)  # PIL writes iTXt when the text is not latin-1
            path = out / f"{index:04d}-seed{seed}.png"
            try:
                image.save(path, pnginfo=meta)
            except BaseException:
                path.unlink(missing_ok=True)  # a truncated PNG would pass for an image
                raise
            paths.append(path)
        if images:
            save_grid(images_tensor(images), out / GRID_FILE)
    return paths


def write_comparison(student: Sequence[Any], teacher: Sequence[Any], path: str | Path) -> Path:
    """Side-by-side sheet: one row per image, student on the left, teacher on the right."""
    from cdmctl.runlog import save_grid

    pairs = [img for pair in zip(student, teacher) for img in pair]
    return save_grid(images_tensor(pairs), Path(path), nrow=2)


# ----------------------------------------------------------------------------- the command


def expand(prompts: Sequence[str], seed: int, num_images: int) -> tuple[list[str], list[int]]:
    """Each prompt `num_images` times; image k (in order) gets seed `seed + k`."""
    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}", "use e.g. --num-images 4")
    if not prompts:
        raise UserError("no prompts given", 'pass "PROMPT" arguments or --prompts FILE')
    expanded = [p for p in prompts for _ in range(num_images)]
    return expanded, [seed + k for k in range(len(expanded))]


@dataclass
class GenerateResult:
    images: list[Path]
    grid: Path
    compare: Path | None
    settings: dict[str, Any]


def generate(
    prompts: Sequence[str],
    *,
    model: str,
    out: str | Path,
    checkpoint: str | int = "latest",
    ema: bool = True,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    seed: int = 0,
    num_images: int = 1,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    compare_teacher: bool = False,
    teacher: str | None = None,
    teacher_steps: int | None = None,
    teacher_guidance: float | None = None,
    teacher_scheduler: str | None = None,
    teacher_shift: float | None = None,
    progress: bool = True,
) -> GenerateResult:
    """`cdmctl generate`: sample the student, write PNGs + grid (+ teacher images and a comparison sheet)."""
    all_prompts, seeds = expand(prompts, seed, num_images)
    student = open_model(model, checkpoint=checkpoint, ema=ema, device=device, dtype=dtype)
    levels = student.schedule(steps, sigmas)
    size = student.image_size(height, width)
    out = Path(out)
    settings = {
        "model": student.model, "steps": len(levels), "sigmas": levels,
        "shifted_sigmas": student.shifted(levels, size), "guidance_scale": 1.0, "height": size[0], "width": size[1],
        "sampler": student.sampler, "generator": "cdmctl", **student.call_kwargs(),
    }  # fmt: skip
    with _progress(progress, len(all_prompts), "student") as advance:
        images = student.sample(all_prompts, seeds, sigmas=levels, height=size[0], width=size[1],
                                batch_size=batch_size, progress=advance)  # fmt: skip
    paths = write_images(images, all_prompts, seeds, settings, out)
    compare = None
    if compare_teacher:
        with _progress(progress, len(all_prompts), "teacher") as advance:
            teacher_images = sample_teacher(
                student, all_prompts, seeds, teacher=teacher, steps=teacher_steps, guidance=teacher_guidance,
                height=size[0], width=size[1], batch_size=batch_size, progress=advance, scheduler=teacher_scheduler,
                shift=teacher_shift,
            )  # fmt: skip
        defaults = student.teacher_defaults()
        teacher_settings = {
            "model": teacher or student.base_model, "steps": teacher_steps or defaults["num_inference_steps"],
            "guidance_scale": defaults["guidance_scale"] if teacher_guidance is None else teacher_guidance,
            "height": size[0], "width": size[1], "sampler": teacher_scheduler or "pipeline default",
            "shift": "model default" if teacher_shift is None else teacher_shift, "generator": "cdmctl",
            **student.call_kwargs(),
        }  # fmt: skip
        write_images(teacher_images, all_prompts, seeds, teacher_settings, out / "teacher")
        compare = write_comparison(images, teacher_images, out / COMPARE_FILE)
    return GenerateResult(images=paths, grid=out / GRID_FILE, compare=compare, settings=settings)


class _progress:
    """A rich progress bar over images (to stderr) as a context manager yielding `advance(n)`."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self.bar = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"{self.label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )  # fmt: skip
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
