"""The docs stay true: every fenced `cdmctl ...` line in README.md and docs/*.md (and every example at the end of a
--help) names a real command and only options it has; the cheap ones (`presets`, `--help`, `--version`,
`--dry-run` of a built-in preset or README's own preset file) are run; transcripts (`$ cdmctl ...` followed by
its output) print what the page shows; the presets reference is what the schema generates; README stays short.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from cdmctl import cli
from cdmctl.config.reference import generate

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SEPARATORS = re.compile(r"\s(?:&&|\||;)\s")


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a page."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def command_lines(text: str) -> list[str]:
    """The `cdmctl ...` commands of a shell block: one per line or `&&`/`|` segment, comments cut, and the
    command part of `accelerate launch ... -m cdmctl.cli CMD ...`."""
    found = []
    for line in text.splitlines():
        if line.startswith("$ "):
            continue  # a transcript: run by test_transcripts_print_what_the_page_shows, its output compared
        for segment in SEPARATORS.split(line):
            segment = re.sub(r"\s+#.*$", "", segment).strip()
            if " -m cdmctl.cli " in segment:
                segment = "cdmctl " + segment.split(" -m cdmctl.cli ", 1)[1]
            if segment.startswith("cdmctl ") or segment == "cdmctl":
                found.append(segment)
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every shell block line of every page and every --help example."""
    found = [(f"{page.relative_to(ROOT)}", line) for page in PAGES for lang, text in fenced_blocks(page)
             if lang in ("", "sh", "bash", "console") for line in command_lines(text)]  # fmt: skip
    for name, cmd in commands().items():
        found += [(f"`cdmctl {name} --help`".replace("  ", " "), line) for line in command_lines(cmd.epilog or "")]
    return found


def commands() -> dict[str, object]:
    """'' (the root), 'distill', ..., 'presets list' -> its click command."""
    root = typer.main.get_command(cli.app)
    found = {"": root}
    for name, cmd in root.commands.items():
        found[name] = cmd
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            found[f"{name} {sub}"] = subcmd
    return found


def option_problems(line: str) -> list[str]:
    """What is wrong with one command line: an unknown command, or options the command does not have."""
    words = shlex.split(line)[1:]
    table, path = commands(), []
    while words and not words[0].startswith("-") and " ".join([*path, words[0]]) in table:
        path.append(words.pop(0))
    name = " ".join(path)
    group = getattr(table[name], "commands", None)
    if group and words and not words[0].startswith("-"):
        return [f"no command '{' '.join([*path, words[0]])}'"]
    known = {opt for param in table[name].params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    options = [w.split("=", 1)[0] for w in words if re.match(r"^--?[A-Za-z]", w)]
    return [f"'{name or 'cdmctl'}' has no option {opt}" for opt in options if opt not in known]


DOCUMENTED = documented_commands()


def test_the_pages_hold_commands_to_check():
    assert len(DOCUMENTED) > 40
    assert {where for where, _ in DOCUMENTED} >= {"README.md", "docs/usage.md", "docs/evaluation.md"}


@pytest.mark.parametrize("where, line", DOCUMENTED, ids=[f"{w}: {line[:60]}" for w, line in DOCUMENTED])
def test_every_documented_command_has_the_options_it_uses(where, line):
    assert option_problems(line) == [], f"{where}: {line}"


def test_the_checker_catches_a_fake_option_and_a_fake_command():
    assert option_problems("cdmctl generate 'a cat' --model m --bogus 3") == ["'generate' has no option --bogus"]
    assert option_problems("cdmctl eval --model m --metric-option fid.reference=x -o out") == []
    assert option_problems("cdmctl presets lst") == ["no command 'presets lst'"]
    assert option_problems("cdmctl export runs/a --no-ema --out b") == []
    assert command_lines("accelerate launch --num_processes 8 -m cdmctl.cli distill --preset x ...   # y") == [
        "cdmctl distill --preset x ..."]
    assert command_lines("cdmctl export a --out b && cdmctl generate x --model b | tee log") == [
        "cdmctl export a --out b", "cdmctl generate x --model b"]


def run_cdmctl(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["cdmctl", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def is_cheap(words: list[str]) -> bool:
    """Commands that load no model: presets, help, version, and dry runs of a built-in preset."""
    if words[:1] == ["presets"] or "--help" in words or words == ["--version"]:
        return True
    return words[:1] == ["distill"] and "--dry-run" in words and not words[words.index("--preset") + 1].endswith(".yaml")


CHEAP = [(w, line) for w, line in DOCUMENTED if "..." not in line and is_cheap(shlex.split(line)[1:])]


@pytest.mark.parametrize("where, line", CHEAP, ids=[f"{w}: {line[:60]}" for w, line in CHEAP])
def test_cheap_documented_commands_run(where, line, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    if "my.yaml" in line:
        (tmp_path / "my.yaml").write_text("base: demo\n")
    code, out, err = run_cdmctl(monkeypatch, capsys, shlex.split(line)[1:])
    assert code == 0, f"{where}: {line}\n{err}"


def test_readmes_own_preset_file_validates(monkeypatch, capsys, tmp_path):
    """The five-line preset of "Distill your own model", as written, resolves over its base."""
    yaml_blocks = [text for lang, text in fenced_blocks(ROOT / "README.md") if lang == "yaml"]
    assert len(yaml_blocks) == 1 and yaml_blocks[0].startswith("base: ") and len(yaml_blocks[0].splitlines()) == 5
    (tmp_path / "my.yaml").write_text(yaml_blocks[0])
    (tmp_path / "prompts.txt").write_text("a lighthouse at dusk\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cdmctl(monkeypatch, capsys, ["distill", "--preset", "my.yaml", "--dry-run"])
    assert code == 0, err
    assert "name: my\n" in out and "pretrained: my-org/my-sd3-finetune" in out and "method:\n  name: cdm\n" in out


def transcripts() -> list[tuple[str, str, list[str]]]:
    """(page, command, the output lines the page shows) of every `$ cdmctl ...` line in a fenced block."""
    found = []
    for page in PAGES:
        for _, text in fenced_blocks(page):
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("$ cdmctl "):
                    shown = [out for out in lines[i + 1 :] if out and not out.startswith("$ ")]
                    found.append((str(page.relative_to(ROOT)), line[2:], shown))
    return found


@pytest.mark.parametrize("where, line, shown", transcripts())
def test_transcripts_print_what_the_page_shows(where, line, shown):
    """Through the installed entry point, so that the program name in usage lines is `cdmctl`."""
    cdmctl = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")
    proc = subprocess.run([cdmctl, *shlex.split(line)[1:]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    printed = [" ".join(x.split()) for x in (proc.stdout + proc.stderr).splitlines()]
    assert [" ".join(x.split()) for x in shown] == printed, f"{where}: {line}"


def test_the_presets_reference_is_what_the_schema_generates():
    page = (ROOT / "docs" / "presets.md").read_text(encoding="utf-8")
    assert page == generate(), "docs/presets.md is stale: run python -m cdmctl.config.reference docs/presets.md"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 200
