"""A model family added by a plugin, without touching cdmctl: `model.backbone` takes any registered family.

The plugin is a package of its own with a `cdmctl.plugins` entry point (a dist-info folder on PYTHONPATH, as
pip would install it); its registration function calls `cdmctl.backbones.register_family`. Everything runs
through the installed `cdmctl` entry point in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")

# The registration function names the adapter by "module:Class", so that registering imports no model library.
PLUGIN = '''
from cdmctl.backbones import register_family


def register():
    register_family("myfam", "myfam_plugin.adapter:MyFamBackbone")
'''

ADAPTER = '''
"""A third-party family: SD3's adapter under another name, recording that cdmctl loaded it."""

import os

from cdmctl.backbones.sd3 import SD3Backbone


class MyFamBackbone(SD3Backbone):
    family = "myfam"

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        with open(os.environ["MYFAM_MARKER"], "a") as f:
            f.write(f"loaded {source}\\n")
        return super().from_pretrained(source, **kwargs)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the plugin package and its dist-info (name, version, entry point), as pip installs one."""
    root = tmp_path_factory.mktemp("site")
    (root / "myfam_plugin").mkdir()
    (root / "myfam_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (root / "myfam_plugin" / "adapter.py").write_text(textwrap.dedent(ADAPTER))
    info = root / "myfam_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myfam-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cdmctl.plugins]\nmyfam = myfam_plugin:register\n")
    return root


def cdmctl(*args: str, plugin: Path | None, cwd: Path, marker: Path | None = None, timeout: float = 120):
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("PYTHONPATH", None)
    if plugin is not None:
        env["PYTHONPATH"] = str(plugin)
    if marker is not None:
        env["MYFAM_MARKER"] = str(marker)
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_an_unregistered_family_is_refused_with_the_registered_ones(tmp_path):
    proc = cdmctl("distill", "--preset", "demo", "--set", "model.backbone=myfam", "--dry-run", plugin=None, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.splitlines()[0]
    assert "model.backbone" in line and "unknown model family 'myfam'" in line
    assert "registered families: flux2-klein, longcat, qwenimage, sd3, zimage" in line


def test_a_plugin_family_passes_preset_validation(plugin_path, tmp_path):
    proc = cdmctl("distill", "--preset", "demo", "--set", "model.backbone=myfam", "--dry-run", plugin=plugin_path,
                  cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "  backbone: myfam\n" in proc.stdout
    wrong = cdmctl("distill", "--preset", "demo", "--set", "model.backbone=yourfam", "--dry-run",
                   plugin=plugin_path, cwd=tmp_path)  # fmt: skip
    assert wrong.returncode == 2 and "registered families: flux2-klein, longcat, myfam, qwenimage" in wrong.stderr


def test_a_plugin_family_trains_through_its_own_adapter(plugin_path, tiny_sd3_dir, tmp_path):
    """One iteration on the tiny SD3 pipeline, loaded by the plugin's adapter (its marker says so)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    marker = tmp_path / "marker.txt"
    settings = {"model.backbone": "myfam", "model.pretrained": str(tiny_sd3_dir), "model.resolution": 32,
                "model.precision": "fp32", "model.gradient_checkpointing": "false", "model.text_length": 8,
                "method.schedule.length": "[1, 4]", "train.iterations": 1, "train.batch_size": 2,
                "run.sample_every": 0, "run.checkpoint_every": 1, "data.prompts": str(prompts),
                "data.sample_prompts": "[a red cube]"}  # fmt: skip
    overrides = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    proc = cdmctl("distill", "--preset", "sd3-4nfe", *overrides, "--out", str(tmp_path / "run"), "--plain",
                  plugin=plugin_path, cwd=tmp_path, marker=marker, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == f"loaded {tiny_sd3_dir}\n"
    assert (tmp_path / "run" / "checkpoints" / "step-0000001" / "student.safetensors").is_file()
    assert "backbone: myfam" in (tmp_path / "run" / "preset.yaml").read_text()
