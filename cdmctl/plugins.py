"""Extensions that plug in from above the core: packages named by the `cdmctl.plugins` entry point.

Each entry point is a callable taking no arguments; calling it registers what the package adds, e.g. a model
family (`cdmctl.backbones.register_family`), a `builtin:` model source (`cdmctl.backbones.register_builtin`) or
a run report (`register_run_report` below). The core never imports a plugin by name: it only walks the entry
points, once per process, the first time something asks for an extension. Registering imports no model library
and no torch, so asking for an extension (e.g. a `model.backbone` that is not built in) stays cheap.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable

GROUP = "cdmctl.plugins"
_loaded = False

# Reports written at the end of a run by the main process: report(run) -> a line to show, or None when the
# report does not apply to this run (the proving ground: the demo's before/after figure).
RUN_REPORTS: list[Callable[[Any], str | None]] = []


def register_run_report(report: Callable[[Any], str | None]) -> None:
    RUN_REPORTS.append(report)


def load_plugins() -> None:
    """Call every installed plugin's registration function (idempotent)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=GROUP):
        entry.load()()
