"""SparseEngine without Lightning: joint vs per-gate ranking, zero-start growth, optimizer state, invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import update_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_selfish import MaskUpdate, SparseEngine
from lightning_selfish import update as engine_module  # (the update steps reset the optimizer state)
from lightning_selfish.gates import detect_gate_layouts

GATES = [("i", slice(0, 4)), ("f", slice(4, 8)), ("g", slice(8, 12)), ("o", slice(12, 16))]


def make(weight: torch.Tensor, sparsity: float, redistribution: bool, seed: int = 0) -> SparseEngine:
    param = nn.Parameter(weight.clone())
    return SparseEngine.initialize(
        {"w": param}, sparsity, torch.Generator().manual_seed(seed), "uniform", {"w": GATES}, redistribution
    )


def forget_gate_small() -> torch.Tensor:
    w = torch.randn(16, 10, generator=torch.Generator().manual_seed(1)).abs() + 1.0
    w[4:8] *= 1e-3  # the forget gate's weights are all tiny
    return w


def test_joint_ranking_removes_across_gates():
    engine = make(forget_gate_small(), 0.5, redistribution=True)
    record = engine.tensors["w"]
    before = [int(record.mask[rows].sum()) for _, rows in GATES]
    stats = update_engine(engine, 0.2, torch.Generator().manual_seed(2))
    n = stats.removed["w"]
    assert n == 16  # ceil(0.2 * 80)
    after = [int(record.mask[rows].sum()) for _, rows in GATES]
    # every removed weight came from the forget gate (the smallest magnitudes); growth refills uniformly
    assert after[1] < before[1] and all(after[k] >= before[k] for k in (0, 2, 3))
    assert sum(after) - sum(before) == 0


def test_per_gate_ranking_keeps_every_gate_count():
    engine = make(forget_gate_small(), 0.5, redistribution=False)
    record = engine.tensors["w"]
    counts = [int(record.mask[rows].sum()) for _, rows in GATES]
    assert counts == [20, 20, 20, 20]  # exactly sparsity 0.5 in every gate
    for step in range(5):
        update_engine(engine, 0.5, torch.Generator().manual_seed(step))
        assert [int(record.mask[rows].sum()) for _, rows in GATES] == counts


def test_grown_weights_start_at_zero_even_when_regrown_in_place():
    engine = make(torch.randn(16, 10), 0.5, redistribution=True)
    record = engine.tensors["w"]
    seen_regrown = False
    for seed in range(20):
        with torch.no_grad():
            record.param.add_(torch.randn(16, 10) * record.mask)  # training moved the active weights
        old = record.mask.clone()
        values = record.param.detach().clone()
        update_engine(engine, 1.0, torch.Generator().manual_seed(seed))  # remove all, regrow all
        new = record.mask
        assert int(new.sum()) == 80
        assert (record.param[new] == 0).all()  # every weight of the new topology is a fresh zero
        seen_regrown |= bool((old & new & (values != 0)).any())
    assert seen_regrown  # the case "removed and regrown in the same update" did happen


def test_update_keeps_surviving_weights_and_zeroes_the_rest():
    engine = make(torch.randn(16, 10), 0.6, redistribution=True)
    record = engine.tensors["w"]
    old, values = record.mask.clone(), record.param.detach().clone()
    update_engine(engine, 0.3, torch.Generator().manual_seed(0))
    stayed = old & record.mask & (record.param != 0)
    assert torch.equal(record.param[stayed], values[stayed])
    assert (record.param[~record.mask] == 0).all()


class Recorder(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.1, momentum=0.9)
        self.updates: list[MaskUpdate] = []

    def on_mask_update(self, param, update):
        self.updates.append(update)


def test_optimizer_state_reset_and_hook():
    engine = make(torch.randn(16, 10), 0.5, redistribution=True)
    record = engine.tensors["w"]
    opt = Recorder([record.param])
    engine.attach(opt)
    assert len(opt.updates) == 1 and opt.updates[0].old is None and opt.updates[0].new is record.mask
    record.param.grad = torch.randn(16, 10)
    opt.step()
    buf = opt.state[record.param]["momentum_buffer"]
    assert (buf[~record.mask] == 0).all() and (record.param[~record.mask] == 0).all()  # post-hook
    before, old, weights = buf.clone(), record.mask.clone(), record.param.detach().clone()
    update_engine(engine, 0.5, torch.Generator().manual_seed(0), optimizers=[opt])
    update = opt.updates[-1]
    # what the optimizer was told, against an independent reference: the 40 active weights of smallest |w| go
    reference_kept = old.clone()
    active = old.flatten().nonzero().squeeze(1)
    smallest = active[torch.argsort(weights.abs().flatten()[active])[:40]]
    reference_kept.view(-1)[smallest] = False
    assert torch.equal(update.old, old)
    assert torch.equal(update.kept, reference_kept)
    assert update.new is record.mask and int(update.new.sum()) == 80
    assert int(update.grown.sum()) == 40 and not (update.grown & update.kept).any()
    assert torch.equal(update.removed, old & ~reference_kept)
    assert (buf[~reference_kept] == 0).all()
    assert torch.equal(buf[reference_kept], before[reference_kept])
    engine.detach()
    record.param.grad = torch.ones(16, 10)
    opt.step()
    assert (record.param[~record.mask] != 0).any()  # detached: no more enforcement


def test_enforcement_after_a_skipped_mixed_precision_step():
    engine = make(torch.randn(16, 10), 0.5, redistribution=True)
    param = engine.tensors["w"].param
    opt = torch.optim.SGD([param], lr=0.1)
    engine.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    before = param.detach().clone()
    scaler.scale((param**2).sum()).backward()
    param.grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: inf gradient
    scaler.update()
    assert calls == [] and torch.equal(param, before)
    opt.zero_grad()
    scaler.scale((param**2).sum()).backward()
    scaler.step(opt)
    assert calls == [1] and (param[~engine.tensors["w"].mask] == 0).all() and not torch.equal(param, before)


def test_cudnn_style_flat_weights_are_kept_in_place():
    lstm = nn.LSTM(4, 6)
    params = {n: p for n, p in lstm.named_parameters() if p.dim() == 2}
    pointers = {n: p.data_ptr() for n, p in params.items()}
    engine = SparseEngine.initialize(
        params, 0.5, torch.Generator().manual_seed(0), "uniform", detect_gate_layouts(lstm)
    )
    update_engine(engine, 0.5, torch.Generator().manual_seed(1))
    assert {n: p.data_ptr() for n, p in params.items()} == pointers
    assert all(p is getattr(lstm, n) for n, p in params.items())


@settings(max_examples=25, deadline=None)
@given(
    sparsity=st.floats(0.05, 0.95),
    redistribution=st.booleans(),
    init=st.sampled_from(["uniform", "er"]),
    removal=st.sampled_from(["magnitude", "set"]),
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
)
def test_active_count_never_changes(sparsity, redistribution, init, removal, rates, seed):
    torch.manual_seed(seed)
    lstm = nn.LSTM(5, 4, num_layers=2)
    params = {n: p for n, p in lstm.named_parameters() if p.dim() == 2}
    layouts = detect_gate_layouts(lstm)
    g = torch.Generator().manual_seed(seed)
    engine = SparseEngine.initialize(params, sparsity, g, init, layouts, redistribution)
    counts = engine.active_counts()
    gate_counts = {n: [int(t.mask[r].sum()) for _, r in layouts[n]] for n, t in engine.tensors.items()}
    if init == "uniform":
        assert counts == {n: round((1 - sparsity) * p.numel()) for n, p in params.items()} or not redistribution
    for rate in rates:
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p))
        update_engine(engine, rate, g, removal=removal)
        assert engine.active_counts() == counts
        for n, t in engine.tensors.items():
            assert (t.param[~t.mask] == 0).all()
            if not redistribution:
                assert [int(t.mask[r].sum()) for _, r in layouts[n]] == gate_counts[n]


def test_gradient_growth_needs_a_gradient():
    engine = make(torch.randn(16, 10), 0.5, redistribution=True)
    with pytest.raises(ValueError, match="growth='gradient' needs the dense gradient of 'w'"):
        update_engine(engine, 0.5, torch.Generator(), growth="gradient")
    with pytest.raises(ValueError, match="growth='momentum' needs a momentum buffer for 'w'"):
        update_engine(
            engine,
            0.5,
            torch.Generator(),
            growth="momentum",
            optimizers=[torch.optim.SGD([engine.tensors["w"].param], lr=1)],
        )


def test_optimizer_that_keeps_its_state_sparse_is_not_re_zeroed_per_step():
    class SelfMasking(torch.optim.SGD):
        keeps_inactive_state_zero = True

    for cls, expect_dense_state in ((torch.optim.SGD, False), (SelfMasking, True)):
        engine = make(torch.randn(16, 10), 0.5, redistribution=True)
        record = engine.tensors["w"]
        opt = cls([record.param], lr=0.1, momentum=0.9)
        engine.attach(opt)
        record.param.grad = torch.ones(16, 10)
        opt.step()
        buf = opt.state[record.param]["momentum_buffer"]
        assert bool((buf[~record.mask] != 0).all()) == expect_dense_state
        assert (record.param[~record.mask] == 0).all()  # weights are re-zeroed either way


def test_adam_moments_are_reset_at_removed_and_grown_positions():
    engine = make(torch.randn(16, 10), 0.5, redistribution=True)
    record = engine.tensors["w"]
    opt = torch.optim.Adam([record.param], lr=0.01)
    engine.attach(opt)
    for _ in range(3):
        record.param.grad = torch.randn(16, 10)
        opt.step()
    state = opt.state[record.param]
    for key in ("exp_avg", "exp_avg_sq"):  # re-zeroed after every step where the weight is inactive
        assert (state[key][~record.mask] == 0).all() and (state[key][record.mask] != 0).all(), key
    before = {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq")}
    step = state["step"].clone()
    old = record.mask.clone()
    kept_seen = []
    original = engine_module.reset_optimizer_state

    def spy(optimizers, param, update, **kwargs):
        kept_seen.append(update.kept.clone())
        original(optimizers, param, update, **kwargs)

    engine_module.reset_optimizer_state = spy
    try:
        update_engine(engine, 1.0, torch.Generator().manual_seed(3), optimizers=[opt])  # everything removed, regrown
    finally:
        engine_module.reset_optimizer_state = original
    assert not kept_seen[0].any()
    assert (old & record.mask).any()  # some weights were removed and regrown in place
    for key in ("exp_avg", "exp_avg_sq"):
        assert (state[key] == 0).all(), key
    assert torch.equal(state["step"], step)  # the step counter is not a per-weight tensor: left alone
    assert (before["exp_avg_sq"][old] != 0).all()


def test_only_optimizers_that_hold_the_parameter_are_reset():
    engine = make(torch.randn(16, 10), 0.5, redistribution=True)
    record = engine.tensors["w"]
    other = nn.Parameter(torch.randn(16, 10))
    unrelated = torch.optim.SGD([other], lr=0.1, momentum=0.9)
    holder = Recorder([record.param])
    for opt, p in ((unrelated, other), (holder, record.param)):
        p.grad = torch.ones(16, 10)
        opt.step()
    unrelated_buf = unrelated.state[other]["momentum_buffer"].clone()
    update_engine(engine, 0.5, torch.Generator().manual_seed(0), optimizers=[unrelated, holder])
    assert torch.equal(unrelated.state[other]["momentum_buffer"], unrelated_buf)  # same shape, not its parameter
    assert len(holder.updates) == 1  # the second optimizer is told, though the first does not hold the parameter
    assert (holder.state[record.param]["momentum_buffer"][~holder.updates[0].kept] == 0).all()
