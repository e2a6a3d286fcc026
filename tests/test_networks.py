"""The three networks: a LoRA fake teacher over a fully trained student shares the frozen teacher's tensors."""

from __future__ import annotations

import pytest
import torch

from cdmctl.backbones.sd3 import SD3Backbone
from cdmctl.config import load_preset
from cdmctl.engine.roles import trainable_parameters
from cdmctl.errors import UserError
from cdmctl.networks import build_networks


def preset_with(tiny_sd3_dir, *sets: str):
    return load_preset("sd3-4nfe", [f"model.pretrained={tiny_sd3_dir}", "model.resolution=32", "model.precision=fp32",
                                    "model.gradient_checkpointing=false", "model.lora.rank=4", *sets])  # fmt: skip


def storages(*modules) -> set[int]:
    return {p.data_ptr() for m in modules for p in m.parameters()}


def velocity(backbone, module, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *backbone.latent_shape(32, 32), generator=g)
    cond = backbone.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        return backbone.velocity(module, x, torch.tensor([0.9, 0.4]), cond)


def test_a_lora_fake_teacher_is_an_adapter_over_the_teachers_own_tensors(tiny_sd3_dir):
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    preset = preset_with(tiny_sd3_dir, "model.fake_teacher=lora", "method.merge_decay=1")
    student, teacher, fake = build_networks(backbone, preset, torch.float32)
    base = {n.replace(".base_layer", ""): p for n, p in fake.named_parameters() if "lora_" not in n}
    teacher_params = dict(teacher.named_parameters())
    assert base.keys() == teacher_params.keys()
    assert all(p is teacher_params[n] for n, p in base.items())  # the same tensors, not a copy
    assert not storages(student) & storages(teacher)  # the student is a trainable copy of its own
    trainable = {n for n, p in fake.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(fake))
    assert all(p.requires_grad for p in student.parameters()) and not trainable_parameters(teacher)
    torch.testing.assert_close(velocity(backbone, fake), velocity(backbone, teacher))  # B = 0: starts as the teacher


def test_a_full_fake_teacher_is_a_third_copy(tiny_sd3_dir):
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    student, teacher, fake = build_networks(backbone, preset_with(tiny_sd3_dir), torch.float32)
    assert not storages(fake) & (storages(teacher) | storages(student))
    assert all(p.requires_grad for p in fake.parameters())


@pytest.mark.parametrize("sets, message", [
    (["model.fake_teacher=lora"], "set method.merge_decay to 1"),
    (["model.train=lora", "model.fake_teacher=full"], "fake teacher is an adapter"),
])  # fmt: skip
def test_inconsistent_fake_teacher_settings_are_refused(tiny_sd3_dir, sets, message):
    with pytest.raises(UserError, match=message):
        preset_with(tiny_sd3_dir, *sets)
