"""Pydantic models of a preset, one per concern; every ablation switch of docs/method.md is a field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every preset section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _check_range(pair: tuple[float, float], lo: float, hi: float, name: str) -> tuple[float, float]:
    a, b = pair
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {list(pair)}")
    return pair


class LoraConfig(Section):
    rank: int = Field(64, ge=1, description="LoRA rank.")
    alpha: float = Field(128.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    targets: list[str] | None = Field(
        None, description="Module names to adapt; null = the backbone's attention and feed-forward projections."
    )


class ModelConfig(Section):
    backbone: str = Field(
        "sd3", description="Backbone adapter (model family): sd3 (SD3, SD3.5), longcat (LongCat-Image), flux2-klein "
        "(FLUX.2 [klein] base), qwenimage (Qwen-Image), zimage (Z-Image), or a family an installed plugin registers "
        "(docs/adding-a-backbone.md).",
    )
    pretrained: str = Field(
        ..., description="Teacher: a hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers) or a local folder."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    resolution: int = Field(1024, ge=16, description="Training and sampling resolution in pixels (square).")
    train: Literal["full", "lora"] = Field("full", description="Train the full transformer or LoRA adapters.")
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="LoRA settings: of the student and fake teacher when train = lora, of the fake teacher when "
        "fake_teacher = lora.",
    )
    fake_teacher: Literal["full", "lora"] | None = Field(
        None,
        description="The fake teacher: a full trainable copy, or a LoRA adapter over the frozen teacher (no second "
        "copy of the weights and no optimizer state for them); null = like the student (train).",
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Mixed precision of the forward passes; master weights stay float32."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    checkpoint_every: int = Field(
        1, ge=1,
        description="With gradient_checkpointing: recompute the activations of every N-th transformer block (1 = "
        "every block, the least memory; 2 = half the blocks: about half the recompute, more activation memory).",
    )
    frozen_precision: Literal["compute", "fp32"] = Field(
        "compute",
        description="Weights of the frozen parts (the teacher; a LoRA run's base): in the compute dtype of "
        "`precision` (bf16: 2 bytes per parameter) or float32 (4 bytes; exactly the teacher's float32 weights under "
        "autocast). Trained weights always keep float32 masters.",
    )
    teacher_device: Literal["accelerator", "cpu"] = Field(
        "accelerator",
        description="Where the frozen teacher's weights live. cpu: in host memory, each transformer block copied to "
        "the GPU for its part of every teacher call (diffusers' group offloading; on CUDA the next block's copy "
        "overlaps the current block's compute): frees the teacher's GPU memory (2 bytes per parameter in bf16) for "
        "a host-to-device copy of it per call. Needs model.train full with a full fake teacher (a LoRA base is "
        "shared with trained networks) and, under FSDP2, parallel.teacher replicate.",
    )
    compile: bool = Field(
        False,
        description="Regional torch.compile: every transformer block (the backbone's block classes) is compiled in "
        "place and the compiled code reused by all blocks of its shape (GPU; on a CPU it mostly adds start-up time).",
    )
    attention_backend: Literal["flash", "efficient", "cudnn", "math"] | None = Field(
        None,
        description="PyTorch scaled-dot-product-attention kernel for every forward (torch.nn.attention.sdpa_kernel): "
        "flash, efficient (memory-efficient), cudnn or math; null = PyTorch's own choice per call.",
    )
    text_length: int | None = Field(
        None, ge=1, description="Max tokens of the long text encoder (SD3: T5, default 256); null = backbone default "
        "(LongCat: always 512, must stay null)."
    )

    @model_validator(mode="after")
    def _fake_teacher(self) -> "ModelConfig":
        if self.train == "lora" and self.fake_teacher == "full":
            raise ValueError("a LoRA student's fake teacher is an adapter over the same frozen base: "
                             "set model.fake_teacher to lora (or null)")
        if self.teacher_device == "cpu" and (self.train != "full" or self.fake_kind != "full"):
            raise ValueError("model.teacher_device cpu offloads the teacher's own weights, but under LoRA they are "
                             "shared with trained networks: set model.train and model.fake_teacher to full, or "
                             "model.teacher_device to accelerator")
        return self

    @property
    def fake_kind(self) -> str:
        """What the fake teacher is: 'full' (a trainable copy) or 'lora' (an adapter over the frozen base)."""
        return self.fake_teacher or self.train

    @field_validator("backbone")
    @classmethod
    def _registered_family(cls, v: str) -> str:
        from cdmctl.backbones import known_families

        families = known_families(v)
        if v not in families:
            raise ValueError(f"unknown model family '{v}'; registered families: {', '.join(sorted(families))}")
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"resolution must be a multiple of 16, got {v}")
        return v


class LossWeights(Section):
    ca: float = Field(1.0, ge=0, description="Weight of the CFG-augmentation loss (CA).")
    dm: float = Field(1.0, ge=0, description="Weight of the distribution-matching loss (DM).")
    cdm: float = Field(1.0, ge=0, description="Weight of the off-trajectory CDM loss.")
    guided_dm: float = Field(0.0, ge=0, description="Weight of DMD2's single guided DM loss.")

    @model_validator(mode="after")
    def _some_loss(self) -> "LossWeights":
        if not any((self.ca, self.dm, self.cdm, self.guided_dm)):
            raise ValueError("at least one loss weight must be positive")
        return self


class ScheduleConfig(Section):
    kind: Literal["fixed", "dynamic"] = Field("dynamic", description="Training schedule of the backward simulation.")
    levels: list[float] = Field(
        [1.0, 0.75, 0.5, 0.25], description="Fixed schedule (unshifted), strictly decreasing, starting at 1.0."
    )
    length: tuple[int, int] = Field((1, 28), description="Dynamic: range of the schedule length n (inclusive).")
    level_range: tuple[float, float] = Field(
        (0.25, 0.95), description="Dynamic: range [lo, hi] of the n - 1 inner levels (unshifted)."
    )
    inner: Literal["uniform", "stratified"] = Field(
        "uniform", description="Dynamic: inner levels i.i.d. uniform, or one draw per equal bin."
    )
    time_shift: bool = Field(True, description="Apply the backbone's own time shift to training levels.")
    coverage: float = Field(
        0.0, ge=0, le=1,
        description="Dynamic: fraction of inner levels spread evenly over the shifted range [shift(lo), shift(hi)] "
        "instead of drawn through the shift (which crowds them near 1); covers the low levels of many-step inference.",
    )

    @field_validator("levels")
    @classmethod
    def _decreasing(cls, v: list[float]) -> list[float]:
        if not v or v[0] != 1.0 or any(b >= a for a, b in zip(v, v[1:])) or v[-1] <= 0:
            raise ValueError(f"levels must start at 1.0 and strictly decrease to a value > 0, got {v}")
        return v

    @field_validator("length")
    @classmethod
    def _length(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not (1 <= v[0] <= v[1]):
            raise ValueError(f"length must satisfy 1 <= n_min <= n_max, got {list(v)}")
        return v

    @field_validator("level_range")
    @classmethod
    def _level_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 < v[0] <= v[1] < 1.0):
            raise ValueError(f"level_range must satisfy 0 < lo <= hi < 1, got {list(v)}")
        return v


# method name -> its family (docs/method.md): the CDM family trains against a fake teacher on student simulations;
# TBCM is continuous-time consistency distillation on the teacher's own trajectories (no fake teacher)
FAMILIES = {"cdm": "cdm", "cdm-fixed": "cdm", "ddmd": "cdm", "dmd2": "cdm", "tbcm": "tbcm"}
SAMPLERS = {"cdm": "euler", "tbcm": "consistency"}  # how a family's students sample (generate, eval, export)
# the rule of a family's unshifted sampling levels (cdmctl.samplers): evenly spaced in the flow level, or TBCM's
# authors' TrigFlow times (2 steps: t = [pi/2, 1.0]; n: linspace(pi/2, 0, n + 1)[:-1])
LEVEL_RULES = {"cdm": "uniform", "tbcm": "trigflow"}


def family_of(method_name: str) -> str:
    """The family of a method name (a resolved preset's `method.name`); older presets only name CDM methods."""
    return FAMILIES.get(method_name, "cdm")


def sampler_of(preset: dict) -> str:
    """'euler' or 'consistency': how the students of a resolved preset dict (a checkpoint's) are sampled."""
    return SAMPLERS[family_of(((preset or {}).get("method") or {}).get("name", "cdm"))]


def default_time_shift(family: str, schedule_time_shift: bool) -> bool:
    """`inference.time_shift` when a preset leaves it null: the CDM family samples through the backbone's shift
    exactly when it trained through it; TBCM on the authors' unshifted TrigFlow levels."""
    return schedule_time_shift if family == "cdm" else False


def sampling_of(preset: dict) -> tuple[str, str, bool]:
    """(sampler, level rule, time shift on) of the students of a resolved preset dict (a checkpoint's; one written
    before `inference.time_shift` existed gets its default)."""
    method, inference = (preset or {}).get("method") or {}, (preset or {}).get("inference") or {}
    family = family_of(method.get("name", "cdm"))
    shift = inference.get("time_shift")
    if shift is None:
        shift = default_time_shift(family, ((method.get("schedule") or {}).get("time_shift", True)))
    return SAMPLERS[family], LEVEL_RULES[family], bool(shift)


class TBCMConfig(Section):
    """TBCM (method tbcm): continuous-time consistency distillation on trajectory-sampled pairs (docs/method.md)."""

    route_steps: int = Field(
        16, ge=2, description="R: levels of the reference route, the teacher's own R-step schedule (its shift); each "
        "iteration draws one time per route interval and keeps R - 1 training points per prompt.",
    )
    route_end: float = Field(
        1e-3, gt=0, lt=1, description="1 / the teacher scheduler's num_train_timesteps: the route is its default "
        "R-step schedule, shift(linspace(1, shift(route_end), R)), as diffusers' FlowMatchEulerDiscreteScheduler.",
    )
    guidance: list[float] = Field(
        [4.0, 4.5, 5.0], min_length=1,
        description="Teacher CFG scales of the rollouts; each prompt draws one (all 1: no unconditional half).",
    )
    sigma_data: float = Field(
        0.5, gt=0, description="TrigFlow sigma_d: TrigFlow data = sigma_d x flow-space latent (latents of std ~1).",
    )
    tangent_warmup: int = Field(
        4000, ge=0, description="Student updates over which r rises linearly from 0 to 1 (0: r = 1 from the start).",
    )
    cooldown_start: int | None = Field(
        None, ge=0, description="Student update at which r starts falling to final_r (the TBCM code: 15000); null: never.",
    )
    cooldown_steps: int = Field(2000, ge=1, description="Student updates over which r falls to final_r.")
    final_r: float = Field(0.75, ge=0, le=1, description="r after the cool-down.")
    tangent_norm: float = Field(0.1, gt=0, description="c of the tangent normalisation g / (||g|| + c), per sample.")
    jvp: Literal["autograd", "finite-difference"] = Field(
        "autograd",
        description="dF/dt of the student: torch.func.jvp under the math SDPA kernel on the unwrapped module, or a "
        "central difference (two forwards of the wrapped module: works under DDP/FSDP2 and any attention kernel).",
    )
    jvp_eps: float = Field(
        3e-4, gt=0, description="Finite-difference JVP: step along the tangent (TrigFlow time moves by at most eps / 2); "
        "the error is O(eps^2) plus the forward's rounding / eps, so it needs float32 forwards.",
    )
    logvar_lr: float | None = Field(
        None, gt=0, description="Learning rate of the adaptive-weighting log-variance head; null = optim.student_lr.",
    )


class MethodConfig(Section):
    name: Literal["cdm", "cdm-fixed", "ddmd", "dmd2", "tbcm"] = Field(
        "cdm", description="Method label (see docs/method.md): cdm, cdm-fixed, ddmd, dmd2 (CDM family) or tbcm.")
    losses: LossWeights = Field(default_factory=LossWeights, description="Loss weights; any subset is an ablation.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Backward-simulation schedule.")
    guidance: float = Field(7.0, ge=0, description="Teacher guidance scale g used by CA and guided DM.")
    level_clamp: tuple[float, float] = Field(
        (0.02, 0.98), description="[s_min, s_max]: every sampled noise level is clamped to this range."
    )
    cdm_perturbation: Literal["velocity", "gaussian", "none"] = Field(
        "velocity", description="How the CDM point is moved off the trajectory."
    )
    cdm_target: Literal["local", "full-trajectory"] = Field(
        "local", description="CDM target: the local estimate x0e, or the simulation's final sample."
    )
    cdm_teacher_level: Literal["independent", "coupled"] = Field(
        "independent", description="CDM's teacher re-noise level sc: an independent draw (the method), or coupled: "
        "sc = se and, with the gaussian perturbation, the same noise (an ablation; development versions before 0.2.0 did this)."
    )
    ttur_ratio: int = Field(2, ge=1, description="Fake-teacher updates per student update (k).")
    simulation: Literal["per-iteration", "per-cycle"] = Field(
        "per-iteration",
        description="Backward simulations: one per iteration, or one per TTUR cycle recording a separate point per "
        "sample for each of its ttur_ratio iterations (the student is the same throughout a cycle; cheaper).",
    )
    merge_decay: float = Field(0.999, ge=0, le=1, description="After each fake step: F <- m F + (1 - m) G.")
    normaliser_floor: float = Field(0.1, gt=0, description="Lower clamp of the per-sample loss normaliser.")
    tbcm: TBCMConfig | None = Field(
        None, description="TBCM settings (method tbcm only; the CDM-family fields do not apply to it and `presets show` leaves them out).",
    )

    @property
    def family(self) -> str:
        """'cdm' (cdm, cdm-fixed, ddmd, dmd2) or 'tbcm'."""
        return family_of(self.name)

    def not_applicable(self) -> set[str]:
        """Fields this method ignores, left out of `cdmctl presets show` (they stay in the resolved preset)."""
        if self.family == "tbcm":
            return {n for n in type(self).model_fields if n not in ("name", "tbcm")}
        return {"tbcm"}

    @model_validator(mode="before")
    @classmethod
    def _tbcm_section(cls, data):
        # method tbcm always has its section (defaults unless given); it is filled before validation so that a
        # resolved preset shows every TBCM field
        if isinstance(data, dict) and data.get("name") == "tbcm" and data.get("tbcm") is None:
            data = {**data, "tbcm": {}}
        return data

    @field_validator("level_clamp")
    @classmethod
    def _clamp(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _check_range(v, 0.0, 1.0, "level_clamp")

    @model_validator(mode="after")
    def _consistent(self) -> "MethodConfig":
        if self.family != "tbcm" and self.tbcm is not None:
            raise ValueError(f"method.tbcm is TBCM's section; method {self.name} must leave it null")
        if self.family != "cdm":
            return self  # the checks below are about the CDM family's losses and schedules
        if self.name == "dmd2" and (self.losses.ca or self.losses.cdm or self.losses.dm):
            raise ValueError("method dmd2 uses only the guided DM loss: set losses.ca, losses.dm, losses.cdm to 0")
        if self.name != "dmd2" and self.losses.guided_dm:
            raise ValueError(f"losses.guided_dm is DMD2's loss; method {self.name} must leave it at 0")
        if self.name == "cdm" and self.schedule.kind != "dynamic":
            raise ValueError("method cdm uses the dynamic schedule; use method cdm-fixed for a fixed one")
        if self.name != "cdm" and self.schedule.kind != "fixed":
            raise ValueError(f"method {self.name} trains on the fixed schedule (schedule.kind = fixed)")
        if self.name in ("ddmd", "dmd2") and self.losses.cdm:
            raise ValueError(f"method {self.name} has no CDM loss: set losses.cdm to 0")
        return self


class OptimConfig(Section):
    student_lr: float = Field(1e-5, gt=0, description="Student AdamW learning rate.")
    fake_lr: float = Field(5e-6, gt=0, description="Fake-teacher AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (the paper's text says 1e-3).")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up, counted in each optimizer's own steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After the warm-up: constant, or a half cosine down to lr_floor x the rate at the run's "
        "last iteration (train.iterations; each optimizer over its own steps).",
    )
    lr_floor: float = Field(0.1, ge=0, le=1, description="cosine: the final learning rate as a share of the peak.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip for both networks.")
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit"] = Field(
        "adamw",
        description="adamw: torch's (fused on CUDA). adamw-8bit / paged-adamw-8bit: bitsandbytes' AdamW with 8-bit "
        "states (a quarter of the memory of AdamW's moments; paged: moved to host memory under GPU memory pressure); "
        "needs `pip install bitsandbytes` and a CUDA GPU.",
    )
    ema: bool = Field(True, description="Keep an EMA of the student (decay min((1+k)/(10+k), ema_max_decay)).")
    ema_max_decay: float = Field(0.999, ge=0, le=1, description="Upper bound of the student EMA decay.")
    ema_device: Literal["accelerator", "cpu"] = Field(
        "accelerator", description="Where the float32 EMA lives; cpu frees GPU memory (7.6 GiB for SD3-Medium)."
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v


class TrainConfig(Section):
    iterations: int = Field(
        4000, ge=1, description="Iterations. CDM family: fake-teacher updates, the student's every ttur_ratio; tbcm: one "
        "teacher rollout and one student update each.",
    )
    batch_size: int = Field(128, ge=1, description="Global batch size (split across processes).")
    seed: int = Field(0, ge=0, description="Base seed; every draw is derived from (seed, iteration, rank).")
    max_nonfinite: int = Field(20, ge=1, description="Stop after this many skipped non-finite steps in a row.")


class DataConfig(Section):
    prompts: str = Field(..., description="Training prompts: a .txt file (one per line) or .jsonl with 'prompt'.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["a photo of a cat", "a red car on a bridge", "a bowl of fruit", "a lighthouse"],
        description="Fixed prompts for the periodic sample grids.",
    )
    sample_seed: int = Field(0, ge=0, description="Seed of the sample grids' noise (fixed for the whole run).")
    cache_embeddings: bool = Field(
        True, description="Encode every prompt once into the on-disk embedding cache (all ranks in parallel, reused "
        "by later runs, memory-mapped: host memory does not grow with the prompt count) and free the text encoders; "
        "false = encode each batch's prompts as it comes (the text encoders stay loaded)."
    )
    embedding_cache: str | None = Field(
        None, description="Folder of the embedding cache; null = $CDMCTL_CACHE/embeddings (~/.cache/cdmctl). "
        "Several nodes must see one shared folder."
    )
    cache_shard_mb: float = Field(256.0, gt=0, description="Target size of one cache shard file (MiB).")
    encode_batch_size: int = Field(32, ge=1, description="Prompts per text-encoder call while filling the cache.")


class ParallelConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto",
        description="How several processes share the work. ddp: every rank holds every weight. fsdp2: accelerate's "
        "FSDP2, each transformer block of the student and fake teacher (weights, gradients, optimizer states, EMA) "
        "sharded over the ranks, float32 masters and bf16 compute. auto: fsdp2 when accelerate's config says "
        "distributed_type FSDP, else ddp. One process: neither.",
    )
    teacher: Literal["shard", "replicate"] = Field(
        "shard",
        description="fsdp2 only: the frozen teacher sharded like the others (least memory; each of its calls gathers "
        "its weights) or a full bf16 copy on every rank (no communication for its calls, if it fits).",
    )
    load: Literal["rank0", "every-rank"] = Field(
        "rank0",
        description="Several processes: rank0 = only rank 0 reads the weights (transformer, text encoders, VAE); every "
        "other rank builds them empty (on the meta device) and receives rank 0's weights over the process group, "
        "straight into its device memory (host memory does not grow with the ranks). Under fsdp2 rank 0 holds the "
        "networks in host memory and each rank receives only its shards of them. every-rank = each rank reads the "
        "files itself (as earlier versions did: one host copy per rank, no broadcast).",
    )
    timeout_s: int = Field(
        600, ge=10,
        description="Several processes: how long a rank waits in one collective (a gradient reduce, a barrier) for "
        "the others before it stops with an error. Bounds how long the survivors of a hung or lost rank wait when "
        "no launcher stops them (torchrun and accelerate launch stop them at once). Raise it if the prompt cache is "
        "built while another run builds the same one.",
    )


