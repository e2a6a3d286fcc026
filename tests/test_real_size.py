"""Every shipped preset's training step at its real architecture and resolution, on the meta device, through
distill's own Distiller (benchmarks/real_size.py): no shape error anywhere in one TTUR cycle, one student update, and
FLOPs that follow from the architecture.

Meta networks compute nothing, but every operation still goes through torch's Python reference kernels (about a
millisecond each; one FLUX.2 [klein] forward is about a second), so the default run takes one preset, the smallest
model (FLUX.2 [klein] 4B, full fine-tune, every network a full copy) at batch 1 with the training seed whose two drawn
schedules have one step each (`train.seed=6`; the schedule's range is the preset's). Every real preset at its own
seed and batch 2 is marked slow and run by `python benchmarks/real_size.py` (results in
benchmarks/results/real_size.md). TBCM (`sd3-tbcm`, SD3-Medium) runs by default too, with a two-level route (one
training point per prompt) at batch 1: its teacher rollout, the student's JVP (torch.func.jvp through the meta
boundary's forward-mode rule) and one student update.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_size  # noqa: E402

FAST = ("flux2-klein-4nfe", 1, ("train.seed=6",))  # preset, batch, overrides (see the module docstring)


def cases():
    slow = [pytest.param(name, 2, (), marks=pytest.mark.slow) for name in real_size.real_presets() if name != "sd3-tbcm"]
    return [pytest.param(*FAST, id="fast-" + FAST[0]), *slow]


@pytest.mark.parametrize(("name", "batch", "overrides"), cases())
def test_one_cycle_runs_at_real_size_and_counts_its_flops(name, batch, overrides):
    row = real_size.run_cycle(name, batch, overrides)
    # a forward of one sample: at least 2 FLOPs per weight per token of the image (every linear layer sees every
    # image token), so the count is of the real network at the real resolution
    from cdmctl.backbones.architectures import build, for_model, weight_count

    arch = for_model(row["model"])
    tokens = row["latent"][-1] * row["latent"][-2] // (4 if arch.family != "flux2-klein" else 1)  # 2x2 patches
    weights = weight_count(build(arch.transformer))
    assert row["flops_forward_per_sample"] > 2 * 0.8 * weights * tokens
    # the cycle: every sample through the student at least once with backward (x3) and the teacher once
    assert row["flops_cycle"] > 4 * row["batch_per_process"] * row["flops_forward_per_sample"]
    assert row["cost"]["cost/student_bwd"] > 0 and row["cost"]["cost/fake_bwd"] > 0


TBCM = ("sd3-tbcm", 1, ("method.tbcm.route_steps=2",))  # one training point per prompt (see the module docstring)


TBCM_CASES = [pytest.param(*TBCM, id="fast-sd3-tbcm"), pytest.param("sd3-tbcm", 2, (), marks=pytest.mark.slow)]


@pytest.mark.parametrize(("name", "batch", "overrides"), TBCM_CASES)
def test_a_tbcm_cycle_runs_at_real_size_with_its_jvp(name, batch, overrides):
    row = real_size.run_cycle(name, batch, overrides)
    route = row["schedule_lengths"][0]
    points = (route - 1) * batch  # the rollout's training points
    assert row["iterations"] == 1 and row["jvp"] == "autograd"
    assert row["cost"] == {"cost/teacher_fwd": 2 * route * batch,  # CFG: conditional and unconditional
                           "cost/student_jvp_fwd": 3 * points, "cost/student_fwd": points, "cost/student_bwd": points}
    # the FLOPs: the teacher's forwards, the student's forward and backward (3 forwards), and its JVP, which is
    # three matmuls per linear layer (primal, tangent, and the zero weight tangent torch.func.jvp carries): were the
    # JVP's tangent not counted (or its dual tensors detached at the boundary), the cycle would fall below this
    fwd = row["flops_forward_per_sample"]
    assert row["flops_cycle"] > (2 * route * batch + 3 * points + 3 * points) * fwd


def test_a_jvp_crosses_the_boundary_as_a_jvp_of_the_meta_network():
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = nn.Linear(8, 4)
    x, v = torch.zeros(3, 8), torch.ones(3, 8)
    with FlopCounterMode(display=False) as direct, torch.no_grad():
        torch.func.jvp(net, (x.to("meta"),), (v.to("meta"),))
    boundary = real_size.MetaBoundary(net)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # as jvp_autograd calls it
        boundary.counter = counter
        out, tangent = torch.func.jvp(boundary, (x,), (v,))
    assert out.shape == tangent.shape == (3, 4) and tangent.device.type == "cpu" and not tangent.any()
    # the boundary's forward and its jvp rule each run the primal; one is taken off: one dual-tensor forward's FLOPs
    assert counter.get_total_flops() == direct.get_total_flops() > 2 * (2 * 3 * 8 * 4)  # more than primal + tangent


def test_a_repeated_call_without_gradient_is_replayed_with_its_flops():
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = nn.Linear(8, 4)
    runs = []
    net.register_forward_hook(lambda *_: runs.append(1))
    boundary = real_size.MetaBoundary(net)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        boundary.counter = counter
        out = boundary(torch.zeros(3, 8))
        boundary(torch.ones(3, 8))  # the same shapes: replayed, not run
        boundary(torch.zeros(5, 8))  # another shape: run
    assert len(runs) == 2 and out.shape == (3, 4) and out.device.type == "cpu"
    assert counter.get_total_flops() == 2 * (2 * 3 * 8 * 4) + 2 * 5 * 8 * 4  # 2 FLOPs per multiply-add
