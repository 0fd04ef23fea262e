"""Exact values of the pure functions and the engine, against plain references: the cases that mutation testing
(docs/testing.md) showed no other test pinned down."""

from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction

import pytest
import torch
from conftest import update_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_selfish import SNTASGD, SparseEngine, sntasgd, topology
from lightning_selfish.methods import GROWTHS
from lightning_selfish.optim_state import MaskUpdate
from lightning_selfish.schedules import cosine_prune_rate

# --------------------------------------------------------------------------------------------------------------
# topology
# --------------------------------------------------------------------------------------------------------------


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


def test_split_count_gives_the_leftover_to_the_largest_remainders():
    assert topology.split_count(5, [1, 2]) == [2, 3]  # 1.67 -> 2, 3.33 -> 3
    assert topology.split_count(7, [1, 1, 4]) == [1, 1, 5]  # 1.17, 1.17, 4.67
    assert topology.split_count(3, [5, 1, 4]) == [2, 0, 1]  # 1.5, 0.3, 1.2
    assert topology.split_count(0, [3, 3]) == [0, 0]


def test_growing_a_single_weight_picks_the_largest_score():
    mask = torch.tensor([True, False, False, False])
    score = torch.tensor([100.0, 1.0, -7.0, 3.0])
    assert topology.gradient_growth(mask, 1, score).tolist() == [True, False, True, False]
    assert topology.momentum_growth(mask, 0, score).tolist() == mask.tolist()


def test_cosine_prune_rate_at_the_ends_of_short_schedules():
    assert cosine_prune_rate(5, 0, 0.5) == 0.5  # no schedule length: the initial rate
    assert cosine_prune_rate(1, 1, 0.7) == pytest.approx(0.005)  # a one-step schedule ends at the minimum
    assert cosine_prune_rate(0, 1, 0.7) == pytest.approx(0.7)
    assert cosine_prune_rate(-3, 10, 0.7) == pytest.approx(0.7)  # before the start: the initial rate
    assert cosine_prune_rate(3, 10, 0.2, final=0.5) == 0.2  # a final above the initial is clamped


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


# --------------------------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------------------------

GATES = [("a", slice(0, 2)), ("b", slice(2, 4)), ("c", slice(4, 6))]


def test_per_gate_uniform_init_rounds_every_gate_and_er_splits_the_tensor_count():
    params = {"w": nn.Parameter(torch.randn(6, 5))}  # three gates of 10 weights
    uniform = SparseEngine.initialize(params, 0.55, torch.Generator().manual_seed(0), "uniform", {"w": GATES}, False)
    assert [int(uniform.tensors["w"].mask[rows].sum()) for _, rows in GATES] == [4, 4, 4]  # round(4.5) = 4 each
    er = SparseEngine.initialize(
        {"w": params["w"], "v": nn.Parameter(torch.randn(40, 40))},
        0.55,
        torch.Generator().manual_seed(0),
        "er",
        {"w": GATES},
        False,
    )
    expected = topology.split_count(topology.erdos_renyi_counts({"w": (6, 5), "v": (40, 40)}, 1 - 0.55)["w"], [10] * 3)
    assert [int(er.tensors["w"].mask[rows].sum()) for _, rows in GATES] == expected
    joint = SparseEngine.initialize(params, 0.55, torch.Generator().manual_seed(0), "uniform", {"w": GATES})
    assert int(joint.tensors["w"].mask.sum()) == topology.uniform_count(30, 1 - 0.55) == 13 and joint.tensors[
        "w"
    ].groups == [slice(None)]


def test_engine_defaults_to_joint_ranking_and_converts_masks():
    param = nn.Parameter(torch.randn(6, 5))
    engine = SparseEngine({"w": param}, {"w": torch.ones(6, 5)}, {"w": GATES})
    record = engine.tensors["w"]
    assert record.groups == [slice(None)] and record.gates == GATES  # joint ranking unless told otherwise
    assert record.mask.dtype == torch.bool and record.mask_as_param.dtype == param.dtype
    half = SparseEngine({"w": param.half()}, {"w": torch.ones(6, 5, dtype=torch.uint8)})
    assert half.tensors["w"].mask.dtype == torch.bool and half.tensors["w"].mask_as_param.dtype == torch.float16


def test_initialization_is_reproducible_from_the_generator_alone():
    def masks(global_seed: int, redistribution: bool):
        torch.manual_seed(global_seed)
        params = {"w": nn.Parameter(torch.ones(6, 5))}
        engine = SparseEngine.initialize(
            params, 0.5, torch.Generator().manual_seed(7), "uniform", {"w": GATES}, redistribution
        )
        return engine.tensors["w"].mask.clone()

    for redistribution in (True, False):
        assert torch.equal(masks(1, redistribution), masks(2, redistribution))


