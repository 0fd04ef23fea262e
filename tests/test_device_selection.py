"""Device-side selection and random growth (issue 9): exact counts, the right candidates, uniform, reproducible.

``lowest_positions`` has two CPU paths (a sampled band for tensors above ``4 * _SAMPLE`` elements, a plain
``kthvalue`` below) and a ``topk`` path (GPU, and NaN scores); each is checked against a naive reference: a stable
sort of the candidates' scores, of which the first ``n`` are chosen (ties: lowest flat index first).
"""

from __future__ import annotations

import pytest
import torch
from conftest import update_engine
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lightning_selfish.method import topology
from lightning_selfish.method.catalogue import GROWTHS

BIG = 4 * topology._SAMPLE + 1  # the smallest size that takes the sampled-band path


def reference_lowest(score: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` candidates in a stable ascending sort of the scores (NaN last, after +inf)."""
    flat = score.flatten()
    by_score = torch.sort(torch.where(flat.isnan(), float("inf"), flat), stable=True).indices
    by_score = by_score[torch.sort(flat[by_score].isnan().int(), stable=True).indices]  # NaN after +inf
    order = by_score[torch.sort((~candidates.flatten()[by_score]).int(), stable=True).indices]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:n]] = True
    return chosen.view_as(candidates)


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.float().mean()
    return float(((counts.float() - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("numel", [997, BIG, 3 * BIG])
@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 0.97])
def test_lowest_positions_equals_a_stable_sort(numel: int, fraction: float) -> None:
    g = torch.Generator().manual_seed(numel)
    score = torch.randn(numel, generator=g)
    candidates = torch.rand(numel, generator=g) < 0.4
    n = max(1, int(fraction * int(candidates.sum())))
    chosen = topology.lowest_positions(score, candidates, n)
    assert int(chosen.sum()) == n
    assert torch.equal(chosen, reference_lowest(score, candidates, n))


@settings(max_examples=40, deadline=None)
@example(big=True, levels=2, density=0.125, fraction=0.875, nans=True, seed=0)  # the band's upper bound was NaN
@example(big=True, levels=3, density=1.0, fraction=0.90625, nans=True, seed=0)
@given(
    big=st.booleans(),
    levels=st.integers(1, 6),
    density=st.floats(0.05, 1.0),
    fraction=st.floats(0.0, 1.0),
    nans=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lowest_positions_with_ties_and_nans(big, levels, density, fraction, nans, seed) -> None:
    """Few distinct values (many ties at the threshold) and NaN scores: still exactly n, the reference's n."""
    g = torch.Generator().manual_seed(seed)
    numel = BIG if big else 300
    score = torch.randint(0, levels, (numel,), generator=g).float()
    if nans:
        score[torch.rand(numel, generator=g) < 0.1] = float("nan")
    candidates = torch.rand(numel, generator=g) < density
    available = int(candidates.sum())
    n = int(fraction * available)
    chosen = topology.lowest_positions(score, candidates, n)
    assert int(chosen.sum()) == n and not (chosen & ~candidates).any()
    expected = reference_lowest(score, candidates, n)
    if nans:  # the topk path orders equal values freely: compare the chosen values, not positions
        assert torch.equal(
            score[chosen].nan_to_num(nan=float("inf")).sort().values,
            score[expected].nan_to_num(nan=float("inf")).sort().values,
        )
    else:
        assert torch.equal(chosen, expected)


def test_lowest_positions_refuses_more_than_the_candidates() -> None:
    candidates = torch.zeros(10, dtype=torch.bool)
    candidates[:3] = True
    with pytest.raises(ValueError, match="cannot choose 4 positions among 3 candidates"):
        topology.lowest_positions(torch.rand(10), candidates, 4)


@pytest.mark.parametrize("shape", [(6, 5), (BIG,)])
def test_random_growth_exact_only_inactive_and_deterministic(shape) -> None:
    g = torch.Generator().manual_seed(1)
    mask = topology.random_mask(shape, int(0.4 * torch.Size(shape).numel()), g)
    n = int((~mask).sum()) // 3
    state = g.get_state()
    grown = topology.random_growth(mask, n, g)
    assert int(grown.sum()) == int(mask.sum()) + n and torch.equal(grown & mask, mask)
    g.set_state(state)
    assert torch.equal(topology.random_growth(mask, n, g), grown)  # a function of the generator's state


def test_random_growth_is_uniform_over_the_inactive_positions() -> None:
    """Chi-square over 4,000 draws: 20 inactive positions, 4 grown each time, every one equally likely."""
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:2] = True
    hits = torch.zeros(6, 5)
    g = torch.Generator().manual_seed(7)
    draws = 4000
    for _ in range(draws):
        grown = topology.random_growth(mask, 4, g)
        hits += (grown & ~mask).float()
    assert hits[mask].sum() == 0
    counts = hits[~mask]
    assert counts.numel() == 20 and counts.sum() == 4 * draws
    # 19 degrees of freedom: the 0.999 quantile of chi-square is 43.82; a biased draw lands far above it
    assert chi_square(counts) < 43.82


def test_random_growth_on_a_big_tensor_is_uniform_across_regions() -> None:
    """The sampled-band path: growth spreads evenly over ten regions of the inactive positions."""
    g = torch.Generator().manual_seed(3)
    mask = topology.random_mask((BIG,), BIG // 2, g)
    regions = torch.arange(BIG) * 10 // BIG
    totals = torch.zeros(10)
    for _ in range(5):
        new = topology.random_growth(mask, 20_000, g) & ~mask
        totals += torch.bincount(regions[new], minlength=10).float()
    inactive_per_region = torch.bincount(regions[~mask], minlength=10).float()
    expected = inactive_per_region / inactive_per_region.sum() * totals.sum()
    statistic = float(((totals - expected) ** 2 / expected).sum())
    assert statistic < 27.88  # 9 degrees of freedom, 0.999 quantile


def test_random_mask_exact_on_a_big_tensor() -> None:
    mask = topology.random_mask((BIG, 2), 12_345, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 12_345


def test_random_mask_is_drawn_on_the_generator_device_and_moved() -> None:
    mask = topology.random_mask((20, 3), 7, torch.Generator().manual_seed(0), device="meta")
    assert mask.device.type == "meta" and mask.shape == (20, 3)


@pytest.mark.parametrize("growth", ["gradient", "momentum"])
def test_score_growth_takes_the_largest_magnitudes_on_a_big_tensor(growth: str) -> None:
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(BIG, generator=g) < 0.3
    score = torch.randn(BIG, generator=g)
    grown = GROWTHS[growth].grow(mask, 5000, score)
    new = grown & ~mask
    assert int(new.sum()) == 5000
    assert score[new].abs().min() >= score[~grown].abs().max()


def test_growth_draws_from_every_position_inactive_after_removal_including_the_removed() -> None:
    """Growth candidates are exactly the positions inactive after removal: a weight removed in this update is drawn
    again as often as any other inactive position (the paper's rule), never an active one."""
    from lightning_selfish.core.engine import SparseEngine

    removed_regrown = removed_total = 0
    inactive_after_removal = 0
    for seed in range(200):
        param = torch.nn.Parameter(torch.randn(8, 10, generator=torch.Generator().manual_seed(seed)))
        engine = SparseEngine.initialize({"w": param}, 0.5, torch.Generator().manual_seed(seed))
        old = engine.masks["w"].clone()
        stats = update_engine(engine, 0.4, torch.Generator().manual_seed(1000 + seed))
        new = engine.masks["w"]
        # the kept weights: active before and not zeroed (removed ones are zeroed, regrown ones restart at 0)
        kept = old & (param.detach() != 0)
        removed, grown = old & ~kept, new & ~kept
        assert int(removed.sum()) == int(grown.sum()) == stats.removed["w"] == stats.grown["w"] == 16
        removed_regrown += int((grown & removed).sum())
        removed_total += int(removed.sum())
        inactive_after_removal = int((~kept).sum())
    # each of the 56 positions inactive after removal is grown with probability 16/56; 16 of them were just removed
    expected = removed_total * 16 / inactive_after_removal
    assert inactive_after_removal == 56
    assert abs(removed_regrown - expected) < 4 * (expected * (1 - 16 / 56)) ** 0.5


class ChooseSpy:
    """Records the number of positions ``_choose_lowest`` ranks at each call (the band, or every candidate)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        original = topology._choose_lowest

        def spy(score, positions, k, chosen):
            self.sizes.append(positions.numel())
            return original(score, positions, k, chosen)

        monkeypatch.setattr(topology, "_choose_lowest", spy)


@pytest.mark.parametrize("numel", [BIG, 3 * BIG])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9, 0.999])
def test_the_cpu_path_ranks_only_a_narrow_band(monkeypatch: pytest.MonkeyPatch, numel: int, fraction: float) -> None:
    """On a big tensor only the sampled band is ranked (a few % of the candidates), once, and the answer is exact.

    At 0.999 the band reaches past the sample's top: it is every candidate not below its lower bound."""
    spy = ChooseSpy(monkeypatch)
    g = torch.Generator().manual_seed(5)
    score = torch.randn(numel, generator=g)
    candidates = torch.rand(numel, generator=g) < 0.5
    available = int(candidates.sum())
    n = int(fraction * available)
    chosen = topology.lowest_positions(score, candidates, n)
    assert torch.equal(chosen, reference_lowest(score, candidates, n))
    assert len(spy.sizes) == 1 and 0 < spy.sizes[0] < 0.06 * available


def test_a_misleading_sample_falls_back_to_ranking_every_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores that differ exactly at the sampled positions: the band misses, every candidate is ranked, still exact."""
    spy = ChooseSpy(monkeypatch)
    picks = torch.randint(BIG, (topology._SAMPLE,), generator=torch.Generator().manual_seed(0))  # the sampled positions
    score = torch.ones(BIG)
    score[picks] = 0.0  # the sample says "all zeros": the band [0, 0) is empty
    score += torch.arange(BIG) * 1e-7  # distinct values, increasing with the position
    candidates = torch.ones(BIG, dtype=torch.bool)
    n = BIG // 2
    chosen = topology.lowest_positions(score, candidates, n)
    assert torch.equal(chosen, reference_lowest(score, candidates, n))
    assert spy.sizes == [BIG]


def test_tensors_up_to_the_sampling_size_rank_every_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = ChooseSpy(monkeypatch)
    numel = 4 * topology._SAMPLE
    g = torch.Generator().manual_seed(6)
    score, candidates = torch.randn(numel, generator=g), torch.rand(numel, generator=g) < 0.5
    available = int(candidates.sum())
    chosen = topology.lowest_positions(score, candidates, available // 2)
    assert torch.equal(chosen, reference_lowest(score, candidates, available // 2))
    assert spy.sizes == [available]


def test_the_selection_leaves_the_global_random_stream_alone() -> None:
    """The band's sample comes from a private generator: a selection must not move the user's ``torch`` RNG."""
    g = torch.Generator().manual_seed(7)
    score, candidates = torch.randn(BIG, generator=g), torch.rand(BIG, generator=g) < 0.5
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    topology.lowest_positions(score, candidates, int(candidates.sum()) // 3)
    assert torch.equal(torch.rand(3), expected)


def test_exactly_n_candidates_below_the_band_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample sees only ones, so everything below its lower bound, the zeros, is exactly the answer: with nothing
    left to rank in the band, every candidate is ranked instead (and the answer is still exact)."""
    spy = ChooseSpy(monkeypatch)
    picks = torch.randint(BIG, (topology._SAMPLE,), generator=torch.Generator().manual_seed(0))
    score = torch.zeros(BIG)
    score[picks] = 1.0
    candidates = torch.ones(BIG, dtype=torch.bool)
    n = int((score == 0).sum())
    chosen = topology.lowest_positions(score, candidates, n)
    assert torch.equal(chosen, score == 0)
    assert spy.sizes == [BIG]
