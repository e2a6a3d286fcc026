"""`cdmctl generate`: a student's few-step images and, beside them, its teacher's, as PNGs with their settings."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cdmctl.backbones.loading import dtype_kwarg
from cdmctl.errors import UserError
from cdmctl.outputs import reporting_disk_full

# A student, and opening one, live below this command; the names callers (and the tests) have always imported from
# here stay importable from here.
from cdmctl.openmodel import open_model  # noqa: F401
from cdmctl.student import Student, check_levels, run_pipeline  # noqa: F401

GRID_FILE = "grid.png"
COMPARE_FILE = "compare.png"


# ----------------------------------------------------------------------------- checking the arguments


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
    from cdmctl.samplers import sampler_levels, timestep_kwargs

    teacher_pipe = teacher_pipeline(student, teacher, scheduler, shift)
    # Same prompt encoding as the student (and as the teacher saw in training).
    defaults = student.teacher_defaults()
    n = int(defaults["num_inference_steps"] if steps is None else steps)
    sampler = teacher_pipe.scheduler
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
        raise UserError(f"--scheduler {scheduler} does not fit {type(teacher_pipe).__name__}: {exc}",
                        "use --scheduler euler or unipc") from exc  # fmt: skip


def teacher_pipeline(student: Student, teacher: str | None, scheduler: str | None, shift: float | None) -> Any:
    """The student's pipeline with the teacher's transformer (from `teacher`, else the student's base model) and
    a deterministic scheduler, or the training-free sampler `scheduler` and/or static time shift `shift`."""
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
    from cdmctl.samplers import make_scheduler

    base = deterministic_scheduler(pipe.scheduler)
    sampler = make_scheduler(scheduler, shift, base) if scheduler is not None or shift is not None else base
    components = {**pipe.components, "transformer": transformer.to(student.device), "scheduler": sampler}
    return type(pipe)(**components)


def deterministic_scheduler(scheduler: Any) -> Any:
    """The scheduler without stochastic sampling: how a teacher samples beside a consistency-sampled student."""
    if not scheduler.config.get("stochastic_sampling"):
        return scheduler
    return type(scheduler).from_config({**scheduler.config, "stochastic_sampling": False})




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
        teacher_images = write_teacher(student, all_prompts, seeds, size, out / "teacher", teacher=teacher,
                                       steps=teacher_steps, guidance=teacher_guidance, scheduler=teacher_scheduler,
                                       shift=teacher_shift, batch_size=batch_size, progress=progress)  # fmt: skip
        compare = write_comparison(images, teacher_images, out / COMPARE_FILE)
    return GenerateResult(images=paths, grid=out / GRID_FILE, compare=compare, settings=settings)


def write_teacher(student: Student, prompts: list[str], seeds: list[int], size: tuple[int, int], out: Path, *,
                  teacher: str | None, steps: int | None, guidance: float | None, scheduler: str | None,
                  shift: float | None, batch_size: int, progress: bool) -> list[Any]:  # fmt: skip
    """The teacher's images of the same prompts and seeds (`sample_teacher`), written to `out` with its settings."""
    with _progress(progress, len(prompts), "teacher") as advance:
        images = sample_teacher(
            student, prompts, seeds, teacher=teacher, steps=steps, guidance=guidance,
            height=size[0], width=size[1], batch_size=batch_size, progress=advance, scheduler=scheduler,
            shift=shift,
        )  # fmt: skip
    defaults = student.teacher_defaults()
    settings = {
        "model": teacher or student.base_model, "steps": steps or defaults["num_inference_steps"],
        "guidance_scale": defaults["guidance_scale"] if guidance is None else guidance,
        "height": size[0], "width": size[1], "sampler": scheduler or "pipeline default",
        "shift": "model default" if shift is None else shift, "generator": "cdmctl",
        **student.call_kwargs(),
    }  # fmt: skip
    write_images(images, prompts, seeds, settings, out)
    return images


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