def test_sparsity_report_per_tensor_per_gate_and_overall():
    params = {"w": nn.Parameter(torch.ones(6, 5)), "v": nn.Parameter(torch.ones(2, 5))}
    masks = {"w": torch.zeros(6, 5, dtype=torch.bool), "v": torch.ones(2, 5, dtype=torch.bool)}
    masks["w"][0:2] = True  # gate a fully active, b and c empty
    masks["w"][2, 0] = True
    engine = SparseEngine(params, masks, {"w": GATES})
    report = engine.sparsity_report()
    assert report == pytest.approx(
        {"w": 1 - 11 / 30, "w/a": 0.0, "w/b": 0.9, "w/c": 1.0, "v": 0.0, "overall": 1 - 21 / 40}
    )
    assert engine.active_counts() == {"w": 11, "v": 10}
    assert SparseEngine({}, {}).sparsity_report() == {"overall": 0.0}


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
# SNTASGD
# --------------------------------------------------------------------------------------------------------------


def two_params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(6, 5, generator=g).to(dtype)), nn.Parameter(torch.randn(5, generator=g).to(dtype))]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1.0, 0.25])
def test_sntasgd_sgd_phase_with_maximize_and_weight_decay(foreach, weight_decay):
    ours, theirs = two_params(), two_params()
    opt = SNTASGD(ours, lr=0.125, weight_decay=weight_decay, maximize=True, foreach=foreach)
    sgd = torch.optim.SGD(theirs, lr=0.125, weight_decay=weight_decay, maximize=True)
    for step in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.sin(a.detach() * (step + 1))
            b.grad = a.grad.clone()
        grads = [p.grad.clone() for p in ours]
        opt.step()
        sgd.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, ours))  # the step leaves the gradients alone
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_sntasgd_defaults_and_state_flags():
    params, reference = two_params(), two_params()
    opt = SNTASGD(params, lr=0.5)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.swapped is False and opt.averaging is False
    sgd = torch.optim.SGD(reference, lr=0.5)
    for p, q in zip(params, reference):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


def test_sntasgd_unpickles_an_older_state():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    state = opt.__getstate__()
    state = {k: v for k, v in state.items() if k not in ("_masks", "_swapped")}
    for group in state["param_groups"]:
        for key in ("maximize", "foreach", "averaging"):
            group.pop(key)
    old = SNTASGD.__new__(SNTASGD)
    old.__setstate__(state)
    assert old._masks == {} and old._swapped is False
    assert [(g["maximize"], g["foreach"], g["averaging"]) for g in old.param_groups] == [(False, None, False)]
    old.set_masks({params[0]: torch.ones(6, 5, dtype=torch.bool)})
    for p in params:
        p.grad = torch.ones_like(p)
    before = params[1].detach().clone()
    old.step()
    assert torch.equal(params[1], before - 0.5)  # minimizes


@pytest.mark.parametrize("foreach", [False, True])
def test_sntasgd_in_bfloat16_keeps_exact_lifetimes(foreach):
    """bf16 weights, float32 counters: 1/age in bf16 (1/3 is inexact) would make the counter drift."""
    params = two_params(torch.bfloat16)
    opt = SNTASGD(params, lr=0.25, weight_decay=0.5, foreach=foreach)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0] = False
    opt.set_masks({params[0]: mask})
    opt.start_averaging()
    history = []
    for _ in range(7):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        with torch.no_grad():
            params[0].mul_(mask)
        history.append(params[0].detach().float().clone())
    age = opt.state[params[0]]["age"]
    assert age.dtype == torch.float32 and torch.equal(age, mask.float() * 8)
    average = opt.averaged_parameters()[0]
    assert average.dtype == torch.bfloat16 and (average[~mask] == 0).all()
    torch.testing.assert_close(average.float(), torch.stack(history).mean(0), rtol=0, atol=2e-2)


@pytest.mark.parametrize("foreach", [False, True])
def test_sntasgd_averages_stay_zero_where_no_weight_exists_with_the_engine(foreach):
    """The engine does not re-zero SNTASGD's state after a step (keeps_inactive_state_zero), while the SGD update
    does move inactive weights until the post-hook re-zeroes them: the average must not follow them there."""
    params = two_params()
    opt = SNTASGD(params, lr=0.5, foreach=foreach)
    engine = SparseEngine({"w": params[0]}, {"w": torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) < 0.5})
    engine.attach(opt)
    opt.start_averaging()
    mask = engine.tensors["w"].mask
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert (params[0][~mask] == 0).all()
    assert (opt.state[params[0]]["ax"][~mask] == 0).all() and (opt.state[params[0]]["ax"][mask] != 0).all()


def test_sntasgd_skips_parameters_without_gradients_only():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    opt.start_averaging()
    before = [p.detach().clone() for p in params]
    params[1].grad = torch.ones(5)  # the first parameter has no gradient
    opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1] - 0.5)
    assert "ax" not in opt.state[params[0]] and opt.state[params[1]]["n"] == 1


def test_sntasgd_restart_before_start_and_with_foreign_state():
    params = two_params()
    sgd = torch.optim.SGD(params, lr=0.5)  # momentum 0: leaves {"momentum_buffer": None} per parameter
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    opt = SNTASGD(params, lr=0.5)
    opt.load_state_dict(sgd.state_dict())
    opt.restart_averaging()  # starts averaging too; no average exists yet
    assert opt.averaging
    params[0].grad = None
    opt.step()
    opt.restart_averaging()  # the first parameter has no average, the second one does
    assert opt.state[params[1]]["n"] == 0 and torch.equal(opt.state[params[1]]["ax"], params[1].detach())


