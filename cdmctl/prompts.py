"""Load training prompts from a .txt file, a .jsonl file or a shipped `builtin:NAME` list."""

from __future__ import annotations

import json
from pathlib import Path

from cdmctl.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "assets" / "prompts"


def builtin_names() -> list[str]:
    """Names usable as `builtin:NAME` (the .txt files shipped in cdmctl/assets/prompts)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def load_prompts(source: str) -> list[str]:
    """Return the prompts of `source`: a `.txt` path, a `.jsonl` path, or `builtin:NAME`.

    Raises UserError (message + fix) for a missing file, an unknown suffix, a malformed JSONL
    line (named by file and line number) or a source with no prompts at all.
    """
    path = _resolve(source)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = _read_txt(path)
    elif suffix == ".jsonl":
        prompts = _read_jsonl(path)
    else:
        raise UserError(
            f"prompt file {path} has unknown suffix '{path.suffix}'",
            "use a .txt file (one prompt per line) or a .jsonl file with a 'prompt' field per line",
        )
    if not prompts:
        raise UserError(f"prompt file {path} contains no prompts", "add at least one non-blank prompt")
    return prompts


def prompt_file_sha256(source: str) -> str | None:
    """sha256 of a prompt file's bytes, recorded in checkpoints so a resume notices an edited file;
    None for `builtin:NAME` lists, which change only with cdmctl itself."""
    from cdmctl.engine.checkpoint import sha256_of  # imports torch: only when a run records or checks it

    return None if source.startswith(BUILTIN_PREFIX) else sha256_of(_resolve(source))


def _resolve(source: str) -> Path:
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        path = BUILTIN_DIR / f"{name}.txt"
        # `name` must be a plain stem: a path-like name would escape the assets folder.
        if not name or Path(name).name != name or not path.is_file():
            known = ", ".join(BUILTIN_PREFIX + n for n in builtin_names()) or "none"
            raise UserError(f"unknown builtin prompt list '{source}'", f"use one of: {known}")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(
            f"prompt file {source} not found",
            f"check the path, or use a shipped list such as {BUILTIN_PREFIX}demo",
        )
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {path} is not valid UTF-8 ({exc.reason})", "save it as UTF-8 text") from exc


def _read_txt(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_jsonl(path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fix = 'make each line a JSON object like {"prompt": "a red bicycle"}'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})", fix) from exc
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str):
            raise UserError(f"{path}:{number}: no string 'prompt' field", fix)
        # A blank prompt is kept out, matching the .txt rule that blank lines are not prompts.
        if prompt.strip():
            prompts.append(prompt.strip())
    return prompts
