"""Turn a run's checkpoint into a self-contained diffusers pipeline folder (or a diffusers LoRA file) + cdmctl.json."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cdmctl.config.schema import sampler_of
from cdmctl.engine.checkpoint import find_checkpoint, load_weights, verify_checkpoint
from cdmctl.errors import UserError
from cdmctl.outputs import check_not_file, reporting_disk_full

INFO_FILE = "cdmctl.json"
INFO_FORMAT = 1
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name for load_lora_weights
LORA_PREFIX = "transformer"  # the pipeline component a LoRA file's keys belong to
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PEFT_PREFIX = "base_model.model."  # keys of a PeftModel-wrapped transformer carry this prefix


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: diffusers renamed `torch_dtype` to `dtype` (the old name warns)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or a torch.dtype) -> torch.dtype; UserError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype '{name}'", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[key]


# ----------------------------------------------------------------------------- the student's weights


def inference_levels(preset: dict[str, Any]) -> tuple[int, list[float]]:
    """(recommended steps, unshifted inference schedule) of a resolved preset dict."""
    inference = preset.get("inference") or {}
    steps = int(inference.get("steps") or 4)
    levels = inference.get("levels") or [1.0 - i / steps for i in range(steps)]
    return len(levels), [float(s) for s in levels]


def lora_config_from(state: dict[str, torch.Tensor], lora: dict[str, Any] | None) -> Any:
    """A peft LoraConfig matching an adapter state dict: rank from the shapes, alpha from the manifest.

    The target modules are the exact module names present in the state dict, so the config adapts
    exactly the layers that were trained, whatever the training preset's target list was.
    """
    from peft import LoraConfig

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
    if not modules:
        raise UserError("the checkpoint's LoRA weights hold no lora_A/lora_B tensors", "use another checkpoint")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    rank = int((lora or {}).get("rank") or max(ranks))
    alpha = float((lora or {}).get("alpha") or rank)
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)


def adapter_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors as get_peft_model_state_dict writes them for the bare transformer.

    Also accepts a whole peft-wrapped state dict: the PeftModel prefix, the adapter name
    (`lora_A.default.weight`) and the frozen base weights are dropped.
    """
    state = {}
    for key, value in weights.items():
        if ".lora_" not in key:
            continue
        key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        state[re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)] = value
    return state


