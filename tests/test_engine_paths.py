"""SparseEngine paths the method tests reach but did not pin (found by mutation testing, docs/testing.md): per-gate
counts under across-layer redistribution, SNFS under SNT-ASGD (the momentum is the dense gradient handed in),
rank 0's outcome and generator taken by every rank, and the messages of the engine's own argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import update_engine
from torch import nn

from lightning_selfish import SNTASGD
from lightning_selfish.engine import SparseEngine

GATES = [("i", 4), ("f", 4), ("g", 4), ("o", 4)]


def stacked_engine(scale: dict[str, float], gate_redistribution: str = "none", seed: int = 0) -> SparseEngine:
    """Two stacked 16x8 weights (4 gates of 4 rows) at sparsity 0.5, every gate at exactly 16 of its 32."""
    g = torch.Generator().manual_seed(seed)
    params = {name: nn.Parameter(torch.randn(16, 8, generator=g) * s) for name, s in scale.items()}
    layouts = {name: [(gate, slice(4 * k, 4 * k + 4)) for k, (gate, _) in enumerate(GATES)] for name in params}
    return SparseEngine.initialize(params, 0.5, g, "uniform", layouts, gate_redistribution)


def gate_counts(engine: SparseEngine, name: str) -> list[int]:
    mask = engine.tensors[name].mask
    return [int(mask[4 * k : 4 * k + 4].sum()) for k in range(4)]


def sntasgd_with_gradients(engine: SparseEngine, scale: dict[str, float]) -> tuple[SNTASGD, dict]:
    """SNT-ASGD over the engine's weights, and dense gradients handed to the update (``.grad`` stays empty, as
    after Lightning's ``zero_grad``): hot tensors get large gradients, cold ones small."""
    g = torch.Generator().manual_seed(7)
    optimizer = SNTASGD([t.param for t in engine.tensors.values()], lr=0.1)
    gradients = {name: torch.randn(16, 8, generator=g) * scale[name] for name in engine.tensors}
    return optimizer, gradients


def test_per_gate_counts_follow_the_across_layer_shares() -> None:
    """gate_redistribution="none" with SNFS's momentum redistribution: the tensor's count moves, and its regrowth
    is shared over the gates as their removals were (equal removals: equal shares, within one)."""
    engine = stacked_engine({"hot": 1.0, "cold": 1.0})
    optimizer, gradients = sntasgd_with_gradients(engine, {"hot": 10.0, "cold": 0.1})
    stats = update_engine(engine,
        0.5, torch.Generator().manual_seed(1), "magnitude", "random", [optimizer], gradients=gradients,
        redistribution="momentum",
    )  # fmt: skip
    assert stats.removed == {"hot": 32, "cold": 32}  # ceil(0.5 * 16) = 8 per gate
    assert stats.grown["hot"] > 32 > stats.grown["cold"] and sum(stats.grown.values()) == 64
    for name in ("hot", "cold"):
        counts = gate_counts(engine, name)
        assert sum(counts) == 64 - 32 + stats.grown[name], name  # 16 of 32 per gate, 8 removed per gate
        regrown = [c - 8 for c in counts]  # each gate kept 8
        assert max(regrown) - min(regrown) <= 1, (name, counts)


def test_momentum_under_sntasgd_is_the_gradient_handed_in() -> None:
    """SNFS growth under SNT-ASGD ranks the inactive positions by the dense gradient given to ``update``."""
    engine = stacked_engine({"w": 1.0}, gate_redistribution="joint")
    optimizer, gradients = sntasgd_with_gradients(engine, {"w": 1.0})
    record = engine.tensors["w"]
    kept = record.mask & (record.param.abs() >= record.param.abs()[record.mask].kthvalue(33).values)
    stats = update_engine(engine, 0.5, torch.Generator(), "magnitude", "momentum", [optimizer], gradients=gradients)
    grown = record.mask & ~kept
    assert int(grown.sum()) == stats.grown["w"] == 32
    score = gradients["w"].abs()
    assert score[grown].min() >= score[~record.mask].max()


def test_redistribution_under_sntasgd_without_a_gradient_says_which_tensor() -> None:
    engine = stacked_engine({"hot": 1.0, "cold": 1.0})
    optimizer, _ = sntasgd_with_gradients(engine, {"hot": 1.0, "cold": 1.0})
    with pytest.raises(ValueError) as error:
        update_engine(engine, 0.5, torch.Generator(), "magnitude", "random", [optimizer], redistribution="momentum")
    assert str(error.value) == (
        "redistribution='momentum' under SNT-ASGD uses the dense gradient, but 'hot' has none at the topology update"
    )


def test_gradient_gate_shares_without_a_gradient_say_so() -> None:
    engine = stacked_engine({"w": 1.0}, gate_redistribution="gradient")
    with pytest.raises(ValueError) as error:
        update_engine(engine, 0.5, torch.Generator(), "magnitude", "random")
    assert str(error.value) == (
        "gate_redistribution='gradient' needs the dense gradient of 'w', but it has none at the topology update "
        "(was the gradient freed by zero_grad(set_to_none=True)?)"
    )


def test_every_rank_ends_with_rank_zeros_masks_and_generator() -> None:
    """DDP without processes: rank 0 records what it sends, rank 1 (other weights, another generator) receives it
    in place. Rank 1 must end with rank 0's masks, zeros where they are inactive, and rank 0's generator."""
    sent: list[torch.Tensor] = []
    rank0, rank1 = stacked_engine({"a": 1.0, "b": 1.0}, seed=0), stacked_engine({"a": 1.0, "b": 1.0}, seed=1)
    g0, g1 = torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)
    update_engine(rank0, 0.5, g0, synchronize=lambda tensor: sent.append(tensor.clone()))
    received = iter(sent)
    update_engine(rank1, 0.5, g1, synchronize=lambda tensor: tensor.copy_(next(received)))
    assert next(received, None) is None and len(sent) == 3  # one code per tensor, then the generator state
    assert torch.equal(g1.get_state(), g0.get_state())
    for name, record in rank1.tensors.items():
        assert torch.equal(record.mask, rank0.tensors[name].mask), name
        assert (record.param[~record.mask] == 0).all(), name


def test_engine_argument_messages() -> None:
    # (part names are checked once, by methods.resolve; the engine is handed part objects)
    with pytest.raises(ValueError) as error:
        SparseEngine({}, {}, gate_redistribution="mean")
    assert str(error.value) == (
        "gate_redistribution must be True, False or one of ['joint', 'none', 'magnitude', 'gradient'], got 'mean'"
    )
