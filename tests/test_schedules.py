"""The method registry's pure parts at their edges: the schedules (``schedules.py``: before, at and after the GMP
window, its cadence counted from its start, epoch cadence, one-step windows), the exact shares (``redistribution.py``:
the largest-remainder order, the signals' corner cases) and the checks of ``methods.resolve`` word for word. Written
from the surviving mutants of a mutation run (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

from lightning_selfish.methods import resolve
from lightning_selfish.redistribution import allocate_counts, mean_active_magnitude, momentum_of
from lightning_selfish.schedules import check_run, cosine_schedule, gmp_schedule, gmp_sparsity, scheduled_sparsity

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


def test_sparse_to_sparse_schedules_keep_the_target_and_update_on_their_cadence() -> None:
    for method in ("selfish", "rigl", "static"):
        assert scheduled_sparsity(5, 24, resolve(method, 0.6)) == 0.6, method
    config = resolve("selfish", 0.6, update_every=5)
    assert [step for step in range(1, 21) if cosine_schedule(step, 20, config) is not None] == [5, 10, 15, 20]


def test_allocate_counts_rounds_by_the_largest_remainder() -> None:
    # shares 5, 3.33, 1.67: floors 5, 3, 1, and the one left over goes to the largest remainder (0.67)
    assert allocate_counts(10, [3, 2, 1], [10, 10, 10]) == [5, 3, 2]
    assert allocate_counts(10, [1, 2, 3], [10, 10, 10]) == [2, 3, 5]
    assert allocate_counts(10, [float("inf"), 1, 1], [10, 10, 10]) == [0, 5, 5]  # a non-finite score counts as 0


def test_allocate_counts_messages() -> None:
    with pytest.raises(ValueError) as error:
        allocate_counts(1, [1.0, 2.0], [3])
    assert str(error.value) == "allocate_counts: 2 scores for 1 caps"
    with pytest.raises(ValueError) as error:
        allocate_counts(1, [1.0, 2.0], [3, -1])
    assert str(error.value) == "allocate_counts: caps must be >= 0, got [3, -1]"


def test_mean_active_magnitude() -> None:
    values = torch.tensor([[-2.0, 1.0], [4.0, -8.0]])
    assert mean_active_magnitude(values, torch.tensor([[True, False], [True, True]])) == pytest.approx(14 / 3)
    assert mean_active_magnitude(values, torch.zeros(2, 2, dtype=torch.bool)) == 0.0


def test_an_optimizer_with_only_a_first_moment_has_no_snfs_momentum() -> None:
    """Adam's normalised momentum needs both moments; a state with ``exp_avg`` alone (e.g. Lion) is not Adam."""
    weight = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    optimizer.state[weight] = {"exp_avg": torch.randn(3, 3)}
    with pytest.raises(ValueError, match="growth='momentum' needs a momentum buffer for 'w'"):
        momentum_of([optimizer], weight, None, "w")


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (
            dict(paper="mine"),  # what describes a preset is not a part of it
            TypeError,
            "unknown method parts ['paper']; the parts are ['gate_redistribution', 'grow_into_removed', "
            "'grown_optimizer_state', 'growth', 'init', 'min_prune_rate', 'prune_rate', 'pruning_end', "
            "'pruning_start', 'redistribution', 'removal', 'removal_rounding', 'removed_and_regrown', 'schedule', "
            "'threshold', 'threshold_tolerance', 'update_every', 'update_until']",
        ),
        (dict(threshold_tolerance=1.5), ValueError, "threshold_tolerance must be in [0, 1], got 1.5"),
        (dict(threshold="0.1"), TypeError, "threshold must be a number in (0, inf), got str '0.1'"),
        (dict(update_until=0.0), ValueError, "update_until must be in (0, 1] or None, got 0.0"),
        (
            dict(gate_redistribution="mean"),
            ValueError,
            "gate_redistribution must be one of ['joint', 'none', 'magnitude', 'gradient'] or a GateRedistribution "
            "object, got 'mean'",
        ),
        (
            dict(schedule="gmp", growth="none", removal="threshold"),
            ValueError,
            "schedule='gmp' prunes to exact counts: removal must be one of ['magnitude', 'set', 'negativity'], got "
            "'threshold'",
        ),
        (
            dict(schedule="gmp"),
            ValueError,
            "schedule='gmp' prunes without regrowth: growth must be 'none', got 'random' (a sparse-to-sparse method "
            "uses schedule='cosine')",
        ),
        (
            dict(removal="set", growth="none"),
            ValueError,
            "growth='none' with removal='set' would lose weights at every update: a sparse-to-sparse schedule "
            "('cosine') needs a growth, and pruning without regrowth is schedule='gmp'",
        ),
    ],
)
def test_resolve_messages(overrides, error, message) -> None:
    with pytest.raises(error) as raised:
        resolve("selfish", 0.5, **overrides)
    assert str(raised.value) == message


def test_the_gmp_window_accepts_its_whole_range() -> None:
    for start, end in ((0, 0), (0.0, 1.0), (1.0, 1.0), (0, 24)):
        config = resolve("gmp", 0.5, pruning_start=start, pruning_end=end)
        assert (config.pruning_start, config.pruning_end) == (start, end)


def test_which_methods_read_the_dense_gradient() -> None:
    assert not resolve("selfish", 0.5).reads_gradient
    assert resolve("selfish", 0.5, gate_redistribution="gradient").reads_gradient
    assert resolve("rigl", 0.5).reads_gradient
    # FLOPs: dense gradient every step for momentum (growth or across-layer redistribution), never without growth
    assert resolve("dsr", 0.5, redistribution="momentum").dense_gradient_every == 1
    assert resolve("static", 0.5, growth="gradient").dense_gradient_every is None  # schedule "never"
    assert resolve("rigl", 0.5, schedule="gmp", growth="none").dense_gradient_every is None
    assert resolve("gmp", 0.5, redistribution="momentum").dense_gradient_every is None  # nothing regrows


def test_a_cosine_schedule_that_neither_removes_nor_grows_is_allowed() -> None:
    config = resolve("selfish", 0.5, removal="none", growth="none")
    assert (config.removal.name, config.growth.name, config.schedule.name) == ("none", "none", "cosine")
    assert resolve("selfish", 0.5, gate_redistribution="gradient").dense_gradient_every == "epoch"