class InferenceConfig(Section):
    steps: int = Field(4, ge=1, description="Recommended student steps.")
    levels: list[float] | None = Field(
        None, description="Inference schedule (unshifted); null = the method's levels for `steps`: evenly spaced from "
        "1 (e.g. 4: 1, .75, .5, .25), TBCM the authors' TrigFlow times (2: t = pi/2, 1.0; n: linspace(pi/2, 0, n+1)).",
    )
    time_shift: bool | None = Field(
        None, description="Sample through the backbone's time shift (sample grids, generate, eval, export, the proving "
        "ground); false = at the unshifted levels (shift 1). null = the method's own: the CDM family as it trained "
        "(method.schedule.time_shift, normally true), TBCM false (the authors' levels are unshifted).",
    )

    def schedule(self, rule: str = "uniform") -> list[float]:
        """The unshifted levels of the recommended `steps` under the family's level `rule` (cdmctl.samplers)."""
        from cdmctl.samplers import unshifted_levels

        return self.levels or unshifted_levels(rule, self.steps)


class RunConfig(Section):
    output_dir: str = Field("runs/{preset}", description="Run folder; {preset} is replaced by the preset name.")
    log_every: int = Field(10, ge=1, description="Iterations between metric log lines.")
    sample_every: int = Field(500, ge=0, description="Iterations between sample grids (0 = only at the end).")
    checkpoint_every: int = Field(500, ge=0, description="Iterations between checkpoints (0 = only at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="How many recent checkpoints to keep.")
    trackers: list[str] = Field(
        default_factory=list, description="accelerate trackers to log to as well as metrics.jsonl (tensorboard, wandb, "
        "mlflow, aim, ...; main process only); their logs go under RUN/trackers. `--trackers` on distill sets it.",
    )
    optional_trackers: list[str] = Field(
        default_factory=list, description="Trackers used when their package is installed and skipped (with a note) "
        "when it is not (the demo: tensorboard).",
    )


def parse_selection(select: str) -> tuple[str, int]:
    """`precision@4` -> ('precision', 4): the metric and the step count whose score picks the best checkpoint."""
    metric, _, steps = select.partition("@")
    if not metric or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"select must read METRIC@STEPS, e.g. precision@4, got '{select}'")
    return metric.strip().lower(), int(steps)


