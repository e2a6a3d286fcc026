"""The three networks over one backbone: student G, frozen real teacher R and fake teacher F, with batched calls."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from cdmctl.backbones.base import Backbone, Conditioning  # the Protocol only: no family is named here
from cdmctl.engine.sharding import local, resharded


@dataclass
class Call:
    """One network evaluation: latents x [B, ...], levels s [B], conditioning of batch B."""

    x: torch.Tensor
    s: torch.Tensor
    cond: Conditioning


class Roles:
    """Student, teacher and fake teacher as velocity functions `(x, s, cond) -> v`.

    `student` and `fake` are the modules the optimizers own (possibly wrapped by accelerate);
    `teacher` is frozen. `autocast` is the mixed-precision context of every forward. A family without a
    fake teacher (TBCM) passes `fake=None`.
    """

    def __init__(
        self,
        backbone: Backbone,
        student: nn.Module,
        teacher: nn.Module,
        fake: nn.Module | None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    ):
        self.backbone = backbone
        self.student_module = student
        self.teacher_module = teacher
        self.fake_module = fake
        self.autocast = autocast
        self.unwrap = unwrap

    def _velocity(self, module: nn.Module, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with self.autocast():
            return self.backbone.velocity(module, x, s, cond)

    def student(self, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self._velocity(self.student_module, x, s, cond)

    def student_unwrapped(self, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The student without accelerate's DDP wrapper (torch.func.jvp needs no gradient hooks); under FSDP2 the
        sharded module itself, whose hooks gather its parameters for the forward."""
        return self._velocity(self.unwrap(self.student_module), x, s, cond)

    @torch.no_grad()
    def teacher(self, calls: Sequence[Call]) -> list[torch.Tensor]:
        """All teacher evaluations of an update in one batched forward (CFG pair, DM and CDM points)."""
        return batched(lambda x, s, c: self._velocity(self.teacher_module, x, s, c), calls)

    @torch.no_grad()
    def fake_predict(self, calls: Sequence[Call]) -> list[torch.Tensor]:
        """Fake-teacher evaluations without gradient (the student's DM/CDM directions), batched."""
        return batched(lambda x, s, c: self._velocity(self.fake_module, x, s, c), calls)

    def fake(self, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Fake-teacher forward with gradient (its own flow-matching update)."""
        return self._velocity(self.fake_module, x, s, cond)

    @torch.no_grad()
    def merge_student_into_fake(self, decay: float) -> None:
        """theta_F <- m theta_F + (1 - m) theta_G over the trainable parameters both share.

        Under FSDP2 both are sharded the same way (same blocks, same mesh), so each rank merges its own parts."""
        if decay >= 1.0 or self.fake_module is None:
            return
        student = dict(resharded(self.unwrap(self.student_module)).named_parameters())
        fake = resharded(self.unwrap(self.fake_module))
        pairs = [(p, student[n]) for n, p in fake.named_parameters() if p.requires_grad]
        fake_params = [local(p.data) for p, _ in pairs]
        student_params = [local(q.data).to(p.dtype) for p, q in pairs]
        torch._foreach_lerp_(fake_params, student_params, 1.0 - decay)

    def train_mode(self, student: bool, fake: bool) -> None:
        self.student_module.train(student)
        if self.fake_module is not None:
            self.fake_module.train(fake)


def batched(fn: Callable, calls: Sequence[Call]) -> list[torch.Tensor]:
    """Concatenate independent calls of one network, run it once, split the outputs back."""
    if not calls:
        return []
    sizes = [c.x.shape[0] for c in calls]
    x = torch.cat([c.x for c in calls])
    s = torch.cat([c.s for c in calls])
    cond = Conditioning.cat([c.cond for c in calls])
    return list(fn(x, s, cond).split(sizes))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
