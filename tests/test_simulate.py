"""Backward simulation: early stopping records what a full Euler run records, at a fraction of the cost."""

import pytest
import torch

from cdmctl.backbones.tiny.toy import ToyBackbone
from cdmctl.engine.rng import generator
from cdmctl.engine.schedules import fixed_schedule, sample_dynamic_schedule, sample_record_index
from cdmctl.engine.simulate import simulate

B = 16


@pytest.fixture(scope="module")
def setup():
    backbone = ToyBackbone(shift=3.0, seed=0)
    cond = backbone.encode_prompts([f"prompt {i % 5}" for i in range(B)])
    noise = torch.randn(B, 2, 4, 4, generator=generator(0, "noise"))
    return backbone, cond, noise


def make_velocity(backbone, cond, calls):
    def velocity(x, s, index):
        calls.append(x.shape[0])
        return backbone.velocity(backbone.transformer, x, s, cond.index(index))

    return velocity


def full_euler(backbone, cond, noise, levels):
    """The straightforward loop: every sample, every step; returns all states and velocities."""
    xs, vs, x = [], [], noise.clone()
    levels = levels.tolist() + [0.0]
    with torch.no_grad():
        for i in range(len(levels) - 1):
            v = backbone.velocity(backbone.transformer, x, torch.full((B,), levels[i]), cond)
            xs.append(x.clone())
            vs.append(v)
            x = x + (levels[i + 1] - levels[i]) * v
    return xs, vs, x


def shifted(backbone, levels):
    return backbone.shift(levels, 32, 32)


def test_early_stopping_records_the_same_points_as_a_full_run(setup):
    backbone, cond, noise = setup
    levels = shifted(backbone, sample_dynamic_schedule(generator(0, "schedule"), (8, 8)))
    idx = sample_record_index(generator(0, "record"), B, levels.numel())
    traj = simulate(make_velocity(backbone, cond, []), noise, levels, idx)
    xs, vs, _ = full_euler(backbone, cond, noise, levels)
    for b in range(B):
        i = int(idx[b])
        assert torch.allclose(traj.xt[b], xs[i][b], atol=1e-5)
        assert torch.allclose(traj.vt[b], vs[i][b], atol=1e-5)
        assert traj.s_t[b] == pytest.approx(float(levels[i]))
        assert torch.allclose(traj.x0t[b], xs[i][b] - float(levels[i]) * vs[i][b], atol=1e-5)
    assert traj.final is None


def test_early_stopping_sends_fewer_samples_through_the_student(setup):
    backbone, cond, noise = setup
    levels = fixed_schedule([1.0, 0.75, 0.5, 0.25])
    idx = torch.tensor([0, 1, 2, 3] * 4)
    calls = []
    traj = simulate(make_velocity(backbone, cond, calls), noise, levels, idx)
    # step i evaluates the samples with i_b >= i: 16, 12, 8, 4 instead of 4 * 16
    assert calls == [16, 12, 8, 4]
    assert traj.student_samples == 40 < 4 * B
    calls.clear()
    simulate(make_velocity(backbone, cond, calls), noise, levels, torch.ones(B, dtype=torch.long))
    assert calls == [16, 16]  # nobody needs steps 2 and 3


def test_keep_final_gives_the_full_euler_sample(setup):
    backbone, cond, noise = setup
    levels = shifted(backbone, fixed_schedule([1.0, 0.75, 0.5, 0.25]))
    idx = torch.zeros(B, dtype=torch.long)
    calls = []
    traj = simulate(make_velocity(backbone, cond, calls), noise, levels, idx, keep_final=True)
    _, _, final = full_euler(backbone, cond, noise, levels)
    assert torch.allclose(traj.final, final, atol=1e-5)
    assert calls == [B] * 4 and traj.student_samples == 4 * B
    assert torch.equal(traj.xt, noise)  # i_b = 0 records the starting noise


def test_min_steps_pads_with_discarded_one_sample_calls(setup):
    backbone, cond, noise = setup
    levels = fixed_schedule([1.0, 0.75, 0.5, 0.25])
    idx = torch.zeros(B, dtype=torch.long)
    plain = simulate(make_velocity(backbone, cond, []), noise, levels, idx)
    calls = []
    padded = simulate(make_velocity(backbone, cond, calls), noise, levels, idx, min_steps=3)
    assert calls == [B, 1, 1]
    assert padded.student_samples == B + 2
    for name in ("xt", "vt", "x0t", "s_t"):
        assert torch.equal(getattr(padded, name), getattr(plain, name))
    with pytest.raises(ValueError):
        simulate(make_velocity(backbone, cond, []), noise, levels, idx, min_steps=5)


def test_simulation_builds_no_graph_and_checks_indices(setup):
    backbone, cond, noise = setup
    levels = fixed_schedule([1.0, 0.5])
    traj = simulate(make_velocity(backbone, cond, []), noise, levels, torch.ones(B, dtype=torch.long))
    assert not traj.xt.requires_grad and not traj.vt.requires_grad
    assert traj.s_t.dtype == torch.float32 and traj.s_t.tolist() == [0.5] * B
    with pytest.raises(ValueError):
        simulate(make_velocity(backbone, cond, []), noise, levels, torch.full((B,), 2))


def test_several_points_along_one_trajectory_equal_separate_simulations_at_the_cost_of_the_longest(setup):
    from cdmctl.engine.simulate import simulate_points

    backbone, cond, noise = setup
    levels = shifted(backbone, sample_dynamic_schedule(generator(0, "schedule"), (10, 10)))
    gen = generator(1, "record")
    idx = torch.stack([sample_record_index(gen, B, levels.numel()) for _ in range(3)])
    calls = []
    points = simulate_points(make_velocity(backbone, cond, calls), noise, levels, idx)
    for k, point in enumerate(points):
        alone = simulate(make_velocity(backbone, cond, []), noise, levels, idx[k])
        for field in ("xt", "vt", "x0t", "s_t"):
            torch.testing.assert_close(getattr(point, field), getattr(alone, field), rtol=0, atol=1e-6)
    latest = idx.max(0).values
    assert sum(calls) == points[0].student_samples == int((latest + 1).sum())  # each sample to its latest point
    assert [p.student_samples for p in points[1:]] == [0, 0]
