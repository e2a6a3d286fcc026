"""Turn a run's checkpoint into a self-contained diffusers pipeline folder (or a diffusers LoRA file) + cdmctl.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cdmctl.config.schema import sampling_of
from cdmctl.engine.checkpoint import find_checkpoint, load_weights, verify_checkpoint
from cdmctl.errors import UserError
from cdmctl.outputs import check_not_file, reporting_disk_full

# The export folder's format and the student's loading live below both export and generate; names that callers
# (and the tests) have always imported from here stay importable from here.
from cdmctl.studentload import (  # noqa: F401
    DTYPE_NAMES,
    INFO_FILE,
    INFO_FORMAT,
    LORA_PREFIX,
    LORA_WEIGHT_NAME,
    adapter_state,
    inference_levels,
    lora_config_from,
    parse_dtype,
    read_info,
    sample_as_trained,
    student_pipeline,
    weight_choice,
)


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
    sampler, rule, time_shift = sampling_of(preset)
    usage = ("pipe(prompt, sigmas=levels, num_inference_steps=len(levels), **guidance_kwargs, **pipeline_kwargs"
             "[, max_sequence_length=...]); the levels are unshifted: the pipeline's scheduler applies the model's "
             "time shift to them, as in training" if time_shift else
             "pipe(prompt, sigmas=levels, num_inference_steps=len(levels), **guidance_kwargs, **pipeline_kwargs"
             "[, max_sequence_length=...]); the scheduler has shift 1: it samples at the levels as given")
    usage += (f"; other step counts: the '{rule}' levels of cdmctl.samplers.unshifted_levels"
              + (" (TrigFlow t = [pi/2, 1.0] for 2 steps, linspace(pi/2, 0, n + 1)[:-1] for n; s = sin t / (sin t + "
                 "cos t))" if rule == "trigflow" else " (1, 1 - 1/n, ..., 1/n)"))
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
        "level_rule": rule,  # the levels of other step counts (cdmctl.samplers.unshifted_levels)
        "time_shift": time_shift,  # false: the scheduler's shift is 1 (the levels are sampled as given)
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