class EvalConfig(Section):
    """Evaluation of the student while it trains (cdmctl/trainingeval.py): fixed prompts and seeds, scored every
    `every` iterations; the selected score keeps the best checkpoint."""

    enabled: bool = Field(False, description="Evaluate during training.")
    every: int = Field(500, ge=1, description="Iterations between evaluations (and one at the end).")
    prompts: str = Field(
        "pickscore-test", description="A named prompt set (pickscore-test, dpg-bench, ...), builtin:NAME or a .txt/.jsonl file.",
    )
    limit: int | None = Field(64, ge=1, description="Use only the first N prompts (keep evaluation small); null = all.")
    steps: list[int] = Field([4], min_length=1, description="Student step counts to evaluate, e.g. [1, 2, 4, 8].")
    metrics: list[str] = Field(
        ["clipscore"], min_length=1, description="Registered metrics (clipscore, pickscore, hpsv3, ...; on the toy "
        "teacher the proving ground's ground-truth precision, coverage, mmd2, adherence).",
    )
    samples_per_prompt: int = Field(1, ge=1, description="Images per prompt.")
    seed: int = Field(0, ge=0, description="Base seed: image j of prompt i uses seed + i * samples_per_prompt + j, as "
                      "`cdmctl eval --seed` does.")  # fmt: skip
    batch_size: int = Field(8, ge=1, description="Images per pipeline call (as `cdmctl eval --batch-size`).")
    select: str | None = Field(
        None, description="METRIC@STEPS whose score picks the best checkpoint (e.g. precision@4; its direction is the "
        "metric's); null = no best checkpoint.",
    )
    decline_threshold: float = Field(
        0.05, ge=0, description="Warn when the selected score is this much (in its own units) worse than its best.",
    )
    stop_after_decline: int | None = Field(
        None, ge=1, description="Stop the run after this many evaluations in a row without a new best; null = never.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"steps must be distinct counts >= 1, got {v}")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        return [m.strip().lower() for m in v]

    @model_validator(mode="after")
    def _selection_is_evaluated(self) -> "EvalConfig":
        if self.select is None:
            if self.stop_after_decline is not None:
                raise ValueError("stop_after_decline needs select (the score whose decline stops the run)")
            return self
        metric, steps = parse_selection(self.select)
        if metric not in self.metrics:
            raise ValueError(f"select names {metric}, which eval.metrics ({', '.join(self.metrics)}) does not evaluate")
        if steps not in self.steps:
            raise ValueError(f"select names {steps} steps, which eval.steps ({self.steps}) does not evaluate")
        return self


class Preset(Section):
    """A complete, validated distillation recipe."""

    name: str = Field("custom", description="Preset name (used in the run folder name).")
    description: str = Field("", description="One line on what this preset is for.")
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _inference_time_shift(self) -> "Preset":
        if self.inference.time_shift is None:  # resolved, so that a run folder's preset says how it samples
            self.inference.time_shift = default_time_shift(self.method.family, self.method.schedule.time_shift)
        return self

    @model_validator(mode="after")
    def _merge_needs_shared_parameters(self) -> "Preset":
        if self.model.train == "full" and self.model.fake_kind == "lora" and self.method.merge_decay < 1:
            raise ValueError("method.merge_decay < 1 mixes the student into the fake teacher, but a LoRA fake teacher "
                             "shares no parameters with a fully trained student: set method.merge_decay to 1")
        return self
