"""How cdmctl was installed: its distribution name and the pip command that adds an extra to this install.

The import and command name is `cdmctl`, but the name `cdmctl` on the public package index belongs to an
unrelated project, so the distribution is `cdmctl-distill`. A hint naming the extra `cdmctl[fid]` would
replace the user's install with that project; `install_extra` names what works for this install.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DIST = "cdmctl-distill"


def install_extra(extra: str) -> str:
    """The pip command that installs `extra` the way this copy of cdmctl was installed.

    An editable checkout (`pip install -e .`) gets `pip install -e '.[EXTRA]'` (the checkout's path when the
    current folder is another), a local folder or a git URL gets that source again, anything else the
    package index name."""
    source = _direct_url()
    if source is None:
        return f"pip install '{DIST}[{extra}]'"
    url = source.get("url", "")
    if "vcs_info" in source:
        vcs = source["vcs_info"]
        ref = f"@{vcs['requested_revision']}" if vcs.get("requested_revision") else ""
        return f"pip install '{DIST}[{extra}] @ {vcs.get('vcs', 'git')}+{url}{ref}'"
    if "dir_info" in source and url.startswith("file:"):
        folder = _local_path(url)
        editable = "-e " if source["dir_info"].get("editable") else ""
        return f"pip install {editable}'{folder}[{extra}]'"
    return f"pip install '{DIST}[{extra}]'"  # an archive or wheel URL: the index has the same release


def _direct_url() -> dict | None:
    """PEP 610's record of where pip installed this distribution from (absent for an index install).

    Every metadata folder of the name is asked: a checkout's own `*.egg-info` (left by the editable build) is
    found first when the checkout is on sys.path, and it carries no record."""
    for dist in metadata.distributions(name=DIST):
        text = dist.read_text("direct_url.json")
        if text:
            try:
                return json.loads(text)
            except ValueError:
                return None
    return None


def _local_path(url: str) -> str:
    """`.` when the checkout is the current folder (the common case, and the shortest command), else its path."""
    folder = Path(unquote(urlparse(url).path))
    try:
        if folder.resolve() == Path(os.getcwd()).resolve():
            return "."
    except OSError:
        pass
    return str(folder)
