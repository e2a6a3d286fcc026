"""The command line's habits: --version, one meaning of -o, examples at the end of every --help, `presets list`
that never cuts a name, and presets that extend another preset (`base:`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdmctl import __version__
from tests.test_docs import commands  # every click command by its name
from cdmctl.config import load_preset
from cdmctl.errors import UserError

CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")


def run_cdmctl(*args: str, columns: int = 200) -> subprocess.CompletedProcess:
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": str(columns)})  # fmt: skip


def test_version_prints_the_package_version_and_exits_0():
    proc = run_cdmctl("--version")
    assert proc.returncode == 0 and proc.stdout == f"cdmctl {__version__}\n" and proc.stderr == ""


def test_short_o_means_out_in_every_command():
    shorts = {name: [p.opts for p in cmd.params if "-o" in p.opts] for name, cmd in commands().items()}
    with_o = {name: opts for name, opts in shorts.items() if opts}
    assert set(with_o) == {"export", "generate", "eval", "report"}
    assert all(opts == [["--out", "-o"]] for opts in with_o.values()), with_o


def test_a_metric_option_given_to_o_is_refused_with_the_long_flag():
    proc = run_cdmctl("eval", "--model", "x", "-o", "fid.reference=coco-2014-10k")
    assert proc.returncode == 2 and "reads as a metric option" in proc.stderr
    assert "fix: write --metric-option fid.reference=coco-2014-10k" in proc.stderr


@pytest.mark.parametrize("command", ["", "distill", "export", "generate", "eval", "report", "presets",
                                     "presets list", "presets show"])  # fmt: skip
def test_help_ends_with_two_or_three_examples(command):
    assert set(commands()) == {"", "distill", "export", "generate", "eval", "report", "presets", "presets list",
                               "presets show"}
    proc = run_cdmctl(*command.split(), "--help", columns=250)
    assert proc.returncode == 0
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    start = lines.index("Examples:")
    examples = lines[start + 1 :]
    assert 2 <= len(examples) <= 3, examples
    prefix = f"cdmctl {command}".rstrip()
    assert all(line == prefix or line.startswith(prefix + " ") for line in examples), examples


def test_presets_list_keeps_full_hub_ids_and_names_at_80_columns():
    proc = run_cdmctl("presets", "list", columns=80)
    assert proc.returncode == 0
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in rows["sd3-4nfe"]
    assert "black-forest-labs/FLUX.2-klein-base-4B" in rows["flux2-klein-4nfe"]
    assert "FLUX.2 [klein] base 4B, 4-step student" in rows["flux2-klein-4nfe"]
    assert rows["sd3-4nfe"].endswith("(paper recipe)")


# ----------------------------------------------------------------------------- presets extending a preset


def test_a_preset_holds_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: sd3-4nfe\nmodel:\n  pretrained: my/model\ndata:\n  prompts: prompts.txt\n"
                    "method:\n  schedule:\n    coverage: 0.5\n")  # fmt: skip
    base, p = load_preset("sd3-4nfe"), load_preset(str(mine))
    assert p.name == "mine" and p.description == ""
    assert p.model.pretrained == "my/model" and p.data.prompts == str(tmp_path / "prompts.txt")
    assert p.method.schedule.coverage == 0.5  # deep merge: the schedule's other fields stay the base's
    assert p.method.schedule.level_range == base.method.schedule.level_range
    assert p.method.schedule.kind == base.method.schedule.kind and p.model.resolution == base.model.resolution
    assert p.optim == base.optim and p.train == base.train
    assert load_preset(str(mine), ["model.resolution=512"]).model.resolution == 512  # --set still on top


def test_bases_chain_and_lists_replace(tmp_path):
    (tmp_path / "a.yaml").write_text("base: demo\ndata:\n  sample_prompts: [a red cat]\ntrain:\n  iterations: 10\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  batch_size: 2\n")
    p = load_preset(str(tmp_path / "b.yaml"))
    assert p.name == "b" and p.model.pretrained == "builtin:toy-sd3"
    assert (p.train.iterations, p.train.batch_size, p.data.sample_prompts) == (10, 2, ["a red cat"])


def test_a_cycle_of_bases_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  batch_size: 2\n")
    with pytest.raises(UserError, match=r"cycle: a.yaml -> b.yaml -> a.yaml"):
        load_preset(str(tmp_path / "a.yaml"))
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(UserError, match="cycle: self.yaml -> self.yaml"):
        load_preset(str(tmp_path / "self.yaml"))


def test_a_missing_base_names_the_presets(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: no-such-preset\n")
    with pytest.raises(UserError, match="unknown preset 'no-such-preset'"):
        load_preset(str(tmp_path / "mine.yaml"))


def test_the_version_is_written_once_and_the_changelog_has_its_release():
    import re

    root = Path(__file__).resolve().parent.parent
    assert 'dynamic = ["version"]' in (root / "pyproject.toml").read_text()
    assert re.search(rf"^## {re.escape(__version__)} - \d{{4}}-\d{{2}}-\d{{2}}$", (root / "CHANGELOG.md").read_text(), re.M)
    from importlib.metadata import version

    assert version("cdmctl-distill") == __version__
