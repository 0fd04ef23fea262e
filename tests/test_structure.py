"""A structural constraint as one part (method/parts.Structure): N:M sparsity along rows, checked against a naive
reference written from the rule (loops over every group of M), in the engine and in the update."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.signals import UpdateContext
from lightning_selfish.method import topology
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.parts import UpdateAmount


def group_counts(mask: torch.Tensor, m: int) -> list[int]:
    """Active weights of every group of m consecutive positions of every row (the rule, written out)."""
    rows = mask.reshape(-1, mask.shape[-1]).tolist()
    return [sum(row[start : start + m]) for row in rows for start in range(0, len(row), m)]


def naive_growth(kept: torch.Tensor, score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M growth by the rule: in every group, its best-scored inactive positions up to its room n - active (ties:
    the lower position); the result is the best set that keeps every group at most n."""
    grown = kept.clone().reshape(-1, kept.shape[-1])
    scores = score.reshape(-1, kept.shape[-1])
    for r in range(grown.shape[0]):
        for start in range(0, grown.shape[1], m):
            positions = range(start, start + m)
            room = n - sum(bool(grown[r, p]) for p in positions)
            free = sorted((p for p in positions if not grown[r, p]), key=lambda p: (-float(scores[r, p]), p))
            for p in free[: max(room, 0)]:
                grown[r, p] = True
    return grown.reshape(kept.shape)


def test_initial_masks_have_exactly_n_in_every_group() -> None:
    mask = topology.n_m(2, 4).initial_mask((6, 8), torch.Generator().manual_seed(0))
    assert group_counts(mask, 4) == [2] * 12
    with pytest.raises(ValueError, match=r"N:M structure with M=4 needs a last dimension divisible by 4, got \(6, 6\)"):
        topology.n_m(2, 4).initial_mask((6, 6), torch.Generator())
    with pytest.raises(ValueError, match="needs whole numbers 0 < N < M, got N=4, M=4"):
        topology.n_m(4, 4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 3))
def test_allowed_positions_are_the_naive_rule(seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(5, 8, generator=g) < 0.3
    score = torch.randint(0, 4, (5, 8), generator=g).float()  # (ties on purpose)
    allowed = topology.n_m(n, 4).allowed(kept, score)
    assert torch.equal(kept | allowed, naive_growth(kept, score, n, 4))
    assert not (allowed & kept).any()


@pytest.mark.parametrize("method", ["rigl", "selfish", "snfs", "set"])
def test_updates_keep_every_group_at_n_and_gradient_growth_is_the_best_set(method: str) -> None:
    """Every update under 2:4: each group of 4 in every row ends with exactly 2 active; RigL's gradient growth
    picks the naive reference's positions."""
    config = resolve(method, 0.5, structure=topology.n_m(2, 4), redistribution="none", init="uniform")
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 4)
    params = {name: p for name, p in lstm.named_parameters() if p.dim() == 2}
    g = torch.Generator().manual_seed(1)
    engine = SparseEngine.initialize(params, 0.5, g, config.init, None, True, config.structure)
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    engine.attach(optimizer, mask_state=not config.reads_momentum)
    for name, record in engine.tensors.items():
        assert group_counts(record.mask, 4) == [2] * (record.mask.numel() // 4), name
    for rate in (0.5, 0.3, 0.25):
        for p in params.values():
            p.grad = torch.randn_like(p)
        optimizer.step()
        gradients = {name: p.grad.clone() for name, p in params.items()}
        before = {name: (record.mask.clone(), record.param.detach().clone()) for name, record in engine.tensors.items()}
        stats = engine.update(UpdateAmount(rate), config, UpdateContext(g, [optimizer], gradients))
        assert stats.total_removed == stats.total_grown
        for name, record in engine.tensors.items():
            assert group_counts(record.mask, 4) == [2] * (record.mask.numel() // 4), name
            if method == "rigl":
                old, weight = before[name]
                n_removed = topology.removal_count(int(old.sum()), rate, "floor")
                kept = topology.magnitude_removal(weight, old, n_removed)
                expected = naive_growth(kept, gradients[name].abs(), 2, 4)
                assert torch.equal(record.mask, expected), name


def test_a_structure_fixes_the_density_and_the_shares() -> None:
    structure = topology.n_m(2, 4)
    with pytest.raises(ValueError, match=r"structure='2:4' keeps a density of 0.5: sparsity must be 0.5, got 0.6"):
        resolve("selfish", 0.6, structure=structure)
    with pytest.raises(ValueError, match="redistribution must be 'none'"):
        resolve("dsr", 0.5, structure=structure)
    with pytest.raises(ValueError, match="growth 'mine' has no score"):
        config = resolve("selfish", 0.5)
        resolve("selfish", 0.5, structure=structure, growth=dataclasses.replace(config.growth, name="mine", score=None))
    with pytest.raises(ValueError, match=r"structure='2:4' draws masks at density 0.5, not 0.6"):
        SparseEngine.initialize({"w": nn.Parameter(torch.ones(2, 4))}, 0.4, torch.Generator(), structure=structure)
