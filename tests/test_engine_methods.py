"""Each method's rule in one SparseEngine update, on hand-made weights (SET's signs, DSR's threshold and
shares, SNFS's momentum, RigL's gradient, Table 6's gate shares, removed-and-regrown weights), and the invariants
every method keeps under many random updates (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from conftest import update_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_selfish import SNTASGD, SparseEngine, detect_gate_layouts
from lightning_selfish.core.engine import UpdateContext
from lightning_selfish.method import topology
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.parts import UpdateAmount
from lightning_selfish.method.redistribution import allocate_counts

# --------------------------------------------------------------------------------------------------------------
# the rule that defines each method
# --------------------------------------------------------------------------------------------------------------


SPARSE_TO_SPARSE = ["selfish", "set", "dsr", "snfs", "rigl"]


def engine_of(tensors: dict[str, torch.Tensor], sparsity: float, init: str = "uniform", seed: int = 0, **kwargs):
    params = {name: nn.Parameter(t.clone()) for name, t in tensors.items()}
    return SparseEngine.initialize(params, sparsity, torch.Generator().manual_seed(seed), init, **kwargs)


def test_set_removes_from_both_signs():
    w = torch.tensor([[-3.0, -0.2, -0.1, 0.05, 0.3, 2.0, -1.0, 0.7]])
    engine = engine_of({"w": w}, 0.0)
    stats = update_engine(engine, 0.5, torch.Generator().manual_seed(0), removal="set", growth="random")
    record = engine.tensors["w"]
    # 4 removed: the 2 smallest non-negative (0.05, 0.3) and the 2 largest negative (-0.1, -0.2) weights
    zeroed = (record.param.detach() == 0).nonzero()[:, 1].tolist()
    assert stats.removed["w"] == 4 and set(zeroed) == {1, 2, 3, 4}
    assert int(record.mask.sum()) == 8


def test_dsr_moves_counts_to_layers_that_keep_more_and_adapts_its_threshold():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(20, 20, generator=g).sign() * (1 + torch.rand(20, 20, generator=g))  # all |w| >= 1
    small = torch.randn(20, 20, generator=g) * 0.01
    engine = engine_of({"big": big, "small": small}, 0.5)
    before = engine.active_counts()
    stats = update_engine(engine, 0.3, torch.Generator().manual_seed(1), removal="threshold", redistribution="nonzeros",
                          threshold=0.5)  # fmt: skip
    after = engine.active_counts()
    assert sum(after.values()) == sum(before.values())
    assert stats.removed["big"] == 0 and stats.removed["small"] == before["small"]  # all small weights fell
    assert after["big"] == 400 and after["small"] == before["small"] * 2 - 400  # big is capped at dense
    # threshold rule: 200 removed vs ceil(0.3 * 400) = 120 expected: too many, halve
    assert stats.threshold == 0.25
    engine = engine_of({"big": big, "small": small}, 0.5)
    stats = update_engine(
        engine, 0.3, torch.Generator(), removal="threshold", redistribution="nonzeros", threshold=1e-9
    )
    assert stats.total_removed == 0 and stats.threshold == 2e-9  # too few: double


def test_dsr_shares_regrowth_by_surviving_weights():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=g)
    b = torch.randn(30, 30, generator=g) * 0.3
    engine = engine_of({"a": a, "b": b}, 0.8)
    before = engine.active_counts()
    kept = {n: int((t.mask & (t.param.abs() >= 0.2)).sum()) for n, t in engine.tensors.items()}
    stats = update_engine(engine, 0.3, torch.Generator(), removal="threshold", redistribution="nonzeros", threshold=0.2)
    total_removed = sum(before.values()) - sum(kept.values())
    assert stats.grown == dict(
        zip(kept, allocate_counts(total_removed, list(kept.values()), [900 - k for k in kept.values()]))
    )
    assert engine.active_counts()["a"] > before["a"] > 0 and engine.active_counts()["b"] < before["b"]


def test_snfs_grows_where_momentum_is_largest_and_moves_counts_to_high_momentum_layers():
    g = torch.Generator().manual_seed(0)
    engine = engine_of({"hot": torch.randn(16, 16, generator=g), "cold": torch.randn(16, 16, generator=g)}, 0.75)
    hot, cold = engine.tensors["hot"], engine.tensors["cold"]
    opt = torch.optim.SGD([hot.param, cold.param], lr=0.1, momentum=0.9)
    engine.attach(opt, mask_state=False)
    momentum = {"hot": torch.randn(16, 16, generator=g) * 10, "cold": torch.randn(16, 16, generator=g) * 0.1}
    for name, record in engine.tensors.items():
        opt.state[record.param]["momentum_buffer"] = momentum[name].clone()
    before = engine.active_counts()
    expected_kept = {
        n: topology.magnitude_removal(t.param, t.mask, topology.removal_count(t.active, 0.5))
        for n, t in engine.tensors.items()
    }
    stats = update_engine(
        engine, 0.5, torch.Generator(), growth="momentum", redistribution="momentum", optimizers=[opt]
    )
    after = engine.active_counts()
    assert (
        sum(after.values()) == sum(before.values()) and after["hot"] > before["hot"] and after["cold"] < before["cold"]
    )
    for name, record in engine.tensors.items():
        kept = expected_kept[name]
        top = torch.topk(momentum[name].abs().masked_fill(kept, -1).flatten(), stats.grown[name]).indices
        expected = kept.clone()
        expected.view(-1)[top] = True
        assert torch.equal(record.mask, expected), name


def test_rigl_grows_at_the_largest_dense_gradients():
    g = torch.Generator().manual_seed(0)
    engine = engine_of({"w": torch.randn(10, 12, generator=g)}, 0.7)
    record = engine.tensors["w"]
    grad = torch.randn(10, 12, generator=g)
    kept = topology.magnitude_removal(record.param, record.mask, topology.removal_count(record.active, 0.3))
    stats = update_engine(engine, 0.3, torch.Generator(), growth="gradient", gradients={"w": grad})
    top = torch.topk(grad.abs().masked_fill(kept, -1).flatten(), stats.grown["w"]).indices
    expected = kept.clone()
    expected.view(-1)[top] = True
    assert torch.equal(record.mask, expected)


@pytest.mark.parametrize("mode", ["magnitude", "gradient"])
def test_table6_gate_redistribution_shares_regrowth_by_gate_scores(mode):
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 8)
    with torch.no_grad():
        lstm.weight_hh_l0[16:24].mul_(20)  # gate g: large weights, large gradients
    params = {n: p for n, p in lstm.named_parameters() if n == "weight_hh_l0"}
    layouts = detect_gate_layouts(lstm)
    engine = SparseEngine.initialize(params, 0.5, torch.Generator().manual_seed(0), "uniform", layouts, mode)
    record = engine.tensors["weight_hh_l0"]
    grads = {"weight_hh_l0": torch.ones(32, 8)}
    grads["weight_hh_l0"][16:24] *= 20
    gate_counts = [int(record.mask[r].sum()) for _, r in layouts["weight_hh_l0"]]
    stats = update_engine(engine, 0.5, torch.Generator().manual_seed(1), gradients=grads, gate_redistribution=mode)
    after = [int(record.mask[r].sum()) for _, r in layouts["weight_hh_l0"]]
    assert sum(after) == sum(gate_counts) and stats.total_removed == stats.total_grown
    assert after[2] == 64 and all(a < c for i, (a, c) in enumerate(zip(after, gate_counts)) if i != 2)


def test_removed_and_regrown_keeps_value_and_averaging_window_only_when_asked():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    for policy in ("restart", "keep"):
        engine = engine_of({"w": w}, 0.0)
        record = engine.tensors["w"]
        opt = SNTASGD([record.param], lr=0.1)
        opt.start_averaging()
        engine.attach(opt)
        for _ in range(3):
            record.param.grad = torch.zeros(1, 8)
            opt.step()
        # remove everything and regrow everything: every weight is removed and regrown in the same update
        update_engine(engine, 1.0, torch.Generator(), optimizers=[opt], removed_and_regrown=policy)
        age = opt.state[record.param]["age"]
        if policy == "restart":
            assert (record.param == 0).all() and (opt.state[record.param]["ax"] == 0).all() and (age == 1).all()
        else:
            assert torch.equal(record.param.detach(), w) and (age == 4).all()


# --------------------------------------------------------------------------------------------------------------
# invariants under many random updates
# --------------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(SPARSE_TO_SPARSE),
    gate=st.sampled_from(["joint", "none", "magnitude", "gradient"]),
    regrown=st.sampled_from(["restart", "keep"]),
    sparsity=st.floats(0.2, 0.95),
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_sparse_to_sparse_methods_keep_the_total_exactly(method, gate, regrown, sparsity, rates, seed):
    config = resolve(method, sparsity, gate_redistribution=gate, removed_and_regrown=regrown)
    torch.manual_seed(seed)
    lstm = nn.LSTM(5, 4, num_layers=2)
    params = {n: p for n, p in lstm.named_parameters() if p.dim() == 2}
    g = torch.Generator().manual_seed(seed)
    engine = SparseEngine.initialize(params, sparsity, g, config.init, detect_gate_layouts(lstm), gate)
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    engine.attach(opt, mask_state=not config.reads_momentum)
    counts = engine.active_counts()
    total = sum(counts.values())
    threshold = config.threshold
    for rate in rates:
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
        gradients = {n: p.grad for n, p in params.items()}
        stats = engine.update(UpdateAmount(rate), config, UpdateContext(g, [opt], gradients, None, threshold))
        threshold = stats.threshold
        assert sum(engine.active_counts().values()) == total
        assert stats.total_removed == stats.total_grown
        if config.redistribution.score is None:
            assert engine.active_counts() == counts  # without across-layer redistribution every tensor keeps its own
        for t in engine.tensors.values():
            assert (t.param[~t.mask] == 0).all() and torch.equal(t.mask_as_param, t.mask.float())


@settings(max_examples=30, deadline=None)
@given(
    gate=st.sampled_from(["joint", "none"]),
    removal=st.sampled_from(["magnitude", "set"]),
    densities=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
)
def test_pruning_to_a_density_is_exact_and_masks_only_shrink(gate, removal, densities, seed):
    torch.manual_seed(seed)
    lstm = nn.LSTM(5, 4, num_layers=2)
    params = {n: p for n, p in lstm.named_parameters() if p.dim() == 2}
    engine = SparseEngine.initialize(params, 0.0, torch.Generator(), "dense", detect_gate_layouts(lstm), gate)
    target = 1.0
    for density in densities:
        target = min(target, density)  # GMP's schedule only goes down
        before = {n: t.mask.clone() for n, t in engine.tensors.items()}
        stats = update_engine(engine, 0.0, torch.Generator(), removal, "none", target_density=target)
        assert stats.total_grown == 0
        for name, t in engine.tensors.items():
            assert int(t.mask.sum()) == topology.uniform_count(t.mask.numel(), target)
            assert not (t.mask & ~before[name]).any() and (t.param[~t.mask] == 0).all()