def test_sntasgd_masks_attached_before_loading_a_dense_average():
    params = two_params()
    dense = SNTASGD(params, lr=0.5)
    dense.start_averaging()
    for p in params:
        p.grad = torch.ones_like(p)
    dense.step()
    saved = dense.state_dict()
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    opt = SNTASGD(params, lr=0.5)
    opt.set_masks({params[0]: mask})
    opt.load_state_dict(saved)
    state = opt.state[params[0]]
    assert "n" not in state and torch.equal(state["age"], mask.float() * 2)  # one averaged step so far
    assert (state["ax"][~mask] == 0).all()


def test_sntasgd_argument_messages():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    with pytest.raises(ValueError, match=r"parameter group 1: weight_decay must be a finite number >= 0, got -1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": -1})
    with pytest.raises(
        ValueError, match=r"the mask of parameter 0 must be a bool tensor of shape \(6, 5\), got torch.bool"
    ):
        opt.set_masks({params[0]: torch.ones(5, 6, dtype=torch.bool)})
    with pytest.raises(
        ValueError, match=r"update.kept for parameter 0 must be a bool tensor of shape \(6, 5\), got torch"
    ):
        opt.on_mask_update(params[0], MaskUpdate(None, torch.ones(6, 5), torch.ones(6, 5, dtype=torch.bool)))
    g = [torch.ones(6, 5), torch.ones(5)]
    with pytest.raises(ValueError, match=r"got 2 params, axs=2, ages=None, ns=2"):
        sntasgd(params, g, [torch.zeros(6, 5), torch.zeros(5)], None, [1, 1], lr=0.1)
    with pytest.raises(ValueError, match=r"got 2 params, axs=2, ages=2, ns=None"):
        sntasgd(params, g, [torch.zeros(6, 5), torch.zeros(5)], [None, None], None, lr=0.1)
    with pytest.raises(ValueError, match=r"^SNTASGD.load_state_dict: expected an optimizer state dict"):
        opt.load_state_dict({"state": {}})
    other = SNTASGD([params[0]], lr=0.5)
    with pytest.raises(
        ValueError, match=r"0 has 1 parameters here and 2 in the state dict: it was saved from a different"
    ):
        other.load_state_dict(opt.state_dict())


def test_sntasgd_averaging_step_leaves_the_gradients_alone():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)  # no weight decay, not maximize: the step's gradient is p.grad itself
    opt.set_masks({params[0]: torch.ones(6, 5, dtype=torch.bool)})
    opt.start_averaging()
    for _ in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.25)
        opt.step()
        assert all((p.grad == 0.25).all() for p in params)


def test_functional_sntasgd_defaults_to_no_weight_decay_and_handles_several_dtypes():
    params = [torch.ones(3), torch.ones(2, dtype=torch.float64)]
    grads = [torch.full((3,), 0.5), torch.full((2,), 0.5, dtype=torch.float64)]
    sntasgd(params, grads, lr=1.0)
    assert torch.equal(params[0], torch.full((3,), 0.5))
    sntasgd(params, grads, lr=1.0, foreach=True)  # one bucket per dtype, each stepped
    assert torch.equal(params[0], torch.zeros(3)) and torch.equal(params[1], torch.zeros(2, dtype=torch.float64))


def test_sntasgd_averaged_and_raw_whether_swapped_or_not():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    opt.start_averaging()
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    average, raw = opt.state[params[0]]["ax"].clone(), params[0].detach().clone()
    assert all(torch.equal(a, b) for a, b in zip(opt.averaged_and_raw(params[0]), (average, raw)))
    with opt.swap_averaged():  # a checkpoint written while the averages are in the model
        assert all(torch.equal(a, b) for a, b in zip(opt.averaged_and_raw(params[0]), (average, raw)))
    assert opt.averaged_and_raw(nn.Parameter(torch.ones(2))) is None


def test_sntasgd_layout_messages():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    opt.start_averaging()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"groups, this optimizer has 1: it was saved from a different "):
        SNTASGD(params, lr=0.5).load_state_dict({"state": {}, "param_groups": saved["param_groups"] * 2})
    swapped = [nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(6, 5))]
    with pytest.raises(ValueError, match=r"saved 'ax' has shape \(6, 5\): the state dict was saved from a different "):
        SNTASGD(swapped, lr=0.5).load_state_dict(saved)


@pytest.mark.parametrize("growth", ["random", "gradient", "momentum"])
def test_growth_can_fill_every_inactive_position_and_no_more(growth):
    mask = torch.tensor([True, False, True, False, False])
    source = torch.Generator().manual_seed(0) if growth == "random" else torch.tensor([0.0, 3.0, 0.0, -1.0, 2.0])
    grow = GROWTHS[growth].grow
    assert grow(mask, 3, source).all()
    with pytest.raises(ValueError, match="cannot grow 4 weights: only 3 positions are inactive"):
        grow(mask, 4, source)


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
