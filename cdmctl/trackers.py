"""accelerate's experiment trackers for a run: checked before anything loads, started on the main process, fed the
run's scalars, sample grids and evaluation scores (metrics.jsonl stays the source of truth)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cdmctl.errors import UserError

FOLDER = "trackers"  # RUN/trackers: accelerate's logging_dir (TensorBoard writes RUN/trackers/PRESET/)
# tracker name (accelerate's LoggerType) -> (the module it imports, how to install it; None: our extra of that name)
PACKAGES = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", None),
    "mlflow": ("mlflow", "pip install mlflow"),
    "aim": ("aim", "pip install aim"),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
    "trackio": ("trackio", "pip install trackio"),
}


def install_command(name: str) -> str:
    """How to install tracker `name`'s package: our extra, as this copy of cdmctl was installed, or pip's."""
    from cdmctl.distribution import install_extra

    return PACKAGES[name][1] or install_extra(name)


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def check_known(name: str) -> str:
    key = name.strip().lower()
    if key not in PACKAGES:
        raise UserError(f"unknown tracker '{name}'", f"use one of: {', '.join(PACKAGES)}")
    return key


def resolve_trackers(required: list[str], optional: list[str]) -> tuple[list[str], list[str]]:
    """(trackers to start, notes): every required one must be installed (UserError with the install command,
    before any model loads); an optional one whose package is missing is skipped with a note."""
    chosen, notes = [], []
    for name in map(check_known, required):
        if not installed(name):
            raise UserError(f"tracker '{name}' needs the {PACKAGES[name][0]} package, which is not installed",
                            install_command(name))  # fmt: skip
        chosen.append(name)
    for name in map(check_known, optional):
        if name in chosen:
            continue
        if installed(name):
            chosen.append(name)
        else:
            notes.append(f"not logging to {name} ({PACKAGES[name][0]} is not installed: {install_command(name)})")
    return chosen, notes


def flat_config(preset: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved preset as one level of `section.field` keys with values every tracker accepts."""
    out: dict[str, Any] = {}
    for key, value in preset.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:  # lists and None: as text (TensorBoard's hparams take no lists or None)
            out[f"{prefix}{key}"] = str(value)
    return out


def start_trackers(acc: Any, name: str, preset: dict[str, Any], folder: Path, iteration: int) -> list[str]:
    """Start the accelerator's trackers (those it was built with) for a run at `iteration`; returns notes.

    A resumed run continues the same tracker run: TensorBoard writes into the same folder and purges any point
    at or after the resumed iteration that the interrupted session had logged (`purge_step`), so that the step
    axis has no duplicates; W&B resumes the run id kept in RUN/trackers/wandb-id.
    """
    if not acc.log_with:
        return []
    kwargs: dict[str, Any] = {}
    if iteration > 0:
        kwargs["tensorboard"] = {"purge_step": iteration + 1}
    if any(str(t) == "wandb" for t in acc.log_with):
        kwargs["wandb"] = {"id": wandb_id(folder), "resume": "allow", "dir": str(folder / FOLDER)}
    # the configuration once, at the start (a resume would add a second copy of it)
    acc.init_trackers(name, config=flat_config(preset) if iteration == 0 else None, init_kwargs=kwargs)
    if any(str(t) == "tensorboard" for t in acc.log_with):
        return [f"TensorBoard logs: tensorboard --logdir {folder / FOLDER}"]
    return []


def wandb_id(folder: Path) -> str:
    """The run's W&B id, made once and kept in the run folder so that a resume logs into the same W&B run."""
    import uuid

    path = folder / FOLDER / "wandb-id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


def log_scalars(acc: Any, record: dict[str, Any]) -> None:
    """Every number of a metrics record, at its iteration (main process only: accelerate's `log`)."""
    if not acc.trackers:
        return
    values = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float)) and v == v}
    acc.log(values, step=int(record["iteration"]))


def log_image(acc: Any, tag: str, image: Any, iteration: int) -> None:
    """One picture (a PIL image) to every tracker that takes images, in each one's own convention."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: pixels[None]}, step=iteration, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [pixels]}, step=iteration)


def finish_trackers(acc: Any) -> None:
    """Flush and close every tracker (a run that stops early keeps what it logged)."""
    for tracker in list(getattr(acc, "trackers", [])):
        tracker.finish()
    if getattr(acc, "trackers", None):
        acc.trackers = []
