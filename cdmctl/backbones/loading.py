"""Opening a diffusers pipeline (local folder or hub id) for a backbone adapter: checks first, then the parts.

Shared by the diffusers adapters (sd3, longcat, flux2-klein, qwenimage, zimage): a wrong path, a folder of another
family or an incomplete folder is a one-line UserError before any weights load, and a family's unused parts are never
loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdmctl.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# set by `transformer_at`: where load_parts puts the transformer (None: on `device`)
_TRANSFORMER_AT = contextvars.ContextVar("cdmctl_transformer_at", default=None)


@contextlib.contextmanager
def transformer_at(where: str | None) -> Iterator[None]:
    """Within this context `load_parts` puts the transformer on `where`: "meta" (`transformer_on_meta`); "cpu", host
    memory (rank 0 of a sharded load sends it from there, shard by shard: `cdmctl.parallel.handover`, and its device
    never holds it whole); or None: on the device it is given, like every other part."""
    token = _TRANSFORMER_AT.set(where)
    try:
        yield
    finally:
        _TRANSFORMER_AT.reset(token)


def transformer_on_meta(active: bool = True) -> contextlib.AbstractContextManager:
    """Within this context (when `active`), `load_parts` builds the transformer from its config on the `meta` device
    and never reads its weights: a rank that receives them from rank 0 (`cdmctl.parallel.handover`) holds no copy
    of the files in host memory. Buffers computed at construction stay real."""
    return transformer_at("meta") if active else contextlib.nullcontext()


def transformer_placement(load_once: bool, main: bool, sharded: bool) -> str | None:
    """Where this rank loads the transformer (`transformer_at`): loaded once for all ranks, the others build it on
    "meta"; rank 0 keeps it in host memory ("cpu") when it sends it out in shards; else on the device (None)."""
    if not load_once:
        return None
    if not main:
        return "meta"
    return "cpu" if sharded else None


# set by `parts_from_rank0`: (receive, empty) -- every part but the transformer read by rank 0 only
_PARTS_FROM_RANK0 = contextvars.ContextVar("cdmctl_parts_from_rank0", default=None)


@contextlib.contextmanager
def parts_from_rank0(receive: Callable[[list[nn.Module]], None], empty: bool) -> Iterator[None]:
    """Within this context `load_parts` reads the text encoders and the VAE on rank 0 only: a rank that receives them
    (`empty`) builds them from their configs on `meta`, and once loaded every rank calls `receive(modules)`, which
    fills them from rank 0 (collective; `cdmctl.parallel.receive_weights`): no host copy on the other ranks."""
    token = _PARTS_FROM_RANK0.set((receive, empty))
    try:
        yield
    finally:
        _PARTS_FROM_RANK0.reset(token)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / "float32" / "bf16" ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(resolved, torch.dtype):
        raise UserError(f"unknown dtype '{dtype}'", "use float32, bfloat16 or float16")
    return resolved


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); use whichever this version takes."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def local_folder(source: str, example: str, builtin: str) -> Path | None:
    """The folder `source` names, or None when it should be tried as a hub id; UserError if neither.

    `example` (a hub id) and `builtin` (a `builtin:` name) go into the fix line of a missing path.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise UserError(
                f"'{source}' is not a diffusers pipeline folder (no model_index.json)",
                "point the model source at a folder written by save_pretrained or `cdmctl export`",
            )
        return path
    if HUB_ID.match(source) and not source.startswith("."):
        return None
    raise UserError(
        f"model folder '{source}' does not exist",
        f"check the path, or use a hub id such as {example} (or {builtin} for a smoke test)",
    )


def first_line(e: BaseException) -> str:
    """The error's first line, plus that of its root cause (diffusers re-raises hub errors, e.g. offline mode,
    as 'does not appear to have a file named ...')."""

    def line(x: BaseException) -> str:
        text = str(x).strip().splitlines()
        return (text[0] if text else type(x).__name__)[:300]

    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    return line(e) if root is e or line(root) == line(e) else f"{line(e)} (cause: {line(root)})"


