"""The schedules of ``schedules.py``: the cosine prune rate at and past its ends, the sparse-to-sparse cadence,
and GMP's cubic (before, at and after its window; its cadence counted from its start; epoch cadence; one-step
windows)."""

from __future__ import annotations

import pytest

from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.schedules import (
    check_run,
    cosine_prune_rate,
    cosine_schedule,
    gmp_schedule,
    gmp_sparsity,
    scheduled_sparsity,
)

# --------------------------------------------------------------------------------------------------------------
# the cosine schedule
# --------------------------------------------------------------------------------------------------------------


def test_cosine_prune_rate():
    assert cosine_prune_rate(0, 100, 0.7) == pytest.approx(0.7)
    assert cosine_prune_rate(50, 100, 0.7) == pytest.approx((0.7 + 0.005) / 2)
    assert cosine_prune_rate(100, 100, 0.7) == pytest.approx(0.005)
    assert cosine_prune_rate(150, 100, 0.7) == pytest.approx(0.005)  # stays down past the end
    assert cosine_prune_rate(30, 100, 0.0) == 0.0  # static sparse
    rates = [cosine_prune_rate(s, 100, 0.5) for s in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_cosine_prune_rate_at_the_ends_of_short_schedules():
    assert cosine_prune_rate(5, 0, 0.5) == 0.5  # no schedule length: the initial rate
    assert cosine_prune_rate(1, 1, 0.7) == pytest.approx(0.005)  # a one-step schedule ends at the minimum
    assert cosine_prune_rate(0, 1, 0.7) == pytest.approx(0.7)
    assert cosine_prune_rate(-3, 10, 0.7) == pytest.approx(0.7)  # before the start: the initial rate
    assert cosine_prune_rate(3, 10, 0.2, final=0.5) == 0.2  # a final above the initial is clamped


def test_sparse_to_sparse_schedules_keep_the_target_and_update_on_their_cadence() -> None:
    for method in ("selfish", "rigl", "static"):
        assert scheduled_sparsity(5, 24, resolve(method, 0.6)) == 0.6, method
    config = resolve("selfish", 0.6, update_every=5)
    assert [step for step in range(1, 21) if cosine_schedule(step, 20, config) is not None] == [5, 10, 15, 20]


# --------------------------------------------------------------------------------------------------------------
# gradual magnitude pruning (GMP)
# --------------------------------------------------------------------------------------------------------------


WINDOW = dict(pruning_start=3, pruning_end=15)  # of a 24-step run


def test_gmp_sparsity_is_zero_before_its_window_cubic_inside_and_the_target_after() -> None:
    config = resolve("gmp", 0.6, update_every=4, **WINDOW)
    assert gmp_sparsity(2, 24, config) == 0.0 and gmp_sparsity(3, 24, config) == 0.0
    assert gmp_sparsity(9, 24, config) == pytest.approx(0.6 * (1 - 0.5**3))
    assert gmp_sparsity(15, 24, config) == pytest.approx(0.6) and gmp_sparsity(24, 24, config) == pytest.approx(0.6)


def test_gmp_prunes_on_its_cadence_counted_from_the_start_of_its_window() -> None:
    config = resolve("gmp", 0.6, update_every=4, **WINDOW)
    assert [step for step in range(25) if gmp_schedule(step, 24, config) is not None] == [7, 11, 15]
    # (step 3 would prune to sparsity 0: no update there)
    assert scheduled_sparsity(2, 24, config) == 0.0
    assert scheduled_sparsity(10, 24, config) == pytest.approx(gmp_sparsity(7, 24, config))  # the last pruning
    assert scheduled_sparsity(20, 24, config) == pytest.approx(0.6)


def test_gmp_with_epoch_updates_prunes_at_every_boundary_to_the_cubic_there() -> None:
    config = resolve("gmp", 0.6, update_every="epoch", pruning_start=0.125, pruning_end=0.625)  # steps 3 and 15
    assert gmp_schedule(2, 24, config) is None
    for step in (8, 16, 24):
        expected = gmp_sparsity(step, 24, config)
        assert gmp_schedule(step, 24, config).target_density == pytest.approx(1 - expected), step
        assert scheduled_sparsity(step, 24, config) == pytest.approx(expected), step
    assert scheduled_sparsity(10, 24, config) == pytest.approx(0.6 * (1 - (1 - 7 / 12) ** 3))


def test_a_gmp_window_may_be_one_step_and_may_end_at_the_last_step() -> None:
    at_once = resolve("gmp", 0.6, update_every=4, pruning_start=5, pruning_end=5)
    check_run(24, at_once)
    assert gmp_sparsity(4, 24, at_once) == 0.0 and gmp_sparsity(5, 24, at_once) == pytest.approx(0.6)
    assert gmp_schedule(5, 24, at_once).target_density == pytest.approx(0.4)
    to_the_end = resolve("gmp", 0.6, update_every=4, pruning_start=0, pruning_end=24)
    check_run(24, to_the_end)
    with pytest.raises(ValueError, match="the run's 23 steps"):
        check_run(23, to_the_end)
