"""The three networks of a run (student, frozen teacher, fake teacher) and their optimizers: full or LoRA."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

from cdmctl.backbones.base import Backbone
from cdmctl.config.schema import Preset
from cdmctl.engine.roles import trainable_parameters


def build_networks(backbone: Backbone, preset: Preset, compute_dtype: torch.dtype,
                   fake: bool = True) -> tuple[nn.Module, nn.Module, nn.Module | None]:  # fmt: skip
    """Student, frozen teacher and fake teacher: full copies, or LoRA adapters over one shared frozen base.

    `fake=False` (a method family without a fake teacher, TBCM) builds no fake teacher and returns None for it.
    """
    base = backbone.transformer
    frozen_dtype = compute_dtype if preset.model.frozen_precision == "compute" else torch.float32
    if preset.model.train == "lora":
        student, teacher, fake_net = lora_networks(base, backbone, preset, frozen_dtype, fake)
    else:
        # the teacher is copied from the weights as loaded (the compute dtype) before the student's float32 masters
        # exist: a bf16 teacher never has a float32 copy, not even for a moment (the same values: bf16 -> float32
        # -> bf16 is exact)
        teacher = copy.deepcopy(base).to(frozen_dtype)
        if any(p.dtype != torch.float32 for p in base.parameters()):
            base.float()  # float32 masters for the trained copies
        student = base
        student.requires_grad_(True)
        if not fake:
            fake_net = None
        elif preset.model.fake_kind == "lora":  # an adapter over the teacher's own tensors: no second copy
            teacher.requires_grad_(False)
            fake_net = adapted_copy(teacher, backbone, preset)
        else:
            fake_net = copy.deepcopy(base).requires_grad_(True)
    teacher.requires_grad_(False).eval()
    trained = [m for m in (student, fake_net) if m is not None]
    if preset.model.gradient_checkpointing:
        for module in trained:
            recompute_blocks(module, backbone.block_classes(), preset.model.checkpoint_every)
    if preset.model.compile:
        for module in (*trained, teacher):
            compile_blocks(module, backbone.block_classes())
    return student, teacher, fake_net


def recompute_blocks(module: nn.Module, block_classes: list[type[nn.Module]], every: int) -> None:
    """diffusers' activation checkpointing, of every `every`-th transformer block (1: all of them). The choice is
    an attribute of each block, so that copies of the module (the EMA, a shared copy) keep it."""
    if not hasattr(module, "enable_gradient_checkpointing"):
        return
    blocks = [m for m in module.modules() if block_classes and isinstance(m, tuple(block_classes))]
    for i, block in enumerate(blocks):
        block.cdmctl_recompute = i % every == 0
    module.enable_gradient_checkpointing(checkpoint_marked_blocks)


def checkpoint_marked_blocks(block: nn.Module, *args, **kwargs):
    """The function diffusers calls for each block when checkpointing is on: recompute it or just run it."""
    from torch.utils.checkpoint import checkpoint

    if getattr(block, "cdmctl_recompute", True):
        return checkpoint(block.__call__, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def forward_context(autocast: Callable[[], contextlib.AbstractContextManager],
                    attention: str | None) -> Callable[[], contextlib.AbstractContextManager]:  # fmt: skip
    """The context of every network forward: mixed precision, and the preset's SDPA kernel if it names one
    (through torch's sdpa_kernel, so it holds for any model that calls scaled_dot_product_attention)."""
    if attention is None:
        return autocast
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention]  # fmt: skip

    @contextlib.contextmanager
    def context():
        with autocast(), sdpa_kernel(backend):
            yield

    return context


def compile_blocks(module: nn.Module, block_classes: list[type[nn.Module]]) -> None:
    """Regional compilation: each block compiled in place (parameter names unchanged, so checkpoints are too);
    blocks of one class share the compiled code, which starts far faster than compiling the whole model."""
    blocks = tuple(block_classes)
    for sub in module.modules():
        if blocks and isinstance(sub, blocks):
            sub.compile()


def lora_networks(base: nn.Module, backbone: Backbone, preset: Preset, frozen_dtype: torch.dtype,
                  fake: bool = True):  # fmt: skip
    """Three module trees over the same frozen base tensors (no second copy in memory); the student and
    the fake teacher each get their own adapter (B = 0 at init, so both start equal to the teacher).
    Without a fake teacher (`fake=False`) the third is None."""
    base.requires_grad_(False).to(frozen_dtype)
    teacher, fake_net = shared_copy(base), (shared_copy(base) if fake else None)
    for module in (base, fake_net):  # this order: the adapters' random init is as in earlier versions
        if module is not None:
            add_lora(module, backbone, preset)
    return base, teacher, fake_net


def shared_copy(module: nn.Module) -> nn.Module:
    """A second module tree whose parameters and buffers are the same tensors as `module`'s."""
    return copy.deepcopy(module, {id(t): t for t in [*module.parameters(), *module.buffers()]})


def adapted_copy(frozen: nn.Module, backbone: Backbone, preset: Preset) -> nn.Module:
    """A LoRA adapter over `frozen`'s tensors (shared, not copied); equal to `frozen` at init (B = 0)."""
    module = shared_copy(frozen)
    add_lora(module, backbone, preset)
    return module


def add_lora(module: nn.Module, backbone: Backbone, preset: Preset) -> None:
    """Add the preset's LoRA adapter (float32 masters) to `module`, whose own weights stay frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = preset.model.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.targets or backbone.lora_target_modules())
    if hasattr(module, "add_adapter"):  # diffusers models: peft's injection plus the bookkeeping export relies on
        module.add_adapter(config)
    else:  # a plain torch module (the toy backbone)
        inject_adapter_in_model(config, module)
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_key(name: str) -> str:
    """An adapter parameter's name as peft saves it (without the adapter's own name)."""
    return name.replace(".default.", ".")


def adamw(module: nn.Module, lr: float, preset: Preset, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The preset's AdamW over `module`'s trainable parameters: torch's, or bitsandbytes' 8-bit (paged) one.

    `weight_decay` replaces the preset's (TBCM's log-variance head: 0).
    """
    o = preset.optim
    decay = o.weight_decay if weight_decay is None else weight_decay
    settings = dict(lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=decay)
    params = trainable_parameters(module)
    if o.optimizer != "adamw":
        return eight_bit_adamw(o.optimizer)(params, **settings)
    # fused on CUDA: one kernel, and no full-size temporary of the moments (~7.6 GiB for SD3-Medium)
    return torch.optim.AdamW(params, **settings, fused=torch.cuda.is_available())


def eight_bit_adamw(name: str) -> type[torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit or PagedAdamW8bit; a UserError saying what to install when it is missing."""
    from cdmctl.errors import UserError

    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(f"optim.optimizer {name} needs bitsandbytes, which is not installed",
                        "pip install bitsandbytes (CUDA GPUs), or set optim.optimizer to adamw") from exc  # fmt: skip
    return bnb.optim.PagedAdamW8bit if name == "paged-adamw-8bit" else bnb.optim.AdamW8bit
