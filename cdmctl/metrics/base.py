"""The metric plug-in contract and registry: each metric names its extra and loads its library lazily."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from cdmctl.distribution import install_extra
from cdmctl.errors import UserError


class ImageScorer(Protocol):
    """Scores each image against its prompt (per-image metrics: PickScore, HPSv3, CLIPScore, ...)."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


class SetScorer(Protocol):
    """Scores a whole set of images at once (FID). Returns the summary value."""

    def score_set(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float: ...


@dataclass(frozen=True)
class MetricSpec:
    """What the registry knows about one metric before anything heavy is imported."""

    name: str
    description: str
    extra: str  # pip extra that installs its back-end (cdmctl.distribution.install_extra)
    requires: tuple[str, ...]  # importable module names the extra provides
    factory: Callable[..., Any]  # (device: str, **options) -> ImageScorer | SetScorer; imports lazily
    per_image: bool = True
    higher_is_better: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # option name -> default (e.g. model ids)
    required_options: tuple[str, ...] = ()  # options with no usable default (FID's reference)
    # resolved options -> the hub sources the factory will load ('owner/repo' or 'owner/repo/file')
    weights: Callable[[dict[str, Any]], list[str]] | None = None

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def check_installed(self) -> None:
        missing = self.missing()
        if missing:
            raise UserError(
                f"metric '{self.name}' needs {', '.join(missing)}, which is not installed",
                install_extra(self.extra),
            )

    def check_weights(self, options: dict[str, Any]) -> None:
        """Refuse now, before any image is generated, weights that cannot be loaded (offline and not cached)."""
        from cdmctl.metrics.availability import unavailable

        missing = unavailable([s for s in self.weights(options) if s]) if self.weights else []
        if missing:
            raise UserError(
                f"metric '{self.name}' needs {', '.join(missing)}, which is not in the local hub cache (HF_HUB_OFFLINE is set)",
                "download it once online (unset HF_HUB_OFFLINE), or point the metric's option at a local copy",
            )

    def resolve_options(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with `overrides`; unknown or missing required options are UserErrors."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.options))
        if unknown:
            known = ", ".join(f"{self.name}.{k}" for k in self.options) or "none"
            raise UserError(f"metric '{self.name}' has no option {', '.join(unknown)}", f"options: {known}")
        resolved = {**self.options, **overrides}
        for name in self.required_options:
            if resolved.get(name) in (None, ""):
                raise UserError(
                    f"metric '{self.name}' needs the option '{name}'",
                    f"pass --metric-option {self.name}.{name}=VALUE",
                )
        return resolved


REGISTRY: dict[str, MetricSpec] = {}
# Other spellings -> registered name: the CDM reference's metric names (its `dpgbench`) and common variants,
# so that a command line copied from it works unchanged. Results are stored under the registered name.
ALIASES: dict[str, str] = {"dpgbench": "dpg", "dpg-bench": "dpg", "dpg_bench": "dpg", "hps": "hpsv2",
                           "hpsv2.1": "hpsv2", "clip": "clipscore", "clip_score": "clipscore",
                           "pick_score": "pickscore", "image_reward": "imagereward", "aes": "aesthetic"}


def canonical_name(name: str) -> str:
    """The registered name of a metric given in any accepted spelling (case-insensitive)."""
    lowered = name.strip().lower()
    return ALIASES.get(lowered, lowered)


def register(spec: MetricSpec) -> MetricSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"metric {spec.name} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    if canonical_name(name) not in REGISTRY:
        raise UserError(f"unknown metric '{name}'", f"available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[canonical_name(name)]
