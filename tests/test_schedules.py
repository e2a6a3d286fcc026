"""Schedules and per-sample samplers: ranges, ordering, coverage, stratification, reproducibility."""

import pytest
import torch

from cdmctl.engine.rng import generator
from cdmctl.engine.schedules import (
    fixed_schedule,
    sample_dynamic_schedule,
    sample_levels,
    sample_record_index,
)


def test_fixed_schedule_keeps_levels_and_rejects_bad_ones():
    assert fixed_schedule([1.0, 0.75, 0.5, 0.25]).tolist() == [1.0, 0.75, 0.5, 0.25]
    assert fixed_schedule([1.0]).dtype == torch.float64
    for bad in ([], [0.9, 0.5], [1.0, 0.5, 0.5], [1.0, 0.5, 0.0], [1.0, 0.2, 0.5]):
        with pytest.raises(ValueError):
            fixed_schedule(bad)


def test_dynamic_schedule_starts_at_one_strictly_decreases_and_stays_in_range():
    gen = generator(0, "schedule")
    for inner in ("uniform", "stratified"):
        for _ in range(300):
            s = sample_dynamic_schedule(gen, (1, 28), (0.25, 0.95), inner)
            assert s.dtype == torch.float64 and s[0] == 1.0
            assert bool((s[1:] < s[:-1]).all())
            assert bool(((s[1:] >= 0.25) & (s[1:] <= 0.95)).all())


def test_dynamic_schedule_lengths_cover_the_whole_range():
    gen = generator(1, "schedule")
    lengths = {sample_dynamic_schedule(gen, (1, 28)).numel() for _ in range(2000)}
    assert lengths == set(range(1, 29))
    gen = generator(2, "schedule")
    assert {sample_dynamic_schedule(gen, (3, 5)).numel() for _ in range(200)} == {3, 4, 5}


def test_stratified_schedule_puts_exactly_one_level_in_each_bin():
    gen = generator(3, "schedule")
    lo, hi = 0.25, 0.95
    for _ in range(200):
        s = sample_dynamic_schedule(gen, (2, 28), (lo, hi), "stratified")
        inner = s[1:].flip(0)  # ascending: level k must lie in bin k
        m = inner.numel()
        width = (hi - lo) / m
        bins = ((inner - lo) / width).floor().long().clamp(max=m - 1)
        assert bins.tolist() == list(range(m))


def test_same_generator_seed_gives_the_same_schedule():
    a = [sample_dynamic_schedule(generator(7, 12, "schedule")) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = [sample_dynamic_schedule(generator(7, i, "schedule")).tolist() for i in range(20)]
    assert len({tuple(x) for x in b}) == 20


def test_ranks_share_the_length_but_draw_their_own_inner_levels():
    # the caller's multi-process rule: gen from (seed, iteration), inner_gen from (seed, iteration, rank)
    per_rank = [
        sample_dynamic_schedule(generator(0, 5, "length"), (10, 20), inner_gen=generator(0, 5, "inner", rank))
        for rank in range(4)
    ]
    assert len({s.numel() for s in per_rank}) == 1
    assert len({tuple(s.tolist()) for s in per_rank}) == 4


def test_dynamic_schedule_of_length_one_is_just_noise_and_degenerate_range_is_refused():
    assert sample_dynamic_schedule(generator(0), (1, 1)).tolist() == [1.0]
    with pytest.raises(ValueError):
        sample_dynamic_schedule(generator(0), (1, 28), (0.5, 0.5))
    with pytest.raises(ValueError):
        sample_dynamic_schedule(generator(0), (1, 4), (0.25, 0.95), "sorted")


def test_uncapped_levels_are_uniform_then_clamped():
    s = sample_levels(generator(0, "dm"), 20000, clamp=(0.02, 0.98))
    assert s.shape == (20000,) and s.dtype == torch.float32
    assert float(s.min()) == pytest.approx(0.02) and float(s.max()) == pytest.approx(0.98)
    # mass below 0.02 piles up at the clamp: about 2% of the draws
    assert 0.01 < float((s == 0.02).float().mean()) < 0.03
    assert abs(float(s.mean()) - 0.5) < 0.01


def test_record_index_covers_every_step():
    idx = sample_record_index(generator(0, "record"), 1000, 6)
    assert idx.dtype == torch.int64 and idx.shape == (1000,)
    assert set(idx.tolist()) == set(range(6))
    assert torch.equal(idx, sample_record_index(generator(0, "record"), 1000, 6))


def shift6(s, steps=None):
    return 6 * s / (1 + 5 * s)


def test_the_shift_is_told_the_length_of_the_schedule_it_shifts():
    """Flux.2's shift depends on the step count: every level of an n-level schedule is shifted for n steps."""
    seen = []

    def recording(s, steps):
        seen.append((s.numel(), steps))
        return s * steps / 100

    for it in range(5):
        levels = sample_dynamic_schedule(generator(5, it, "length"), (2, 9), (0.05, 0.95), "stratified",
                                         inner_gen=generator(5, it, "i"), shift=recording, coverage=0.5,
                                         coverage_gen=generator(5, it, "c"))  # fmt: skip
        n = len(levels)
        assert seen[-2:] == [(n - 1, n), (2, n)]  # the inner levels and the coverage ends, both for n steps
        seen.clear()


def test_dynamic_schedule_applies_the_shift_to_every_inner_level():
    plain = sample_dynamic_schedule(generator(3, "length"), (8, 8), (0.05, 0.95), "stratified", inner_gen=generator(3, "i"))
    shifted = sample_dynamic_schedule(generator(3, "length"), (8, 8), (0.05, 0.95), "stratified",
                                      inner_gen=generator(3, "i"), shift=shift6)
    torch.testing.assert_close(shifted, shift6(plain), rtol=0, atol=1e-12)


def test_coverage_spreads_levels_evenly_over_the_shifted_range():
    lo, hi = 0.05, 0.95
    lo_s, hi_s = shift6(lo), shift6(hi)
    def levels(coverage, n=4000):
        gen, out = generator(4, "length"), []
        for it in range(n // 10):
            s = sample_dynamic_schedule(gen, (11, 11), (lo, hi), "uniform", inner_gen=generator(4, it, "i"),
                                        shift=shift6, coverage=coverage, coverage_gen=generator(4, it, "c"))
            assert s[0] == 1.0 and bool((s[1:] < s[:-1]).all())
            out.append(s[1:])
        return torch.cat(out)

    mid = (lo_s + hi_s) / 2
    through, linear, half = levels(0.0), levels(1.0), levels(0.5)
    for x in (through, linear, half):
        assert bool(((x >= lo_s - 1e-12) & (x <= hi_s + 1e-12)).all())
    # through the shift, few levels fall in the lower half of the shifted range: P(u < shift^-1(mid)) = 0.1
    assert abs(float((through < mid).double().mean()) - (mid / (6 - 5 * mid) - lo) / (hi - lo)) < 0.03
    assert abs(float((linear < mid).double().mean()) - 0.5) < 0.03  # evenly spread
    assert abs(float((half < mid).double().mean()) - (0.5 + 0.1) / 2) < 0.04  # the mixture
    with pytest.raises(ValueError, match="coverage"):
        sample_dynamic_schedule(generator(0), (2, 4), coverage=1.5)
