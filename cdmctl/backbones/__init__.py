"""Backbone adapters by family name, and model sources (`builtin:<name>`, hub ids, folders) resolved to loadable ones.

Importing this package is cheap: adapters (and torch, diffusers) are imported when a backbone is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cdmctl.errors import UserError

if TYPE_CHECKING:
    from cdmctl.backbones.base import Backbone

BUILTIN_PREFIX = "builtin:"
_FROM_TINY = ("BUILTINS", "ensure_builtin", "register_builtin")


def __getattr__(name: str) -> Any:
    """The built-in model registry lives in the `tiny` subpackage, imported on first use (importing this package
    stays cheap)."""
    if name in _FROM_TINY:
        from cdmctl.backbones import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# family -> its adapter class (with SD3Backbone's class-level traits and `from_pretrained`), or the class's
# "module:Class" path, imported on use.
FAMILIES: dict[str, str | type] = {
    "sd3": "cdmctl.backbones.sd3:SD3Backbone",
    "longcat": "cdmctl.backbones.longcat:LongCatBackbone",
    "flux2-klein": "cdmctl.backbones.flux2_klein:Flux2KleinBackbone",
    "zimage": "cdmctl.backbones.zimage:ZImageBackbone",
    "qwenimage": "cdmctl.backbones.qwenimage:QwenImageBackbone",
}


def register_family(name: str, adapter: str | type) -> None:
    """Add a family: its adapter class (the Backbone protocol, traits class-level), or its "module:Class" path."""
    FAMILIES[name] = adapter


def known_families(name: str | None = None) -> list[str]:
    """Every registered family: the built-in ones and, once asked for a name that is not built in (or for all),
    those that installed plugins register (`cdmctl.plugins`; loading them imports torch, so only then). In
    registration order: the built-in families come first wherever a pipeline class is looked up."""
    if name is None or name not in FAMILIES:
        from cdmctl.plugins import load_plugins

        load_plugins()
    return list(FAMILIES)


def adapter_class(family: str) -> type:
    """The adapter class of `family`; UserError naming the known families otherwise."""
    if family not in known_families(family):
        raise UserError(f"unknown model family '{family}'", f"use one of: {', '.join(sorted(FAMILIES))}")
    adapter = FAMILIES[family]
    if isinstance(adapter, str):
        module, _, attrs = adapter.partition(":")
        adapter = importlib.import_module(module)
        for attr in attrs.split("."):
            adapter = getattr(adapter, attr)
    return adapter


def family_for_pipeline(pipeline_class: str | None) -> str | None:
    """The family whose folders hold `pipeline_class` (a diffusers pipeline class name), or None."""
    for name in known_families():
        if pipeline_class and getattr(adapter_class(name), "pipeline_class", None) == pipeline_class:
            return name
    return None


def adapter_for_pipeline(pipeline_class: str | None) -> type | None:
    """The adapter class of `pipeline_class`'s family (its sampling traits), or None for other pipelines."""
    family = family_for_pipeline(pipeline_class)
    return adapter_class(family) if family else None


def resolve_source(source: str) -> str:
    """`builtin:<name>` -> the cached folder of that built-in model (built on first use); anything else unchanged."""
    if not source.startswith(BUILTIN_PREFIX):
        return source
    from cdmctl.backbones.tiny import ensure_builtin

    return str(ensure_builtin(source[len(BUILTIN_PREFIX) :]))


def load_backbone(family: str, source: str, *, revision: str | None = None, dtype: Any = "float32",
                  device: Any = "cpu", **kwargs: Any) -> Backbone:  # fmt: skip
    """Load the `family` adapter from `source` (hub id, folder or `builtin:<name>`).

    `dtype` is a torch.dtype or its name ("float32", "bfloat16", "bf16", ...). Extra keyword arguments go to
    the family's `from_pretrained` (SD3: `max_sequence_length`).
    """
    adapter = adapter_class(family)
    return adapter.from_pretrained(resolve_source(source), revision=revision, dtype=dtype, device=device, **kwargs)


__all__ = [
    "BUILTINS",
    "BUILTIN_PREFIX",
    "FAMILIES",
    "adapter_class",
    "adapter_for_pipeline",
    "ensure_builtin",
    "family_for_pipeline",
    "known_families",
    "load_backbone",
    "register_builtin",
    "register_family",
    "resolve_source",
]
