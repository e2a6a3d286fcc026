"""The engine is backbone-agnostic: it never imports diffusers, transformers or a backbone adapter.

The one exception is `cdmctl.backbones.base`, the interface itself (the Backbone Protocol and
Conditioning, pure torch): the engine talks to every family through it and names none. The second
test makes sure that interface stays free of diffusers and transformers.
"""

import ast
from pathlib import Path

import cdmctl.engine

FORBIDDEN = ("diffusers", "transformers", "cdmctl.backbones")
INTERFACE = "cdmctl.backbones.base"  # the Protocol: allowed, the adapters (sd3, longcat, toy, tiny) are not
ENGINE = Path(cdmctl.engine.__file__).parent


def forbidden(name: str, bad: tuple[str, ...] = FORBIDDEN) -> bool:
    if name == INTERFACE or name.startswith(INTERFACE + "."):
        return False
    return any(name == b or name.startswith(b + ".") for b in bad)


def imported_modules(path: Path, package: tuple[str, ...] = ("cdmctl", "engine")) -> set[str]:
    """Absolute names of every module imported by `path` (relative imports resolved)."""
    package = list(package)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_engine_never_imports_diffusers_transformers_or_backbones():
    files = sorted(ENGINE.rglob("*.py"))
    assert files
    offenders = [
        f"{path.name}: {name}"
        for path in files
        for name in imported_modules(path)
        if forbidden(name)
    ]
    assert offenders == []


def test_the_backbone_interface_the_engine_uses_imports_no_model_library():
    base = ENGINE.parent / "backbones" / "base.py"
    names = imported_modules(base, ("cdmctl", "backbones"))
    assert [n for n in names if forbidden(n, ("diffusers", "transformers", "peft", "accelerate"))] == []
    assert [n for n in names if n.startswith("cdmctl.") and n != "cdmctl.errors"] == []


def test_the_layering_check_catches_relative_and_absolute_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..backbones.tiny import toy\nimport diffusers.models\nfrom transformers import AutoModel\n")
    names = imported_modules(bad)
    assert {"cdmctl.backbones.tiny", "cdmctl.backbones.tiny.toy", "diffusers.models", "transformers"} <= names
    assert forbidden("cdmctl.backbones.tiny.toy") and forbidden("diffusers.models") and forbidden("transformers")
    assert not forbidden("cdmctl.backbones.base.Conditioning") and not forbidden("torch")


CONSUMERS = ("cdmctl.proving",)  # plug in from above (entry point `cdmctl.plugins`); never imported by the core


def test_the_core_never_imports_the_proving_ground():
    package = ENGINE.parent
    offenders = [
        f"{path.relative_to(package)}: {name}"
        for path in sorted(package.rglob("*.py"))
        if "proving" not in path.relative_to(package).parts
        for name in imported_modules(path, ("cdmctl", *path.relative_to(package).parts[:-1]))
        if forbidden(name, CONSUMERS)
    ]
    assert offenders == []


def test_the_proving_ground_registers_itself_through_the_plugin_entry_point():
    from importlib.metadata import entry_points

    from cdmctl.backbones import BUILTINS
    from cdmctl.plugins import GROUP, load_plugins
    from cdmctl.run import RUN_REPORTS

    assert "cdmctl.proving.plugin:register" in {e.value for e in entry_points(group=GROUP)}
    load_plugins()
    assert "toy-sd3" in BUILTINS
    assert any(r.__module__ == "cdmctl.proving.plugin" for r in RUN_REPORTS)


def test_the_engine_names_no_model_family():
    """Not even in a string, comment or docstring: what a family needs goes through the backbone interface."""
    import re

    from cdmctl.backbones import FAMILIES

    names = {*FAMILIES, "flux", "qwen", "z-image", "stable diffusion", "klein"}
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names)), re.IGNORECASE)
    offenders = [f"{path.name}:{i}: {line.strip()}" for path in sorted(ENGINE.rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert offenders == []
