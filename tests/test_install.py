"""The install name is ours and every missing-extra hint prints the command that works for this install.

`cdmctl` on the public index is an unrelated project: the distribution is `cdmctl-distill`, its extras
refer to themselves by that name, and a hint never says `pip install 'cdmctl[...]'`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdmctl import distribution

CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")
ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_names_the_distribution_and_its_extras_refer_to_it():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^name = "cdmctl-distill"', text, re.M)
    assert distribution.DIST == "cdmctl-distill"
    assert "cdmctl[" not in text  # an extra like "cdmctl[eval]" would pull the unrelated index project


INDEX_NAME = re.compile(r"pip install\s+(?:-\S+\s+)*'?cdmctl(?:\[|'|`|\s|$)", re.M)


def test_no_file_tells_users_to_install_the_index_name():
    files = [ROOT / "README.md", *(p for folder in ("cdmctl", "benchmarks", "docs", "launch")
                                   for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sbatch"))]
    offenders = [str(p.relative_to(ROOT)) for p in files if INDEX_NAME.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
    assert INDEX_NAME.search("pip install 'cdmctl[fid]'") and INDEX_NAME.search("pip install -U cdmctl")
    assert not INDEX_NAME.search("pip install -e . && cdmctl distill") and not INDEX_NAME.search("pip install cdmctl-distill")


@pytest.mark.parametrize(
    "direct_url, cwd_is_checkout, expected",
    [
        (None, False, "pip install 'cdmctl-distill[fid]'"),  # from the package index
        ({"url": "file:///src/cdmctl", "dir_info": {"editable": True}}, True, "pip install -e '.[fid]'"),
        ({"url": "file:///src/cdmctl", "dir_info": {"editable": True}}, False, "pip install -e '/src/cdmctl[fid]'"),
        ({"url": "file:///src/cdmctl", "dir_info": {}}, False, "pip install '/src/cdmctl[fid]'"),
        ({"url": "https://github.com/o/cdmctl.git", "vcs_info": {"vcs": "git", "commit_id": "abc",
                                                                 "requested_revision": "v0.2.0"}},  # fmt: skip
         False, "pip install 'cdmctl-distill[fid] @ git+https://github.com/o/cdmctl.git@v0.2.0'"),
        ({"url": "https://example.org/cdmctl_distill-0.2.0-py3-none-any.whl", "archive_info": {}}, False,
         "pip install 'cdmctl-distill[fid]'"),
    ],
)
def test_install_extra_follows_how_cdmctl_was_installed(monkeypatch, tmp_path, direct_url, cwd_is_checkout, expected):
    monkeypatch.setattr(distribution, "_direct_url", lambda: direct_url)
    checkout = tmp_path / "src" / "cdmctl"
    checkout.mkdir(parents=True)
    if direct_url and direct_url["url"].startswith("file:"):
        direct_url["url"] = checkout.as_uri()
        expected = expected.replace("/src/cdmctl", str(checkout))
    monkeypatch.chdir(checkout if cwd_is_checkout else tmp_path)
    assert distribution.install_extra("fid") == expected


def test_missing_extra_hint_through_the_installed_entry_point(tmp_path):
    """This suite runs from an editable checkout: the hint is `pip install -e '.[fid]'` in the checkout and
    names the checkout's path elsewhere, never the index name `cdmctl`."""
    pytest.importorskip("cdmctl")
    if _installed_editable_from() != ROOT:
        pytest.skip("cdmctl is not installed editable from this checkout")
    probe = "import importlib.util as u; print(all(u.find_spec(m) for m in ('torch_fidelity', 'torchvision')))"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True":
        pytest.skip("the fid extra is installed here: no hint to check")
    for cwd, hint in ((ROOT, "pip install -e '.[fid]'"), (tmp_path, f"pip install -e '{ROOT}[fid]'")):
        proc = subprocess.run([CDMCTL, "eval", "--model", "x", "--metrics", "fid"], cwd=cwd, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[-1] == f"  fix: {hint}", proc.stderr


def _installed_editable_from() -> Path | None:
    source = distribution._direct_url()
    if not source or not source.get("dir_info", {}).get("editable"):
        return None
    return Path(distribution._local_path(source["url"])).resolve() if source["url"].startswith("file:") else None
