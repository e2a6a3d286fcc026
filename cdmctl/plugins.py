"""Extensions that plug in from above the core: packages named by the `cdmctl.plugins` entry point.

Each entry point is a callable taking no arguments; calling it registers what the package adds, e.g. a
`builtin:` model source (`cdmctl.backbones.register_builtin`) or a run report
(`cdmctl.run.register_run_report`). The core never imports a plugin by name: it only walks the entry points,
once per process, the first time something asks for an extension.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "cdmctl.plugins"
_loaded = False


def load_plugins() -> None:
    """Call every installed plugin's registration function (idempotent)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=GROUP):
        entry.load()()
