"""Loading a distilled student, shared by export and generate: a checkpoint's weights put into its family's
diffusers pipeline, a pipeline folder or hub id without the parts it never uses, the export folder's format
(cdmctl.json, the LoRA file) and dtypes."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch

from cdmctl.backbones.loading import dtype_kwarg
from cdmctl.config.schema import sampler_of, sampling_of
from cdmctl.engine.checkpoint import load_weights, verify_checkpoint
from cdmctl.errors import UserError

INFO_FILE = "cdmctl.json"
INFO_FORMAT = 1
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name for load_lora_weights
LORA_PREFIX = "transformer"  # the pipeline component a LoRA file's keys belong to
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PEFT_PREFIX = "base_model.model."  # keys of a PeftModel-wrapped transformer carry this prefix


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
    """(recommended steps, unshifted inference schedule) of a resolved preset dict: its levels, else its method's
    level rule for its steps (TBCM: the TrigFlow levels)."""
    from cdmctl.samplers import unshifted_levels

    inference = preset.get("inference") or {}
    steps = int(inference.get("steps") or 4)
    levels = inference.get("levels") or unshifted_levels(sampling_of(preset)[1], steps)
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
    """A student that samples without the time shift (inference.time_shift false; by default a CDM run trained
    without it, and TBCM) gets a scheduler of shift 1, so that plain diffusers samples at its levels as given."""
    if not sampling_of(preset)[2]:
        from cdmctl.samplers import build

        pipe.scheduler = build(type(pipe.scheduler), dict(pipe.scheduler.config), 1.0)


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
    from cdmctl.samplers import build

    # through `build`: a config that lacks the key (SD3's on the hub) lists it in _use_default_values, and
    # from_config would quietly drop the setting
    pipe.scheduler = build(type(pipe.scheduler), {**config, "stochastic_sampling": True}, None)


def read_info(folder: str | Path) -> dict[str, Any]:
    """cdmctl.json of an exported folder ({} when absent, e.g. a model not made by cdmctl)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON", "re-export the model, or delete the file") from exc


# ----------------------------------------------------------------------------- any diffusers pipeline


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


def load_text_encoders(pipe: Any, source: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """Put into `pipe` the text encoders it was loaded without (`load_pipeline(text_encoders=False)`), from
    `source`, the model they belong to; nothing when it has them all."""
    from diffusers import DiffusionPipeline

    missing = [name for name, part in pipe.components.items() if is_text_encoder(name) and part is None]
    index = DiffusionPipeline.load_config(source, revision=revision) if missing else {}
    missing = [name for name in missing if (index.get(name) or [None])[0] is not None]  # the model has them
    if not missing:
        return
    others = [part for part in index if not part.startswith("_") and part not in missing]
    loaded = DiffusionPipeline.from_pretrained(source, revision=revision, **dict.fromkeys(others),
                                               **dtype_kwarg(dtype))  # fmt: skip
    pipe.register_modules(**{name: loaded.components[name].to(device) for name in missing})