def read_index(location: str, source: str, revision: str | None) -> dict[str, Any]:
    """model_index.json of a folder or hub id; hub errors (offline, gated, no such repo) become UserError."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(location, revision=revision))
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load '{source}': no such local folder, and the Hugging Face Hub gave: {first_line(e)}",
            "check the id and your connection; for gated models accept the license on the model page and run "
            "`hf auth login`; offline, pass a local folder instead",
        ) from e


def check_family(index: dict[str, Any], adapter: Any, location: str, source: str) -> None:
    """Insist that the pipeline is the adapter's family (naming the family it is) and that a folder is complete."""
    pipeline_class = index.get("_class_name", "unknown")
    transformer = (index.get("transformer") or [None, None])[1]
    if pipeline_class != adapter.pipeline_class:
        from cdmctl.backbones import family_for_pipeline

        other = family_for_pipeline(pipeline_class)
        fix = (f"this is a '{other}' model: set model.backbone: {other}" if other
               else f"use a {adapter.display_name} model with model.backbone '{adapter.family}', or pick the "
               "family that matches this model")  # fmt: skip
        raise UserError(
            f"'{source}' is a {pipeline_class} (transformer {transformer}), not a {adapter.display_name} pipeline",
            fix,
        )
    if Path(location).is_dir():
        skipped = set(adapter.unused_parts)
        parts = [k for k, v in index.items()
                 if not k.startswith("_") and isinstance(v, list) and v[0] is not None and k not in skipped]  # fmt: skip
        missing = [k for k in parts if not (Path(location) / k).is_dir()]
        if missing:
            raise UserError(
                f"the {adapter.display_name} folder '{source}' is incomplete: no {', '.join(missing)} subfolder",
                "copy the whole pipeline folder (every subfolder named in model_index.json)",
            )


def load_parts(adapter: Any, source: str, *, revision: str | None, dtype: torch.dtype, device: str | torch.device,
               skip: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """Every part of the `adapter` family's pipeline at `source` (hub id or folder) except its unused parts and
    `skip`, on `device` in `dtype`, frozen except the transformer. One code path for folders and hub ids."""
    folder = local_folder(source, adapter.example_id, adapter.builtin)  # before diffusers: a bad path fails at once
    location = str(folder) if folder is not None else source
    index = read_index(location, source, revision)
    check_family(index, adapter, location, source)
    pipeline_class = adapter.diffusers_pipeline()
    none = {name: None for name in (*adapter.unused_parts, *skip)}
    at, shared = _TRANSFORMER_AT.get(), _PARTS_FROM_RANK0.get()
    if at == "meta" and "transformer" not in none:
        none["transformer"] = empty_part(index, location, revision, "transformer")
    if shared is not None and shared[1]:  # this rank receives the other parts: built empty
        none |= {name: empty_part(index, location, revision, name) for name in module_parts(index, none)}
    try:
        pipe = pipeline_class.from_pretrained(location, revision=revision, **dtype_kwarg(dtype), **none)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the {adapter.display_name} pipeline parts of '{source}': {first_line(e)}",
            f"check that the folder or hub repository is a complete {adapter.pipeline_class} (all subfolders "
            "and weights present)",
        ) from e
    parts = dict(pipe.components)
    for name, module in parts.items():
        if isinstance(module, nn.Module):
            if not any(p.is_meta for p in module.parameters()):  # a meta part waits for its weights
                module.to(at if name == "transformer" and at else device)
            if name != "transformer":
                module.requires_grad_(False)
    if shared is not None:  # every rank, in the pipeline's order of its parts
        shared[0]([m for n, m in parts.items() if isinstance(m, nn.Module) and n != "transformer"])
    return parts


def module_parts(index: dict[str, Any], loaded_otherwise: dict[str, Any]) -> list[str]:
    """The pipeline's parts that are torch modules (not tokenizers or schedulers), but the transformer and those
    given to the pipeline otherwise (unused, skipped)."""
    import importlib

    names = []
    for name, spec in index.items():
        if name.startswith("_") or name == "transformer" or name in loaded_otherwise or not isinstance(spec, list):
            continue
        library, class_name = spec
        if library and class_name:
            cls = getattr(importlib.import_module(library), class_name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                names.append(name)
    return names


def empty_part(index: dict[str, Any], location: str, revision: str | None, name: str) -> nn.Module:
    """The pipeline's part `name` (a diffusers or transformers model class) built from its config with every
    parameter on `meta` (no memory, no weights read); buffers computed at construction (position tables) are real.
    Shapes are all it needs to be right: each tensor takes rank 0's dtype and values when received."""
    import importlib

    from accelerate import init_empty_weights

    library, class_name = index[name]
    model_class = getattr(importlib.import_module(library), class_name)
    if library == "diffusers":
        config = model_class.load_config(location, subfolder=name, revision=revision)
        with init_empty_weights(include_buffers=False):
            return model_class.from_config(config)
    config = model_class.config_class.from_pretrained(location, subfolder=name, revision=revision)
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    model.tie_weights()  # as from_pretrained does (T5's shared and encoder embeddings are one tensor)
    return model
