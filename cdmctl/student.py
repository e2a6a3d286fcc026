"""A loaded few-step student: its diffusers pipeline, the schedule it samples on, and the seeded pipeline calls
that turn prompts into images."""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cdmctl.errors import UserError
from cdmctl.studentload import is_text_encoder, load_text_encoders

DEFAULT_STEPS = 4


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
        load_text_encoders(self.pipe, self.text_source, self.text_revision, self.dtype, self.device)

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

