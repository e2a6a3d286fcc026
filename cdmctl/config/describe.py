"""Render a resolved preset as YAML-like text with each field's documentation beside it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def describe_preset(model: BaseModel, indent: int = 0) -> str:
    """Every field as `key: value  # meaning`, sections nested, in declaration order."""
    lines: list[str] = []
    pad = "  " * indent
    hidden = model.not_applicable() if hasattr(model, "not_applicable") else set()
    for name, field in type(model).model_fields.items():
        if name in hidden:
            continue
        value = getattr(model, name)
        doc = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:{doc}")
            lines.append(describe_preset(value, indent + 1))
        else:
            lines.append(f"{pad}{name}: {render(value)}{doc}")
    return "\n".join(lines)


def render(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if (not value or ":" in value or "#" in value) else value
    return str(value)
