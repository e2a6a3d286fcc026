"""Float32 exponential moving average of the student's trainable parameters."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from cdmctl.engine.sharding import full, layout_of, local, resharded, split

# wrappers (DDP, torch.compile, FSDP1, activation checkpointing) insert these segments into names
_WRAPPER_SEGMENTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def _canonical(name: str) -> str:
    """Drop whole wrapper segments ("module.blocks.0.w" -> "blocks.0.w"; "submodule.w" is kept)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {_canonical(n): p for n, p in resharded(module).named_parameters() if p.requires_grad}


class StudentEMA:
    """Shadow float32 copies of `module`'s trainable parameters, keyed by their unwrapped names.

    The keys are the unwrapped student's own parameter names (those of its state_dict). Pass the
    unwrapped module; wrapper segments are stripped anyway, so a wrapped module maps to the same
    keys. `device` keeps the shadow elsewhere (e.g. "cpu") to save accelerator memory.

    Under FSDP2 each rank keeps the float32 average of its own shard only (the parameters are DTensors; the
    shadow is their local part), so the EMA is sharded like the optimizer states. `state_dict` gathers it
    whole (collective: every rank calls it), `load_state_dict` takes whole tensors and keeps each rank's part.
    """

    def __init__(self, module: nn.Module, max_decay: float = 0.999, device: torch.device | str | None = None):
        self.max_decay = max_decay
        params = _trainable(module)
        self.layouts = {n: layout_of(p) for n, p in params.items()}
        with torch.no_grad():
            self.shadow = {
                n: local(p).detach().to(device=device or local(p).device, dtype=torch.float32, copy=True)
                for n, p in params.items()
            }

    @staticmethod
    def decay(step: int, max_decay: float = 0.999) -> float:
        """min((1 + step) / (10 + step), max_decay): fast tracking early, slow averaging later."""
        return min((1 + step) / (10 + step), max_decay)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """shadow <- d shadow + (1 - d) theta with d = decay(step)."""
        weight = 1.0 - self.decay(step, self.max_decay)
        for name, p in self._matched(module).items():
            shadow = self.shadow[name]
            shadow.lerp_(local(p).detach().to(device=shadow.device, dtype=torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (in its own dtype and device)."""
        for name, p in self._matched(module).items():
            part = local(p)
            part.copy_(self.shadow[name].to(device=part.device, dtype=part.dtype))

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block `module` holds the averaged weights (e.g. for sample grids); restored after."""
        with torch.no_grad():
            saved = {n: local(p).detach().clone() for n, p in self._matched(module).items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in self._matched(module).items():
                    local(p).copy_(saved[name])

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Flat {parameter name: whole float32 tensor} (safetensors-ready). Sharded: gathered, collective; with
        `keep=False` (a rank that does not write it) nothing is kept."""
        out = {}
        for name, shadow in self.shadow.items():
            whole = full(shadow, self.layouts[name]).detach().clone()
            if keep:
                out[name] = whole.cpu() if self.layouts[name] is not None else whole
        return out

    def merged_state_dict(self, module: nn.Module | None = None, state: dict[str, torch.Tensor] | None = None,
                          keep: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
        """A student state dict (`state`, default `module.state_dict()`) with the averaged weights in place: loads
        strictly into the student. Under FSDP2 pass the gathered `state` (e.g. accelerate's get_state_dict)."""
        averaged = self.state_dict(keep=keep)
        if not keep:
            return {}
        state = dict(module.state_dict() if state is None else state)
        by_name = {_canonical(k): k for k in state}
        for name, value in averaged.items():
            key = by_name[name]
            state[key] = value.to(dtype=state[key].dtype)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load whole tensors (a `state_dict()` or `merged_state_dict()`; keys not averaged are ignored); each rank
        keeps its own part. `state` may be a lazy mapping (e.g. a safetensors file opened, not read)."""
        names = {_canonical(k): k for k in state.keys()}
        missing = sorted(set(self.shadow) - set(names))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} of the student's trainable parameters, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                whole = state[names[name]]
                shadow.copy_(split(whole.to(torch.float32), self.layouts[name]))

    def _matched(self, module: nn.Module) -> dict[str, nn.Parameter]:
        params = _trainable(module)
        if params.keys() != self.shadow.keys():
            diff = sorted(set(params) ^ set(self.shadow))[:3]
            raise KeyError(f"the module's trainable parameters differ from the EMA's (e.g. {diff}): pass the student")
        return params
