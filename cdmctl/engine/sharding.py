"""Sharded parameters (FSDP2's DTensors) as plain tensors: a rank's own part, full tensors gathered or split again.

Unsharded tensors pass through every function unchanged, so the callers (EMA, the fake-teacher merge, checkpoint
writing) read the same for one process, DDP and FSDP2. Gathering is collective: every rank must call it, in the
same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def resharded(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its sharded parameters registered. FSDP2 leaves the unsharded (whole) weights of the root
    in place after a forward without backward (the simulation, a sample grid); code that reads or writes the
    parameters outside forward/backward must see the shards, as the optimizer does."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return module
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
    return module


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (the tensor itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


@dataclass(frozen=True)
class Layout:
    """How a sharded tensor is spread over the ranks: enough to rebuild it from this rank's part."""

    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]


def layout_of(t: torch.Tensor) -> Layout | None:
    if not is_sharded(t):
        return None
    return Layout(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))


def full(part: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """The whole tensor from this rank's `part` (all-gather when sharded; collective), on `part`'s device."""
    if layout is None:
        return part
    from torch.distributed.tensor import DTensor

    on_mesh = part.to(layout.mesh.device_type)
    whole = DTensor.from_local(on_mesh, layout.mesh, layout.placements, shape=layout.shape, stride=layout.stride)
    return whole.full_tensor().to(part.device)


def split(whole: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """This rank's part of a full tensor that every rank holds (no communication)."""
    if layout is None:
        return whole
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(whole.to(layout.mesh.device_type), layout.mesh, layout.placements, src_data_rank=None)
    return part.to_local()


def gathered(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """A state dict with every sharded tensor gathered whole, on the CPU (collective); `keep=False` (ranks other
    than the writer) gathers the same way but keeps nothing, so host memory stays at one tensor."""
    out = {}
    for name, value in state.items():
        value = value.full_tensor() if is_sharded(value) else value
        if keep:
            out[name] = value.detach().cpu()
    return out