def apply_student(transformer: torch.nn.Module, weights: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Put checkpoint `weights` into the base `transformer` in place.

    Full runs: strict load_state_dict. LoRA runs: attach the adapter with peft, load it (every
    adapter tensor must find its layer), merge it into the base weights in float32, drop the
    LoRA layers, and restore the transformer's dtype.
    """
    if manifest.get("train", "full") != "lora":
        try:
            transformer.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise UserError(
                f"the checkpoint's weights do not fit the base model {manifest.get('base_model')}: {str(exc)[:300]}",
                "export with the base model the run was trained from",
            ) from exc
        return
    from peft import set_peft_model_state_dict

    state = adapter_state(weights)
    dtype = next(transformer.parameters()).dtype
    if dtype != torch.float32:
        transformer.to(torch.float32)  # merge in full precision, then cast back
    transformer.add_adapter(lora_config_from(state, manifest.get("lora")), adapter_name="default")
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise UserError(
            f"{len(result.unexpected_keys)} LoRA tensors do not fit the base model (e.g. {result.unexpected_keys[0]})",
            "export with the base model the run was trained from",
        )
    transformer.fuse_lora()
    transformer.unload_lora()
    if dtype != torch.float32:
        transformer.to(dtype)


def student_pipeline(
    checkpoint: Path, ema: bool = True, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    verified: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A checkpoint -> (the family's diffusers pipeline with the student's transformer, manifest).

    Every file of the checkpoint is checked against its hash first, unless the caller already did and passes
    `verified` (what `verify_checkpoint` returned), so nothing is hashed twice. The base model is loaded
    exactly as training loaded it (same backbone adapter, source and revision); the pipeline's scheduler is
    made to match the training time shift.
    """
    from cdmctl.backbones import load_backbone

    manifest = verified if verified is not None else verify_checkpoint(checkpoint)
    weights = load_weights(checkpoint, weight_choice(manifest, ema), verify=False)  # verified above
    family, base = manifest["backbone"], manifest["base_model"]
    backbone = load_backbone(family, base, revision=manifest.get("revision"), dtype=dtype)
    apply_student(backbone.transformer, weights, manifest)
    try:
        pipe = backbone.pipeline(backbone.transformer)
    except (NotImplementedError, AttributeError) as exc:
        raise UserError(f"backbone '{family}' has no diffusers pipeline", "export a diffusers backbone's run") from exc
    sample_as_trained(pipe, type(backbone), manifest.get("preset") or {})
    return pipe.to(device), manifest


def sample_as_trained(pipe: Any, family: type, preset: dict[str, Any]) -> None:
    """Make a family's pipeline sample a student as it was trained (time shift, sampler, few-step config); the
    same for an exported checkpoint and for the live student that training evaluates."""
    match_training_shift(pipe, preset)
    match_training_sampler(pipe, preset)
    # what the family's pipeline config says of a few-step student (FLUX.2 [klein]: is_distilled, guidance ignored)
    pipe.register_to_config(**family.student_pipeline_config())


def weight_choice(manifest: dict[str, Any], ema: bool) -> str:
    """'ema' or 'student'; a clear error when EMA was asked for but the run kept none."""
    if ema and "ema" not in manifest.get("files", {}):
        raise UserError("this run has no EMA weights (optim.ema was off)", "use the raw student weights with --no-ema")
    return "ema" if ema else "student"


def match_training_shift(pipe: Any, preset: dict[str, Any]) -> None:
    """A run trained without the time shift samples without it: give the scheduler shift 1."""
    schedule = (preset.get("method") or {}).get("schedule") or {}
    if schedule.get("time_shift", True) is False:
        config = dict(pipe.scheduler.config)
        config.update(shift=1.0, use_dynamic_shifting=False)
        pipe.scheduler = type(pipe.scheduler).from_config(config)


def match_training_sampler(pipe: Any, preset: dict[str, Any]) -> None:
    """A TBCM student samples with sCM's consistency sampler: in flow coordinates x0 = x - s v, then fresh noise
    at the next level, which is diffusers' FlowMatchEulerDiscreteScheduler with stochastic_sampling (exact: the
    student is a flow-matching network, its TrigFlow F a reparametrisation of its velocity)."""
    if sampler_of(preset) != "consistency":
        return
    config = dict(pipe.scheduler.config)
    if "stochastic_sampling" not in inspect.signature(type(pipe.scheduler).__init__).parameters:
        raise UserError(f"the base model's scheduler {type(pipe.scheduler).__name__} has no stochastic_sampling, "
                        "which a TBCM student's consistency sampler needs",
                        "use a base model whose scheduler is FlowMatchEulerDiscreteScheduler")  # fmt: skip
    config.update(stochastic_sampling=True)
    pipe.scheduler = type(pipe.scheduler).from_config(config)


# ----------------------------------------------------------------------------- export


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | int = "latest",
    ema: bool = True,
    dtype: str = "fp32",
    lora_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the run's student as a diffusers folder at `out` and return it.

    Default: a full pipeline (student transformer + the base model's other parts, LoRA merged)
    loadable with `DiffusionPipeline.from_pretrained(out)`. `lora_only`: just the adapter as
    `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(out)`. Either way `cdmctl.json`
    records the recommended sampling settings and the source run. Everything is checked before
    anything is written; the folder is built under a temporary name and renamed when complete.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_output(out, run_dir, overwrite)
    ckpt = find_checkpoint(run_dir, checkpoint)
    manifest = verify_checkpoint(ckpt)  # every file against its hash, before anything is written
    torch_dtype = parse_dtype(dtype)
    which = weight_choice(manifest, ema)
    if lora_only and manifest.get("train", "full") != "lora":
        raise UserError("--lora-only needs a LoRA run, but this run trained the full transformer", "drop --lora-only")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with reporting_disk_full(out):  # the half-written folder is removed below, before the error is told
        try:
            if lora_only:
                write_lora(tmp, load_weights(ckpt, which, verify=False), manifest, torch_dtype)  # verified above
            else:
                pipe, _ = student_pipeline(ckpt, ema=ema, dtype=torch_dtype, verified=manifest)
                pipe.save_pretrained(str(tmp), safe_serialization=True)
                copy_unused_parts(manifest, tmp)
            kind = "lora" if lora_only else "pipeline"
            info = export_info(run_dir, ckpt, manifest, which, DTYPE_NAMES[torch_dtype], kind)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def check_output(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` (unless overwrite) and any `out` that holds the run itself."""
    check_not_file(out)
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise UserError(f"--out {out} would replace the run folder {run_dir}", "export to a folder outside the run")
    if (out.is_file() or (out.is_dir() and any(out.iterdir()))) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty", "choose another --out, or add --overwrite")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an old `out` is removed only after the new one is in place."""
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def write_lora(folder: Path, weights: dict[str, torch.Tensor], manifest: dict[str, Any], dtype: torch.dtype) -> None:
    """The adapter in diffusers' LoRA format (keys and LoraConfig metadata under `transformer.`, as a pipeline's
    save_lora_weights writes them), so that alpha survives. Written by diffusers' own writer for every family:
    `pipe.transformer.load_lora_adapter(folder, prefix="transformer")` loads it on any base, and pipelines with
    a LoRA loader (SD3) also take `pipe.load_lora_weights(folder)`."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    state = {k: v.to(dtype) for k, v in adapter_state(weights).items()}
    config = lora_config_from(state, manifest.get("lora")).to_dict()
    metadata = {f"{LORA_PREFIX}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    folder.mkdir(parents=True)
    LoraBaseMixin.write_lora_layers(
        state_dict=LoraBaseMixin.pack_weights(state, LORA_PREFIX), save_directory=str(folder), is_main_process=True,
        weight_name=LORA_WEIGHT_NAME, save_function=None, safe_serialization=True, lora_adapter_metadata=metadata,
    )  # fmt: skip


def copy_unused_parts(manifest: dict[str, Any], folder: Path) -> None:
    """Parts of the base pipeline that cdmctl never loads (the family's `unused_parts`, e.g. LongCat's text
    processor) are copied from the base model as they are, so that the export is as complete as the base."""
    from cdmctl.backbones import adapter_class

    parts = adapter_class(manifest["backbone"]).unused_parts
    if not parts:
        return
    base, index = base_folder(manifest, parts), folder / "model_index.json"
    base_index, ours = json.loads((base / "model_index.json").read_text()), json.loads(index.read_text())
    for part in parts:
        entry = base_index.get(part)
        if not (isinstance(entry, list) and entry[0] is not None and (base / part).is_dir()):
            continue
        shutil.copytree(base / part, folder / part, dirs_exist_ok=True)
        ours[part] = entry
    index.write_text(json.dumps(ours, indent=2, sort_keys=True) + "\n")


def base_folder(manifest: dict[str, Any], parts: tuple[str, ...]) -> Path:
    """The base model as a local folder holding `parts` (a hub model: the hub cache's snapshot of them)."""
    from cdmctl.backbones import resolve_source

    source = resolve_source(str(manifest["base_model"]))
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        patterns = ["model_index.json", *(f"{part}/*" for part in parts)]
        return Path(snapshot_download(source, revision=manifest.get("revision"), allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        raise UserError(f"cannot read the base model {source}: {exc}", "check that it is reachable") from exc


def export_info(
    run_dir: Path, ckpt: Path, manifest: dict[str, Any], which: str, dtype: str, kind: str
) -> dict[str, Any]:
    """The contents of cdmctl.json: how to sample this student and where it came from."""
    from cdmctl import __version__
    from cdmctl.backbones import adapter_class

    preset = manifest.get("preset") or {}
    steps, levels = inference_levels(preset)
    sampler = sampler_of(preset)
    usage = ("pipe(prompt, sigmas=levels, num_inference_steps=len(levels), **guidance_kwargs, **pipeline_kwargs"
             "[, max_sequence_length=...]); the levels are unshifted: the pipeline's scheduler applies the model's "
             "time shift to them, as in training")
    if sampler == "consistency":
        usage += ("; the scheduler's stochastic_sampling (sCM's consistency sampler) draws its fresh noise from "
                  "torch's global generator, which the pipeline's generator= does not seed: torch.manual_seed(...) first")
    return {
        "format": INFO_FORMAT,
        "kind": kind,
        "cdmctl_version": __version__,
        "backbone": manifest.get("backbone"),
        "base_model": manifest.get("base_model"),
        "revision": manifest.get("revision"),
        "steps": steps,
        "levels": levels,
        "sampler": sampler,
        "usage": usage,
        "guidance_scale": 1.0,
        # no CFG, in the family's own call arguments (Z-Image: guidance_scale 0; Qwen-Image: true_cfg_scale 1)
        "guidance_kwargs": adapter_class(manifest["backbone"]).guidance_kwargs(1.0),
        # the family's own call arguments (LongCat: prompt rewriting off, as in training)
        "pipeline_kwargs": adapter_class(manifest["backbone"]).sampling_kwargs(),
        # the long text encoder's token count in training (SD3: T5); pass it to the pipeline when set
        "max_sequence_length": (preset.get("model") or {}).get("text_length"),
        "resolution": (preset.get("model") or {}).get("resolution"),
        "dtype": dtype,
        "weights": which,
        "train": manifest.get("train", "full"),
        "lora": manifest.get("lora"),
        "source": {
            "run": str(Path(run_dir).resolve()),
            "checkpoint": ckpt.name,
            "iteration": manifest.get("iteration"),
            "student_step": manifest.get("student_step"),
        },
        "preset": preset,
    }


def read_info(folder: str | Path) -> dict[str, Any]:
    """cdmctl.json of an exported folder ({} when absent, e.g. a model not made by cdmctl)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON", "re-export the model, or delete the file") from exc
