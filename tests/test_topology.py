"""The pure functions: exact counts, agreement with naive references, schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selfish import topology
from lightning_selfish.methods import REMOVALS
from lightning_selfish.schedules import cosine_prune_rate


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


def test_split_count_is_exact_and_proportional():
    assert topology.split_count(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    parts = topology.split_count(1001, [115, 115, 1150, 1150, 1150, 1150])
    assert sum(parts) == 1001 and parts[0] <= parts[2]


def test_removal_count_is_ceil():
    assert topology.removal_count(10, 0.5) == 5
    assert topology.removal_count(10, 0.51) == 6
    assert topology.removal_count(7, 0.0) == 0
    assert topology.removal_count(7, 1.0) == 7


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


def test_gradient_and_momentum_growth_pick_largest_inactive():
    mask = torch.tensor([True, False, False, False, True, False])
    score = torch.tensor([9.0, -0.1, 3.0, -5.0, 8.0, 1.0])
    grown = topology.gradient_growth(mask, 2, score)
    assert grown.tolist() == [True, False, True, True, True, False]
    assert torch.equal(topology.momentum_growth(mask, 2, score), grown)


def test_cosine_prune_rate():
    assert cosine_prune_rate(0, 100, 0.7) == pytest.approx(0.7)
    assert cosine_prune_rate(50, 100, 0.7) == pytest.approx((0.7 + 0.005) / 2)
    assert cosine_prune_rate(100, 100, 0.7) == pytest.approx(0.005)
    assert cosine_prune_rate(150, 100, 0.7) == pytest.approx(0.005)  # stays down past the end
    assert cosine_prune_rate(30, 100, 0.0) == 0.0  # static sparse
    rates = [cosine_prune_rate(s, 100, 0.5) for s in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


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
