"""The proving grounds by built-in name: which ground truth, which shipped teacher folder, which time shift."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Ground:
    """One proving ground: `builtin:<name>` is its trained teacher, `truth()` its exact ground truth."""

    name: str
    folder: Path  # the shipped, trained teacher pipeline
    truth: Callable[[], object]  # GroundTruth or CoupledGroundTruth (the same interface)
    shift: float  # the teacher scheduler's time shift (what it samples and distils with)
    about: str


def _points():
    from cdmctl.proving.groundtruth import GroundTruth

    return GroundTruth()


def _coupled():
    from cdmctl.proving.coupled import CoupledGroundTruth

    return CoupledGroundTruth()


GROUNDS = {
    "toy-sd3": Ground("toy-sd3", HERE / "toy_sd3", _points, 6.0,
                      "4 modes per prompt: the shape plus one small dot"),
    # shift 3 as SD3's own scheduler: this ground's few-step difficulty must come from its structure, not the shift
    "toy-sd3-coupled": Ground("toy-sd3-coupled", HERE / "toy_sd3_coupled", _coupled, 3.0,
                              "placements x medium x fine features, the detail depending on the placement"),
}  # fmt: skip


def ground_of(source: str) -> Ground | None:
    """The ground whose teacher `source` (`builtin:<name>` or the built-in cache folder) is; None for other models."""
    name = source.removeprefix("builtin:")
    if name in GROUNDS:
        return GROUNDS[name]
    longest_first = sorted(GROUNDS.values(), key=lambda g: -len(g.name))  # toy-sd3-coupled-v1... is not toy-sd3's
    return next((g for g in longest_first if Path(source).name.startswith(g.name + "-v")), None)
