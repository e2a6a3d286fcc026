"""Every family's real networks (cdmctl.backbones.architectures), built on the meta device from their published
configs: the values held match the size each publisher states, and the adapter runs around them.

Tolerance: the stated sizes are rounded ("2B", "6B", "20B"), so a count within 5% of the stated figure passes; a
wrong layer count, width or head count moves it by far more (one SD3-Medium block is 3.5%, one Qwen-Image block 1.7%,
a Qwen3-4B layer 2.5%, and a width off by one head moves a transformer by 8% or more).
"""

from __future__ import annotations

import pytest
import torch

from cdmctl.backbones.architectures import ARCHITECTURES, build, for_model, meta_backbone, weight_count

TOLERANCE = 0.05
PARTS = sorted({(p.cls, p.source): p for a in ARCHITECTURES.values()
                for p in (a.transformer, *a.text_encoders, a.vae)}.values(), key=lambda p: p.source)  # fmt: skip


@pytest.mark.parametrize("part", PARTS, ids=[p.source.split(" ")[0] + ":" + p.source.split(" ")[1] for p in PARTS])
def test_meta_network_holds_the_published_size(part):
    module = build(part)
    assert all(t.is_meta for t in module.state_dict().values())  # no storage was allocated
    count = weight_count(module)
    assert part.published, f"{part.source}: no published size recorded"
    assert abs(count / part.published - 1) <= TOLERANCE, f"{part.source}: {count / 1e9:.3f}B vs {part.published / 1e9:.3f}B"


def test_weight_count_counts_persistent_buffers_and_tied_tensors_once():
    layer = torch.nn.Linear(3, 2)  # 8 values
    layer.register_buffer("table", torch.zeros(5))  # persistent: saved
    layer.register_buffer("scratch", torch.zeros(7), persistent=False)  # not saved
    tied = torch.nn.Sequential(layer, torch.nn.Linear(3, 2))
    tied[1].weight = layer.weight  # 6 shared values, counted once: 8 + 5 + 2 (second bias)
    assert weight_count(tied) == 15


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_meta_backbone_gives_the_latent_shape_and_blocks_of_the_real_model(name):
    arch = ARCHITECTURES[name]
    backbone = meta_backbone(arch)
    assert backbone.transformer is not None and next(backbone.transformer.parameters()).is_meta
    shape = backbone.latent_shape(1024, 1024)
    channels = {"flux2-klein": 128}.get(arch.family, 16)
    side = 1024 // (16 if arch.family == "flux2-klein" else 8)
    assert shape == (channels, side, side)
    blocks = [m for m in backbone.transformer.modules() if isinstance(m, tuple(backbone.block_classes()))]
    layers = arch.transformer.config
    # Z-Image: its main layers and both refiners (noise and context) are blocks of one class
    refiners = 2 * layers.get("n_refiner_layers", 0)
    assert len(blocks) == layers.get("num_layers", 0) + layers.get("num_single_layers", 0) + layers.get("n_layers", 0) \
        + refiners  # fmt: skip
    assert backbone.shift(torch.tensor([1.0]), 1024, 1024, 4).item() == pytest.approx(1.0)


def test_every_shipped_real_preset_has_its_architecture():
    from cdmctl.config.load import builtin_presets, load_preset

    for name in builtin_presets():
        preset = load_preset(name)
        if preset.model.pretrained.startswith("builtin:"):
            continue
        assert for_model(preset.model.pretrained).family == preset.model.backbone
