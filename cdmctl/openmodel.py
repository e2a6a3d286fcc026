"""Open a student from wherever it lives: an exported folder, a LoRA-only export, a run folder's checkpoint, a hub
id or a built-in model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cdmctl.backbones.loading import HUB_ID
from cdmctl.config.schema import sampling_of
from cdmctl.errors import UserError
from cdmctl.student import DEFAULT_STEPS, Student
from cdmctl.studentload import INFO_FILE, inference_levels, load_pipeline, parse_dtype, read_info


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
        student = _from_folder(path, model, checkpoint, ema, torch_dtype, text_encoders)
    elif HUB_ID.match(str(model)) and ".." not in str(model):
        student = _from_hub(str(model), torch_dtype, text_encoders)
    else:
        raise UserError(f"model {model} not found", "give an exported folder, a run folder or a hub id (owner/name)")
    student.pipe.to(device)
    return student


def _from_folder(path: Path, model: str, checkpoint: str | int, ema: bool, dtype: torch.dtype,
                 text_encoders: bool) -> Student:  # fmt: skip
    """A local folder: an exported pipeline, a run folder (its checkpoint) or a LoRA-only export."""
    if not path.is_dir():
        raise UserError(f"--model {model} is a file", "point at an exported folder, a run folder or a hub id")
    if (path / "model_index.json").is_file():
        return _from_pipeline(str(path), read_info(path), dtype, str(path), text_encoders)
    if (path / "checkpoints").is_dir() or (path / "preset.yaml").is_file():
        return _from_run(path, checkpoint, ema, dtype)
    if read_info(path).get("kind") == "lora":
        return _from_lora(str(path), read_info(path), dtype, str(path), text_encoders)
    raise UserError(
        f"{model} is neither an exported model (model_index.json) nor a run folder (checkpoints/)",
        "export a run with `cdmctl export RUN --out DIR`, or point at the run folder",
    )


def student_of(pipe: Any, model: str, info: dict[str, Any], text_source: str, text_revision: str | None = None) -> Student:
    """A Student over a loaded `pipe`, sampling as `info` (cdmctl.json's fields) recommends. `text_source` (and its revision): where the pipeline's text encoders came from (the embedding cache's key)."""
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


def _from_pipeline(source: str, info: dict[str, Any], dtype: torch.dtype, model: str, text_encoders: bool = True) -> Student:
    try:
        pipe = load_pipeline(source, dtype, text_encoders=text_encoders)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for a bad folder or id
        raise UserError(f"cannot load {source} as a diffusers pipeline: {exc}", "check the folder or hub id") from exc
    return student_of(pipe, model, info, source)


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
    return student_of(pipe, model, info, base, info.get("revision"))


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
    return student_of(pipe, f"{run_dir}@{ckpt.name}:{'ema' if ema else 'student'}", info, manifest["base_model"],
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
