"""SparseEngine without Lightning: initial masks (uniform, ER, per gate), joint and per-gate ranking, what an
update keeps, zeroes and grows, the gradients and momenta growth reads, per-gate shares under across-layer
redistribution, rank 0's outcome taken by every rank, optimizer state (SGD momentum, Adam moments, mask-aware
optimizers, attach and detach), invariants, and the engine's messages."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import update_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_selfish import SNTASGD, MaskUpdate, SelfishSparsityCallback, SparseEngine
from lightning_selfish.core import update as engine_module  # (the update steps reset the optimizer state)
from lightning_selfish.core.gates import detect_gate_layouts
from lightning_selfish.method import topology
from lightning_selfish.method.parts import Init

# --------------------------------------------------------------------------------------------------------------
# initial masks
# --------------------------------------------------------------------------------------------------------------


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


THREE_GATES = [("a", slice(0, 2)), ("b", slice(2, 4)), ("c", slice(4, 6))]


def test_per_gate_uniform_init_rounds_every_gate_and_er_splits_the_tensor_count():
    params = {"w": nn.Parameter(torch.randn(6, 5))}  # three gates of 10 weights
    uniform = SparseEngine.initialize(
        params, 0.55, torch.Generator().manual_seed(0), "uniform", {"w": THREE_GATES}, False
    )
    assert [int(uniform.tensors["w"].mask[rows].sum()) for _, rows in THREE_GATES] == [4, 4, 4]  # round(4.5) = 4 each
    er = SparseEngine.initialize(
        {"w": params["w"], "v": nn.Parameter(torch.randn(40, 40))},
        0.55,
        torch.Generator().manual_seed(0),
        "er",
        {"w": THREE_GATES},
        False,
    )
    expected = topology.split_count(topology.erdos_renyi_counts({"w": (6, 5), "v": (40, 40)}, 1 - 0.55)["w"], [10] * 3)
    assert [int(er.tensors["w"].mask[rows].sum()) for _, rows in THREE_GATES] == expected
    joint = SparseEngine.initialize(params, 0.55, torch.Generator().manual_seed(0), "uniform", {"w": THREE_GATES})
    assert int(joint.tensors["w"].mask.sum()) == topology.uniform_count(30, 1 - 0.55) == 13 and joint.tensors[
        "w"
    ].groups == [slice(None)]


def test_a_users_own_uniform_init_starts_gates_as_the_built_in_one_does():
    """What makes the uniform init start every gate at the density is a rule the part carries (block_budgets), not
    its identity: a user's own uniform init that names the rule draws the built-in one's masks."""

    def my_uniform(shapes, density):
        return {name: topology.uniform_count(math.prod(shape), density) for name, shape in shapes.items()}

    mine = Init("mine", my_uniform, topology.uniform_block_counts)
    params = {"w": nn.Parameter(torch.randn(6, 5))}
    ours = SparseEngine.initialize(params, 0.55, torch.Generator().manual_seed(0), mine, {"w": THREE_GATES}, False)
    assert [int(ours.tensors["w"].mask[rows].sum()) for _, rows in THREE_GATES] == [4, 4, 4]  # each gate at 0.45
    built_in = SparseEngine.initialize(
        params, 0.55, torch.Generator().manual_seed(0), "uniform", {"w": THREE_GATES}, False
    )
    assert torch.equal(ours.tensors["w"].mask, built_in.tensors["w"].mask)


def test_engine_defaults_to_joint_ranking_and_converts_masks():
    param = nn.Parameter(torch.randn(6, 5))
    engine = SparseEngine({"w": param}, {"w": torch.ones(6, 5)}, {"w": THREE_GATES})
    record = engine.tensors["w"]
    assert record.groups == [slice(None)] and record.gates == THREE_GATES  # joint ranking unless told otherwise
    assert record.mask.dtype == torch.bool and record.mask_as_param.dtype == param.dtype
    half = SparseEngine({"w": param.half()}, {"w": torch.ones(6, 5, dtype=torch.uint8)})
    assert half.tensors["w"].mask.dtype == torch.bool and half.tensors["w"].mask_as_param.dtype == torch.float16


def test_initialization_is_reproducible_from_the_generator_alone():
    def masks(global_seed: int, redistribution: bool):
        torch.manual_seed(global_seed)
        params = {"w": nn.Parameter(torch.ones(6, 5))}
        engine = SparseEngine.initialize(
            params, 0.5, torch.Generator().manual_seed(7), "uniform", {"w": THREE_GATES}, redistribution
        )
        return engine.tensors["w"].mask.clone()

    for redistribution in (True, False):
        assert torch.equal(masks(1, redistribution), masks(2, redistribution))


def test_sparsity_report_per_tensor_per_gate_and_overall():
    params = {"w": nn.Parameter(torch.ones(6, 5)), "v": nn.Parameter(torch.ones(2, 5))}
    masks = {"w": torch.zeros(6, 5, dtype=torch.bool), "v": torch.ones(2, 5, dtype=torch.bool)}
    masks["w"][0:2] = True  # gate a fully active, b and c empty
    masks["w"][2, 0] = True
    engine = SparseEngine(params, masks, {"w": THREE_GATES})
    report = engine.sparsity_report()
    assert report == pytest.approx(
        {"w": 1 - 11 / 30, "w/a": 0.0, "w/b": 0.9, "w/c": 1.0, "v": 0.0, "overall": 1 - 21 / 40}
    )
    assert engine.active_counts() == {"w": 11, "v": 10}
    assert SparseEngine({}, {}).sparsity_report() == {"overall": 0.0}


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


# --------------------------------------------------------------------------------------------------------------
# updates: ranking, survivors, growth
# --------------------------------------------------------------------------------------------------------------


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


def test_gradient_growth_uses_the_kept_gradients_and_momentum_growth_the_buffer():
    param = nn.Parameter(torch.arange(1.0, 13.0).view(3, 4))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0] = True  # active: 1, 2, 3, 4
    engine = SparseEngine({"w": param}, {"w": mask})
    score = torch.zeros(3, 4)
    score[2, 3], score[1, 0] = 5.0, -4.0
    update_engine(engine, 0.5, torch.Generator(), growth="gradient", gradients={"w": score})  # param.grad is None
    assert engine.tensors["w"].mask.nonzero().tolist() == [[0, 2], [0, 3], [1, 0], [2, 3]]

    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    opt.state[param]["momentum_buffer"] = torch.zeros(3, 4)
    opt.state[param]["momentum_buffer"][1, 3] = -9.0
    opt.state[param]["momentum_buffer"][2, 0] = 8.0
    with torch.no_grad():
        param.copy_(torch.arange(1.0, 13.0).view(3, 4) * engine.tensors["w"].mask)
    update_engine(engine, 0.5, torch.Generator(), growth="momentum", optimizers=[opt])
    assert engine.tensors["w"].mask.nonzero().tolist() == [[1, 0], [1, 3], [2, 0], [2, 3]]
    message = (
        "growth='gradient' needs the dense gradient of 'w', but it has none at the topology update (was the "
        "gradient freed by zero_grad(set_to_none=True)?)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        update_engine(engine, 0.5, torch.Generator(), growth="gradient", gradients={"other": score})
    with pytest.raises(
        ValueError, match=r"needs a momentum buffer for 'w' \(momentum_buffer, or Adam's exp_avg and exp_avg_sq, in the"
    ):
        update_engine(engine, 0.5, torch.Generator(), growth="momentum", optimizers=[torch.optim.SGD([param], lr=1.0)])


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


# --------------------------------------------------------------------------------------------------------------
# per-gate shares, SNFS under SNT-ASGD, every rank
# --------------------------------------------------------------------------------------------------------------


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
        update_engine(engine, 0.5, torch.Generator(), "magnitude", "random", gate_redistribution="gradient")
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


# --------------------------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------------------------


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


def test_attach_masks_existing_state_and_follows_new_parameter_groups():
    a, b = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(4, 5))
    masks = {"a": torch.rand(4, 5) < 0.5, "b": torch.rand(4, 5) < 0.5}
    engine = SparseEngine({"a": a, "b": b}, masks)
    opt = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    a.grad = torch.ones(4, 5)
    opt.step()  # state exists before attaching (a resumed optimizer)
    engine.attach(opt)
    assert (opt.state[a]["momentum_buffer"][~masks["a"]] == 0).all()
    assert (opt.state[a]["momentum_buffer"][masks["a"]] != 0).all()
    engine.detach()
    opt.add_param_group({"params": [b]})
    engine.attach(opt)  # the optimizer now holds b too
    b.grad, a.grad = torch.ones(4, 5), torch.ones(4, 5)
    opt.step()
    assert (b[~masks["b"]] == 0).all() and (opt.state[b]["momentum_buffer"][~masks["b"]] == 0).all()


def test_attaching_again_picks_up_parameters_added_to_the_optimizer():
    a, b = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(4, 5))
    masks = {"a": torch.rand(4, 5) < 0.5, "b": torch.rand(4, 5) < 0.5}
    engine = SparseEngine({"a": a, "b": b}, masks)
    opt = torch.optim.SGD([a], lr=0.1)
    engine.attach(opt)
    opt.add_param_group({"params": [b]})
    engine.attach(opt)  # without detach: the records of this optimizer are rebuilt
    a.grad, b.grad = torch.ones(4, 5), torch.ones(4, 5)
    opt.step()
    assert (a[~masks["a"]] == 0).all() and (b[~masks["b"]] == 0).all()


def test_update_tells_mask_aware_optimizers_the_live_mask():
    seen: list[MaskUpdate] = []

    class Aware(torch.optim.SGD):
        def on_mask_update(self, param, update):
            seen.append(update)

    param = nn.Parameter(torch.randn(4, 5))
    engine = SparseEngine({"w": param}, {"w": torch.rand(4, 5) < 0.5})
    engine.attach(Aware([param], lr=0.1))
    assert seen[0].old is None and torch.equal(seen[0].kept, seen[0].new) and seen[0].kept is not seen[0].new


# --------------------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------------------


def test_engine_argument_messages() -> None:
    # (names become parts in one place, lightning_selfish.method.catalogue.part: the engine's message is resolve's)
    with pytest.raises(ValueError) as error:
        SparseEngine({}, {}, gate_redistribution="mean")
    assert str(error.value) == (
        "gate_redistribution must be True, False, one of ['joint', 'none', 'magnitude', 'gradient'] or a "
        "GateRedistribution object, got 'mean'"
    )


def test_engine_mask_of_another_shape():
    param = nn.Parameter(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"mask for 'w' has shape \(3, 4\) but the parameter has \(4, 3\)"):
        SparseEngine({"w": param}, {"w": torch.ones(3, 4, dtype=torch.bool)})


def test_unknown_init_removal_and_growth():
    param = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(
        ValueError, match=r"init must be one of \[.*'uniform', 'er'.*\] or an Init object, got 'xavier'"
    ):
        SparseEngine.initialize({"w": param}, 0.5, torch.Generator(), init="xavier")
    # (removal and growth names are checked once, by methods.resolve: the engine is handed part objects)
    with pytest.raises(ValueError, match=r"growth must be one of \['random', 'gradient', 'momentum'.*\] or a Grow"):
        SelfishSparsityCallback(sparsity=0.5, growth="rigl")
