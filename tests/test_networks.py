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


@pytest.mark.parametrize("name, flags", [("math", (False, False, True)), ("efficient", (False, True, False)),
                                         ("flash", (True, False, False))])  # fmt: skip
def test_attention_backend_holds_for_every_attention_call_of_a_forward(tiny_sd3_dir, monkeypatch, name, flags):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cdmctl.networks import forward_context

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        b = torch.backends.cuda
        seen.append((b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()))
        with sdpa_kernel(SDPBackend.MATH):  # computed with the math kernel: this CPU may lack the chosen one
            return sdpa(*args, **kwargs)

    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with forward_context(contextlib.nullcontext, name)():
        velocity(backbone, backbone.transformer)
    assert seen and all(s == flags for s in seen)
    assert torch.backends.cuda.math_sdp_enabled()  # restored after the context
    assert forward_context(contextlib.nullcontext, None) is contextlib.nullcontext


def test_regional_compile_compiles_each_transformer_block_in_place(tiny_sd3_dir, monkeypatch):
    from diffusers.models.attention import JointTransformerBlock

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    networks = build_networks(backbone, preset_with(tiny_sd3_dir, "model.compile=true"), torch.float32)
    blocks = [m for net in networks for m in net.modules() if isinstance(m, JointTransformerBlock)]
    assert blocks and {id(m) for m in compiled} == {id(m) for m in blocks}
    assert "transformer_blocks.0.attn.to_q.weight" in networks[0].state_dict()  # names unchanged for checkpoints


def test_eight_bit_adamw_comes_from_bitsandbytes_or_says_what_to_install(tiny_sd3_dir, monkeypatch):
    import sys
    import types

    from cdmctl.networks import adamw

    module = torch.nn.Linear(2, 2)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(UserError, match="needs bitsandbytes"):
        adamw(module, 1e-4, preset_with(tiny_sd3_dir, "optim.optimizer=adamw-8bit"))
    made = {}
    fake_bnb = types.SimpleNamespace(optim=types.SimpleNamespace(
        AdamW8bit=lambda params, **kw: made.setdefault("AdamW8bit", kw),
        PagedAdamW8bit=lambda params, **kw: made.setdefault("PagedAdamW8bit", kw)))  # fmt: skip
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake_bnb)
    adamw(module, 1e-4, preset_with(tiny_sd3_dir, "optim.optimizer=paged-adamw-8bit"))
    assert made == {"PagedAdamW8bit": {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4}}


def block_runs(module) -> list[int]:
    """Per transformer block, how often its forward ran (a recomputed block runs twice per forward/backward)."""
    from diffusers.models.attention import JointTransformerBlock

    blocks = [m for m in module.modules() if isinstance(m, JointTransformerBlock)]
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def student_gradient(backbone, student) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backbone.latent_shape(32, 32), generator=g)
    v = backbone.velocity(student, x, torch.tensor([0.9, 0.4]), backbone.encode_prompts(["a cat", "a dog"]))
    v.square().mean().backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every, recomputed", [(1, [True, True]), (2, [True, False])])
def test_checkpoint_every_recomputes_every_nth_block_and_keeps_the_gradient(tiny_sd3_dir, every, recomputed):
    plain_backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    plain = build_networks(plain_backbone, preset_with(tiny_sd3_dir), torch.float32)[0]
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    preset = preset_with(tiny_sd3_dir, "model.gradient_checkpointing=true", f"model.checkpoint_every={every}")
    student = build_networks(backbone, preset, torch.float32)[0]
    counts = block_runs(student)
    assert len(counts) == len(recomputed)  # the tiny SD3 has two blocks
    got = student_gradient(backbone, student)
    assert counts == [2 if r else 1 for r in recomputed]  # forward, plus the recompute in backward where marked
    want = student_gradient(plain_backbone, plain)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("train", ["full", "lora"])
def test_frozen_precision_sets_the_dtype_of_the_frozen_weights_only(tiny_sd3_dir, train):
    def dtypes(frozen):
        backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir), dtype=torch.bfloat16)
        preset = preset_with(tiny_sd3_dir, f"model.train={train}", f"model.frozen_precision={frozen}")
        student, teacher, fake = build_networks(backbone, preset, torch.bfloat16)
        frozen_params = [p for m in (student, teacher, fake) for p in m.parameters() if not p.requires_grad]
        trained = [p for m in (student, fake) for p in m.parameters() if p.requires_grad]
        return {p.dtype for p in frozen_params}, {p.dtype for p in trained}

    assert dtypes("compute") == ({torch.bfloat16}, {torch.float32})
    assert dtypes("fp32") == ({torch.float32}, {torch.float32})


def test_an_offloaded_teacher_is_copied_in_block_by_block_and_predicts_as_before(tiny_sd3_dir, monkeypatch):
    from types import SimpleNamespace

    from diffusers.hooks.group_offloading import ModuleGroup

    from cdmctl.parallel import place_teacher

    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir))
    preset = preset_with(tiny_sd3_dir, "model.teacher_device=cpu")
    _, teacher, _ = build_networks(backbone, preset, torch.float32)
    before = velocity(backbone, teacher)
    onloads = []
    real_onload = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda group: onloads.append(group) or real_onload(group))
    acc = SimpleNamespace(device=torch.device("cpu"), is_fsdp2=False)
    placed = place_teacher(acc, "shard", teacher, preset.model.teacher_device)
    after = velocity(backbone, placed)
    blocks = len(teacher.transformer_blocks)
    assert len(onloads) >= blocks  # every block (and the unblocked rest) brought in for the forward
    assert all(p.device.type == "cpu" for p in placed.parameters())
    torch.testing.assert_close(after, before)


def test_an_offloaded_teacher_needs_its_own_weights_and_a_whole_teacher(tiny_sd3_dir):
    from cdmctl.parallel import FSDP2, check_supported

    for sets in (["model.train=lora"], ["model.fake_teacher=lora", "method.merge_decay=1"]):
        with pytest.raises(UserError, match="shared with trained networks"):
            preset_with(tiny_sd3_dir, "model.teacher_device=cpu", *sets)
    preset = preset_with(tiny_sd3_dir, "model.teacher_device=cpu")
    with pytest.raises(UserError, match="set parallel.teacher to replicate"):
        check_supported(preset, FSDP2)
    check_supported(preset_with(tiny_sd3_dir, "model.teacher_device=cpu", "parallel.teacher=replicate"), FSDP2)


def test_a_bf16_teacher_is_copied_from_the_loaded_weights_never_from_float32_masters(tiny_sd3_dir, monkeypatch):
    import copy
    from types import SimpleNamespace

    import cdmctl.networks as networks

    copied = []

    def deepcopy(module, memo=None):
        copied.append({p.dtype for p in module.parameters()})
        return copy.deepcopy(module, memo)

    monkeypatch.setattr(networks, "copy", SimpleNamespace(deepcopy=deepcopy))
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_dir), dtype=torch.bfloat16)
    student, teacher, _ = build_networks(backbone, preset_with(tiny_sd3_dir), torch.bfloat16)
    assert copied[0] == {torch.bfloat16}  # the teacher's copy: made before the student became float32
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
