"""Training-free samplers by name (cdmctl.samplers): diffusers' schedulers, their levels against hand-derived values,
and the same samplers on the toy teacher as the proving ground's own paths; the level rule of each method."""

from __future__ import annotations

import math

import pytest
import torch

from cdmctl.config import load_preset
from cdmctl.config.schema import sampling_of
from cdmctl.errors import UserError
from cdmctl.samplers import (SAMPLERS, check_sampler, make_scheduler, run_scheduler, sampler_levels, scheduler_sigmas,
                             trigflow_levels, unshifted_levels)  # fmt: skip

STEPS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def toy_scheduler():
    """The toy teacher's scheduler: FlowMatchEulerDiscreteScheduler at shift 6."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=6.0)


def shifted(k: float, s: float) -> float:
    return k * s / (1 + (k - 1) * s)


def sigmas(name, shift, base, n):
    return scheduler_sigmas(make_scheduler(name, shift, base), sampler_levels(name, n))


@pytest.mark.parametrize("n", STEPS)
def test_euler_steps_through_the_uniform_levels_with_or_without_the_shift(toy_scheduler, n):
    uniform = [1 - i / n for i in range(n)]  # 1, 1 - 1/n, ..., 1/n
    assert sigmas("euler", 1.0, toy_scheduler, n) == pytest.approx(uniform, abs=1e-6)
    assert sigmas("euler", None, toy_scheduler, n) == pytest.approx([shifted(6, s) for s in uniform], abs=1e-6)
    assert sigmas("euler", 3.0, toy_scheduler, n) == pytest.approx([shifted(3, s) for s in uniform], abs=1e-6)


def test_the_schedulers_get_the_levels_derived_by_hand(toy_scheduler):
    # Euler at the toy's shift 6: 6 s / (1 + 5 s) of 1, .75, .5, .25 -> 1, 4.5/4.75, 3/3.5, 1.5/2.25
    assert sigmas("euler", None, toy_scheduler, 4) == pytest.approx([1, 0.947368, 0.857143, 0.666667], abs=1e-6)
    # DPM-Solver++'s flow sigmas space their own: (1 - 1/1000)(1 - i/n) -> 0.999, 0.74925, 0.4995, 0.24975
    assert sigmas("dpmpp-2m", 1.0, toy_scheduler, 4) == pytest.approx([0.999, 0.74925, 0.4995, 0.24975], abs=1e-6)
    assert sigmas("dpmpp-2m", 1.0, toy_scheduler, 2) == pytest.approx([0.999, 0.4995], abs=1e-6)
    assert sigmas("dpmpp-2m", 1.0, toy_scheduler, 1) == pytest.approx([0.999], abs=1e-6)
    # UniPC takes the levels, less 1e-6 at the first (its log(alpha) would be infinite at 1)
    assert sigmas("unipc", 1.0, toy_scheduler, 2) == pytest.approx([1 - 1e-6, 0.5], abs=1e-7)
    assert sigmas("unipc", None, toy_scheduler, 2) == pytest.approx([1 - 1e-6, 3 / 3.5], abs=1e-6)
    # x0 + fresh noise: the TrigFlow levels; 8 steps: t = k pi / 16, s = tan t / (1 + tan t)
    expected = [1.0] + [math.tan(k * math.pi / 16) / (1 + math.tan(k * math.pi / 16)) for k in range(7, 0, -1)]
    assert sigmas("x0-renoise", 1.0, toy_scheduler, 8) == pytest.approx(expected, abs=1e-6)


def test_trigflow_levels_are_the_authors_times_at_their_flow_levels():
    assert trigflow_levels(1) == [1.0]
    # 2 steps: t = [pi/2, 1.0] (not linspace's pi/4): s = sin 1 / (sin 1 + cos 1) = 0.841471 / 1.381773
    assert trigflow_levels(2) == pytest.approx([1.0, 0.608979], abs=1e-6)
    # 4 steps: t = pi/2, 3pi/8, pi/4, pi/8 -> 1, 1/sqrt 2, 1/2, 1 - 1/sqrt 2
    assert trigflow_levels(4) == pytest.approx([1.0, 0.707107, 0.5, 0.292893], abs=1e-6)
    assert unshifted_levels("uniform", 4) == [1.0, 0.75, 0.5, 0.25]


def test_dpmpp_and_unipc_are_diffusers_classes_with_flow_settings_and_the_chosen_shift(toy_scheduler):
    dpm = make_scheduler("dpmpp-2m", 2.5, toy_scheduler)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert (dpm.config.algorithm_type, dpm.config.solver_order, dpm.config.use_flow_sigmas,
            dpm.config.prediction_type, dpm.config.flow_shift) == ("dpmsolver++", 2, True, "flow_prediction", 2.5)
    unipc = make_scheduler("unipc", None, toy_scheduler)  # the model's own shift carries over
    assert type(unipc).__name__ == "UniPCMultistepScheduler" and unipc.config.flow_shift == 6.0
    assert unipc.config.use_flow_sigmas and unipc.config.prediction_type == "flow_prediction"
    assert make_scheduler("x0-renoise", None, toy_scheduler).config.stochastic_sampling
    assert not make_scheduler("euler", None, make_scheduler("x0-renoise", None, toy_scheduler)).config.stochastic_sampling


def test_settings_survive_a_config_that_lacked_them(tmp_path):
    """A scheduler loaded from a config without a key (SD3's on the hub has no stochastic_sampling) lists it in
    `_use_default_values`, which diffusers' from_config would let win over the value set."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                                "shift": 3.0}))  # fmt: skip
    base = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert "stochastic_sampling" in base.config["_use_default_values"]
    renoise = make_scheduler("x0-renoise", 1.0, base)
    assert renoise.config.stochastic_sampling and renoise.config.shift == 1.0 and not renoise.config.use_dynamic_shifting


def test_an_unknown_sampler_is_refused_with_the_list():
    with pytest.raises(UserError) as err:
        check_sampler("heunn")
    assert "heunn" in err.value.message and all(name in err.value.fix for name in SAMPLERS)


def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a network: depends on x and the level."""
    return 0.7 * x + s.view(-1, *[1] * (x.dim() - 1)) * torch.sin(x)


def test_x0_renoise_through_diffusers_is_the_engines_consistency_sampler(toy_scheduler):
    from cdmctl.engine.trigflow import consistency_sample

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    levels = sampler_levels("x0-renoise", 4)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    ours = run_scheduler(make_scheduler("x0-renoise", 1.0, toy_scheduler), velocity, noise, levels, gens)
    # the same fresh noise: each row's generator, one draw per step, as diffusers' randn_tensor takes them
    again = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    renoise = torch.stack([torch.cat([torch.randn((1, 2, 4, 4), generator=g) for g in again]) for _ in range(3)])
    engine = consistency_sample(lambda x, s, i: velocity(x, s), noise, torch.tensor(levels), renoise)
    assert torch.allclose(ours, engine, atol=1e-5)


@pytest.fixture(scope="module")
def toy():
    from cdmctl.backbones import ensure_builtin
    from cdmctl.proving import teacher
    from cdmctl.proving.groundtruth import GroundTruth

    backbone = teacher.load(ensure_builtin("toy-sd3"))
    gt = GroundTruth()
    rows = backbone.encode_prompts(gt.prompts[:4])
    return backbone, rows, torch.randn(4, *gt.latent_shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n", STEPS)
def test_euler_through_the_diffusers_scheduler_is_the_proving_grounds_euler_on_the_toy(toy, n):
    from cdmctl.proving import evaluate, teacher

    backbone, rows, noise = toy
    ours = evaluate.sample(backbone, backbone.transformer, rows, noise, n, teacher.RESOLUTION)  # shift 6
    assert torch.allclose(evaluate.sample_scheduled(backbone, backbone.transformer, rows, noise, n, "euler"), ours,
                          atol=1e-5)  # fmt: skip
    unshifted = evaluate.sample(backbone, backbone.transformer, rows, noise, n, teacher.RESOLUTION, time_shift=False)
    scheduled = evaluate.sample_scheduled(backbone, backbone.transformer, rows, noise, n, "euler", shift=1.0)
    assert torch.allclose(scheduled, unshifted, atol=1e-5)
    assert n == 1 or not torch.allclose(scheduled, ours, atol=1e-3)  # the shift matters beyond one step


def test_students_levels_follow_their_method_and_inference_time_shift(toy):
    from cdmctl.proving import evaluate, teacher

    backbone = toy[0]
    # demo trains on an unshifted schedule and samples that way; a shifted schedule samples shifted unless told
    assert sampling_of(load_preset("demo").model_dump(mode="json")) == ("euler", "uniform", False)
    shifted = ["method.schedule.time_shift=true"]
    assert sampling_of(load_preset("demo", shifted).model_dump(mode="json")) == ("euler", "uniform", True)
    assert sampling_of(load_preset("demo-tbcm").model_dump(mode="json")) == ("consistency", "trigflow", False)
    assert sampling_of(load_preset("demo", [*shifted, "inference.time_shift=false"]).model_dump(mode="json"))[2] is False
    tbcm = evaluate.inference_levels(backbone, 2, teacher.RESOLUTION, time_shift=False, rule="trigflow")
    assert tbcm.tolist() == pytest.approx([1.0, 0.608979], abs=1e-6)
    cdm = evaluate.inference_levels(backbone, 2, teacher.RESOLUTION)
    assert cdm.tolist() == pytest.approx([1.0, 3 / 3.5], abs=1e-6)  # 6 * 0.5 / (1 + 5 * 0.5)


def test_a_presets_own_levels_are_sampled_at_their_step_count_only(toy):
    """inference.levels (how generate and export sample a student) reach the proving ground's evaluation too."""
    from cdmctl.proving import evaluate, teacher

    backbone = toy[0]
    own = evaluate.inference_levels(backbone, 2, teacher.RESOLUTION, False, "trigflow", levels=[1.0, 0.406])
    assert own.tolist() == pytest.approx([1.0, 0.406])
    other = evaluate.inference_levels(backbone, 4, teacher.RESOLUTION, False, "trigflow", levels=[1.0, 0.406])
    assert other.tolist() == pytest.approx(evaluate.inference_levels(backbone, 4, teacher.RESOLUTION, False,
                                                                     "trigflow").tolist())  # fmt: skip
    shifted = evaluate.inference_levels(backbone, 2, teacher.RESOLUTION, True, "uniform", levels=[1.0, 0.5])
    assert shifted.tolist() == pytest.approx([1.0, 3 / 3.5], abs=1e-6)  # the preset's levels go through the shift
