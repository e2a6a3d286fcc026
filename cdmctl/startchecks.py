"""What a distill start checks from the preset and the launch alone, before torch, diffusers or any model loads.

Every refusal here takes about a second, where the same mistake found after loading would cost the model's load
time (minutes and a download on a real model): the launch's strategy, the prompt files, the batch split, the model
folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from cdmctl.errors import UserError

if TYPE_CHECKING:
    from cdmctl.config.schema import Preset

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the backbones' loader reads a source


def check_inputs(preset: "Preset") -> str:
    """Refuse what cannot work; returns the parallel strategy this launch runs (single, ddp or fsdp2)."""
    from cdmctl.parallel import check_supported, effective_strategy
    from cdmctl.prompts import load_prompts

    strategy = effective_strategy(preset.parallel.strategy)
    check_supported(preset, strategy)
    load_prompts(preset.data.prompts)  # exists, readable, holds at least one prompt
    if not preset.data.sample_prompts:
        raise UserError("data.sample_prompts is empty", "give at least one prompt for the sample grids")
    check_batch_split(preset.train.batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    check_model_source(preset.model.pretrained)
    return strategy


def check_batch_split(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UserError(f"train.batch_size {batch_size} is not divisible by {processes} processes",
                        f"pick a multiple of {processes}, e.g. --set train.batch_size={batch_size - batch_size % processes or processes}")  # fmt: skip


def check_model_source(source: str) -> None:
    """A path must be a diffusers folder; what is neither a path nor owner/name is a typo. Hub ids and `builtin:`
    models are checked when they load (a hub lookup is not a second's work)."""
    if source.startswith("builtin:"):
        return
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"'{source}' is not a diffusers pipeline folder (no model_index.json)",
                            "point model.pretrained at a folder written by save_pretrained or `cdmctl export`")  # fmt: skip
        return
    if not (HUB_ID.match(source) and not source.startswith(".")):
        raise UserError(f"model folder '{source}' does not exist",
                        "check the path, or use a hub id (owner/name), or builtin:tiny-sd3 for a smoke test")  # fmt: skip
