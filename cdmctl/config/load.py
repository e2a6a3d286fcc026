"""Find, read, override (`--set a.b=c`) and validate presets; errors name the offending field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cdmctl.config.schema import Preset
from cdmctl.errors import UserError

PRESET_SUFFIXES = (".yaml", ".yml")


def presets_folder() -> Path:
    """The shipped presets: the top-level presets/ of the source tree this module runs from (a checkout, where an
    editable install's package-data mapping may name another checkout), else the installed package data."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "presets" / "__init__.py").is_file():
        return root / "presets"
    try:
        return Path(str(resources.files("cdmctl.presets")))
    except ModuleNotFoundError:  # running from a source tree on PYTHONPATH, not installed
        return Path(__file__).resolve().parents[2] / "presets"


def builtin_presets() -> dict[str, Path]:
    """Name -> file of every preset shipped with cdmctl."""
    folder = presets_folder()
    return {
        f.stem: f
        for f in folder.iterdir()
        if f.name.endswith(PRESET_SUFFIXES)
    }


def preset_path(name_or_path: str) -> Path:
    """A built-in preset name, or a path to the user's own YAML file."""
    path = Path(name_or_path)
    if path.suffix in PRESET_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"preset file not found: {path}", "check the path, or run `cdmctl presets list`")
        return path
    presets = builtin_presets()
    if name_or_path not in presets:
        raise UserError(
            f"unknown preset '{name_or_path}'",
            f"built-in presets: {', '.join(sorted(presets))}; or pass a path to a .yaml file",
        )
    return presets[name_or_path]


def read_raw(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}", "fix the file's syntax") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of sections (model, method, ...)", "see `cdmctl presets show demo`")
    return data


def read_preset(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's sections merged over those of the preset its `base:` names (a built-in name or a file, relative
    to this one), recursively: a preset holds only what differs from its base. Cycles are refused."""
    data = read_raw(path)
    base = data.pop("base", None)
    if base is None:
        return data
    chain = (*chain, path.resolve())
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base must be a preset name or file, got {base!r}", "e.g. base: sd3-4nfe")
    parent = base_path(base, path)
    if parent.resolve() in chain:
        names = " -> ".join(p.name for p in (*chain, parent.resolve()))
        raise UserError(f"presets extend each other in a cycle: {names}", "remove one of these `base:` lines")
    merged = read_preset(parent, chain)
    merged.pop("name", None)  # a preset is named after its own file; its description says what it is
    merged.pop("description", None)
    return deep_merge(merged, data)


def base_path(base: str, child: Path) -> Path:
    """A `base:` value: a file beside the preset that names it, else a built-in name or a path."""
    beside = child.parent / base
    if Path(base).suffix in PRESET_SUFFIXES and beside.is_file():
        return beside
    return preset_path(base)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: sections merge key by key, anything else (values, lists, null) replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) in place; never creates a new section silently."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"bad override '{assignment}'", "write --set section.key=value, e.g. --set optim.student_lr=2e-5")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set '{key}': '{part}' is not a section", "check the key with `cdmctl presets show`")
        node = child
    node[parts[-1]] = value


def validate(data: dict[str, Any], source: str) -> Preset:
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(preset)"
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UserError(
            f"invalid preset {source}: {field}: {problem}{more}",
            "see `cdmctl presets show NAME` for the fields and their meaning",
        ) from exc


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Preset:
    """Resolve, override and validate a preset. The name defaults to the file's stem."""
    path = preset_path(name_or_path)
    data = read_preset(path)
    data.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(data, assignment)
    preset = validate(data, f"'{name_or_path}'")
    return resolve_paths(preset, path.parent)


def resolve_paths(preset: Preset, base: Path) -> Preset:
    """Relative prompt files and model folders in a preset are relative to the preset file when they exist there."""
    for section, key in (("data", "prompts"), ("model", "pretrained")):
        obj = getattr(preset, section)
        value = getattr(obj, key)
        candidate = base / value
        if not Path(value).is_absolute() and not Path(value).exists() and candidate.exists():
            setattr(obj, key, str(candidate))
    return preset
