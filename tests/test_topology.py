"""The pure selection functions of ``topology.py``: exact counts, agreement with naive references (plain sorts,
exact rational arithmetic), hypothesis invariants, and their errors. The device-side selection paths are in
``test_device_selection.py``."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selfish.method import topology
from lightning_selfish.method.catalogue import GROWTHS, REMOVALS

# --------------------------------------------------------------------------------------------------------------
# counts and initial masks
# --------------------------------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape,density", [((10, 7), 0.33), ((6000, 15), 0.45), ((3, 3), 0.0), ((4, 5), 1.0)])
def test_random_mask_has_exact_count(shape, density):
    count = topology.uniform_count(math.prod(shape), density)
    mask = topology.random_mask(shape, count, gen())
    assert mask.dtype == torch.bool and mask.shape == shape
    assert int(mask.sum()) == count == round(density * math.prod(shape))


def test_random_mask_is_reproducible_and_spread():
    a = topology.random_mask((50, 40), 660, gen(3))
    b = topology.random_mask((50, 40), 660, gen(3))
    c = topology.random_mask((50, 40), 660, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = a.sum(1).float()
    assert rows.min() > 0  # not a contiguous block


def test_random_mask_count_out_of_range():
    for count in (-1, 13):
        with pytest.raises(
            ValueError, match=rf"count must be in \[0, 12\] for a tensor of shape \(3, 4\), got {count}"
        ):
            topology.random_mask((3, 4), count, torch.Generator())


def test_erdos_renyi_total_equals_uniform_and_caps_at_one():
    shapes = {"emb": (10000, 16), "ih": (64, 16), "hh": (64, 16), "tiny": (2, 3), "dec": (10000, 16)}
    density = 0.33
    counts = topology.erdos_renyi_counts(shapes, density)
    numels = {k: math.prod(v) for k, v in shapes.items()}
    assert sum(counts.values()) == sum(round(density * n) for n in numels.values())
    assert all(0 <= counts[k] <= numels[k] for k in shapes)
    assert counts["tiny"] == numels["tiny"]  # (2+3)/(2*3) is huge: capped at dense
    # density proportional to (rows + cols) / (rows * cols) among uncapped tensors
    dens = {k: counts[k] / numels[k] for k in shapes}
    ratio = dens["ih"] / dens["emb"]
    expected = ((64 + 16) / (64 * 16)) / ((10000 + 16) / (10000 * 16))
    assert ratio == pytest.approx(expected, rel=0.01)


def naive_erdos_renyi(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, int]:
    """ER budgets written out plainly: fractions in exact rational arithmetic, cap at dense, largest remainder."""
    from fractions import Fraction

    numel = {n: math.prod(s) for n, s in shapes.items()}
    target = sum(int(round(density * v)) for v in numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = target - sum(numel[n] for n in dense)
        weight = sum(Fraction(sum(shapes[n])) for n in free)  # raw * numel = sum(shape)
        scale = Fraction(budget) / weight if weight else Fraction(0)
        newly = {n for n in free if scale * Fraction(sum(shapes[n]), numel[n]) > 1}
        if not newly:
            break
        dense |= newly
    exact = {n: Fraction(numel[n]) if n in dense else scale * sum(shapes[n]) for n in shapes}
    counts = {n: min(numel[n], math.floor(exact[n])) for n in shapes}
    leftover = target - sum(counts.values())
    order = sorted((n for n in shapes if counts[n] < numel[n]), key=lambda n: exact[n] - counts[n], reverse=True)
    for n in order[:leftover]:
        counts[n] += 1
    return counts


@settings(max_examples=80, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6),
    density=st.floats(0.01, 1.0),
)
def test_erdos_renyi_counts_match_a_plain_reference(shapes, density):
    named = {f"t{i}": shape for i, shape in enumerate(shapes)}
    counts = topology.erdos_renyi_counts(named, density)
    expected = naive_erdos_renyi(named, density)
    assert sum(counts.values()) == sum(expected.values())
    assert all(0 <= counts[n] <= math.prod(named[n]) for n in named)
    # the floating-point and the rational computation may round a remainder tie differently: allow one swap
    assert sum(abs(counts[n] - expected[n]) for n in named) <= 2, (counts, expected)


def test_erdos_renyi_counts_exact_cases():
    # a tiny tensor overflows density 1 (made dense), then a second one overflows after rescaling
    shapes = {"big": (100, 100), "mid": (4, 6), "tiny": (2, 2)}
    counts = topology.erdos_renyi_counts(shapes, 0.05)
    assert counts == naive_erdos_renyi(shapes, 0.05)
    assert counts["tiny"] == 4 and counts["mid"] == 24 and sum(counts.values()) == 500 + 1 + 0
    # density 1: everything dense; the loop ends with nothing left to scale
    assert topology.erdos_renyi_counts({"a": (3, 1), "b": (2, 5)}, 1.0) == {"a": 3, "b": 10}
    # the leftover goes to the largest remainders
    assert topology.erdos_renyi_counts({"a": (3, 3), "b": (3, 3), "c": (1, 9)}, 0.5) == naive_erdos_renyi(
        {"a": (3, 3), "b": (3, 3), "c": (1, 9)}, 0.5
    )


def test_split_count_is_exact_and_proportional():
    assert topology.split_count(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    parts = topology.split_count(1001, [115, 115, 1150, 1150, 1150, 1150])
    assert sum(parts) == 1001 and parts[0] <= parts[2]


def test_split_count_gives_the_leftover_to_the_largest_remainders():
    assert topology.split_count(5, [1, 2]) == [2, 3]  # 1.67 -> 2, 3.33 -> 3
    assert topology.split_count(7, [1, 1, 4]) == [1, 1, 5]  # 1.17, 1.17, 4.67
    assert topology.split_count(3, [5, 1, 4]) == [2, 0, 1]  # 1.5, 0.3, 1.2
    assert topology.split_count(0, [3, 3]) == [0, 0]


def test_removal_count_is_ceil():
    assert topology.removal_count(10, 0.5) == 5
    assert topology.removal_count(10, 0.51) == 6
    assert topology.removal_count(7, 0.0) == 0
    assert topology.removal_count(7, 1.0) == 7


# --------------------------------------------------------------------------------------------------------------
# removal
# --------------------------------------------------------------------------------------------------------------


def naive_magnitude_removal(w, mask, n):
    active = [(abs(float(w.view(-1)[i])), i) for i in range(w.numel()) if mask.view(-1)[i]]
    drop = {i for _, i in sorted(active)[:n]}
    kept = mask.clone().view(-1)
    for i in drop:
        kept[i] = False
    return kept.view_as(mask)


def test_magnitude_removal_matches_naive_reference():
    w = torch.randn(12, 9, generator=gen(1))
    mask = torch.rand(12, 9, generator=gen(2)) < 0.5
    for n in (0, 1, 7, int(mask.sum())):
        assert torch.equal(topology.magnitude_removal(w, mask, n), naive_magnitude_removal(w, mask, n))


def test_set_removal_takes_smallest_positive_and_largest_negative():
    w = torch.tensor([0.5, 0.1, 0.9, -0.2, -0.05, -0.8, 0.3, -0.4])
    mask = torch.ones(8, dtype=torch.bool)
    kept = topology.set_removal(w, mask, 4)
    # two smallest positives (0.1, 0.3) and two largest negatives (-0.05, -0.2) go
    assert kept.tolist() == [True, False, True, False, False, True, False, True]


def test_set_removal_borrows_from_the_other_sign():
    w = torch.tensor([0.5, 0.1, 0.9, -0.2, 0.3])
    kept = topology.set_removal(w, torch.ones(5, dtype=torch.bool), 4)
    assert int(kept.sum()) == 1 and kept.tolist() == [False, False, True, False, False]


def naive_set_removed_values(values: list[float], n: int) -> Counter:
    """SET by Mocanu et al.'s rule (``rewireMask``): the same fraction of each sign, closest to zero. Exactly n go:
    the non-negative side takes n * (its count) / (all) rounded by the largest remainder (a tie to that side), the
    negative side the rest. Returns the multiset of removed values."""
    positive = sorted(v for v in values if v >= 0)
    negative = sorted((v for v in values if v < 0), reverse=True)  # closest to zero first
    share = Fraction(n * len(positive), len(values)) if values else Fraction(0)
    take_positive = math.floor(share)
    negative_share = Fraction(n * len(negative), len(values)) if values else Fraction(0)
    leftover = n - math.floor(share) - math.floor(negative_share)
    if leftover and share - math.floor(share) >= negative_share - math.floor(negative_share):
        take_positive += 1
    return Counter(positive[:take_positive] + negative[: n - take_positive])


def naive_negativity_removed_values(values: list[float], n: int) -> Counter:
    """SET as the Selfish-RNN authors ran it: ceil(n/2) from the smallest non-negative values, the rest from the
    *most negative*; a side with too few makes the other side take more."""
    positive = sorted(v for v in values if v >= 0)
    negative = sorted(v for v in values if v < 0)  # most negative first
    take_positive = min(len(positive), max(n - len(negative), (n + 1) // 2))
    return Counter(positive[:take_positive] + negative[: n - take_positive])


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=12),
    fraction=st.floats(0.0, 1.0),
)
def test_set_removals_match_their_definitions_with_zeros_and_ties(values, fraction):
    w = torch.tensor(values)
    mask = torch.ones(len(values), dtype=torch.bool)
    n = int(fraction * len(values))
    for removal, naive in (
        (topology.set_removal, naive_set_removed_values),
        (topology.negativity_removal, naive_negativity_removed_values),
    ):
        kept = removal(w, mask, n)
        assert int(kept.sum()) == len(values) - n
        assert Counter(w[mask & ~kept].tolist()) == naive(values, n), removal.__name__


def test_set_removal_takes_each_signs_share_closest_to_zero():
    w = torch.tensor([0.0, 0.5, 0.25, 1.0, -0.375, -0.125, -2.0, -4.0])  # 4 non-negative, 4 negative
    kept = topology.set_removal(w, torch.ones(8, dtype=torch.bool), 4)
    assert sorted(w[~kept].tolist()) == [-0.375, -0.125, 0.0, 0.25]  # two of each sign, closest to zero
    kept = topology.negativity_removal(w, torch.ones(8, dtype=torch.bool), 4)
    assert sorted(w[~kept].tolist()) == [-4.0, -2.0, 0.0, 0.25]  # the authors': the most negative


def test_dsr_threshold_removal_keeps_a_weight_exactly_at_the_threshold() -> None:
    """DSR removes the weights *below* the threshold: one exactly at it stays."""
    weight = torch.tensor([[-0.5, 0.25, 0.2499, -0.25], [0.0, 1.0, -0.1, 0.3]])
    mask = torch.tensor([[True, True, True, True], [False, True, True, True]])
    kept = topology.threshold_removal(weight, mask, 0.25)
    assert kept.tolist() == [[True, True, False, True], [False, True, False, True]]


@pytest.mark.parametrize(
    "removed,expected", [(74, 0.2), (75, 0.1), (100, 0.1), (125, 0.1), (126, 0.05)], ids=lambda v: str(v)
)
def test_dsr_threshold_moves_only_when_the_miss_exceeds_the_tolerance(removed: int, expected: float) -> None:
    """Expected 100 removals, tolerance 25 %: 75 and 125 are within it (exactly representable bounds)."""
    assert topology.adapt_threshold(0.1, removed, 100, 0.25) == expected


def test_lowest_positions_when_the_nth_lowest_score_is_nan():
    """NaN scores (diverged weights) count as the highest: when more positions are needed than there are finite
    candidate scores, every finite candidate is taken, then NaN candidates, and never a non-candidate."""
    nan = math.nan
    score = torch.tensor([nan, 1.0, nan, 0.5, 2.0, nan, -3.0, -1.0, nan])
    candidates = torch.tensor([True, True, True, True, True, False, False, True, True])
    for n in (5, 6, 7):
        chosen = topology.lowest_positions(score, candidates, n)
        assert int(chosen.sum()) == n and not (chosen & ~candidates).any()
        assert chosen[[1, 3, 4, 7]].all()  # the finite candidates
    assert topology.lowest_positions(score.view(3, 3), candidates.view(3, 3), 5).shape == (3, 3)
    assert topology.lowest_positions(score, candidates, 3).nonzero().squeeze(1).tolist() == [1, 3, 7]


# --------------------------------------------------------------------------------------------------------------
# growth
# --------------------------------------------------------------------------------------------------------------


def test_random_growth_only_inactive_exact_and_uniform():
    mask = torch.zeros(20, 10, dtype=torch.bool)
    mask[:10] = True
    hits = torch.zeros(20, 10)
    g = gen(5)
    for _ in range(300):
        grown = topology.random_growth(mask, 25, g)
        assert int(grown.sum()) == 125 and grown[:10].all()
        hits += (grown & ~mask).float()
    # every inactive position is drawn about 25/100 of the time
    assert hits[:10].sum() == 0
    assert hits[10:].mean() == pytest.approx(75.0) and hits[10:].min() > 40 and hits[10:].max() < 115


def test_random_growth_draws_from_the_given_generator_only():
    mask = torch.zeros(30, dtype=torch.bool)
    torch.manual_seed(1)
    a = topology.random_growth(mask, 10, torch.Generator().manual_seed(5))
    torch.manual_seed(2)  # the global RNG must not matter
    b = topology.random_growth(mask, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = topology.random_mask((5, 6), 9, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    assert torch.equal(c, topology.random_mask((5, 6), 9, torch.Generator().manual_seed(5)))


def test_random_growth_beyond_the_inactive_count():
    mask = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="cannot grow 3 weights: only 2 positions are inactive"):
        topology.random_growth(mask, 3, torch.Generator())


def test_gradient_and_momentum_growth_pick_largest_inactive():
    mask = torch.tensor([True, False, False, False, True, False])
    score = torch.tensor([9.0, -0.1, 3.0, -5.0, 8.0, 1.0])
    grown = topology.gradient_growth(mask, 2, score)
    assert grown.tolist() == [True, False, True, True, True, False]
    assert torch.equal(topology.momentum_growth(mask, 2, score), grown)


def test_growing_a_single_weight_picks_the_largest_score():
    mask = torch.tensor([True, False, False, False])
    score = torch.tensor([100.0, 1.0, -7.0, 3.0])
    assert topology.gradient_growth(mask, 1, score).tolist() == [True, False, True, False]
    assert topology.momentum_growth(mask, 0, score).tolist() == mask.tolist()


@pytest.mark.parametrize("growth", ["random", "gradient", "momentum"])
def test_growth_can_fill_every_inactive_position_and_no_more(growth):
    mask = torch.tensor([True, False, True, False, False])
    source = torch.Generator().manual_seed(0) if growth == "random" else torch.tensor([0.0, 3.0, 0.0, -1.0, 2.0])
    grow = GROWTHS[growth].grow
    assert grow(mask, 3, source).all()
    with pytest.raises(ValueError, match="cannot grow 4 weights: only 3 positions are inactive"):
        grow(mask, 4, source)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    density=st.floats(0.05, 0.95),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_removal_then_growth_keeps_the_count(rows, cols, density, rate, seed):
    g = gen(seed)
    count = topology.uniform_count(rows * cols, density)
    mask = topology.random_mask((rows, cols), count, g)
    w = torch.randn(rows, cols, generator=g) * mask
    for removal in (part.remove for part in REMOVALS.values() if part.removes and not part.by_threshold):
        n = topology.removal_count(count, rate)
        kept = removal(w, mask, n)
        assert int(kept.sum()) == count - n and not (kept & ~mask).any()
        grown = topology.random_growth(kept, n, g)
        assert int(grown.sum()) == count and not (kept & ~grown).any()
