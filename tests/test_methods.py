"""Every method of the paper's comparison in the one engine: presets, their defining behaviour, invariants.

Engine-level tests check what defines each method on hand-made weights; Lightning runs on the tiny LM of
conftest.py check the schedules, resume exactness and logging of every preset.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyLM, make_trainer, token_loader, update_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import Callback
from torch import nn

from lightning_selfish import SNTASGD, SelfishSparsityCallback, SparseEngine, detect_gate_layouts, topology
from lightning_selfish.engine import UpdateContext
from lightning_selfish.methods import METHODS, resolve
from lightning_selfish.parts import UpdateAmount
from lightning_selfish.redistribution import allocate_counts, momentum_of
from lightning_selfish.schedules import gmp_sparsity, scheduled_sparsity

SPARSE_TO_SPARSE = ["selfish", "set", "dsr", "snfs", "rigl"]


def engine_of(tensors: dict[str, torch.Tensor], sparsity: float, init: str = "uniform", seed: int = 0, **kwargs):
    params = {name: nn.Parameter(t.clone()) for name, t in tensors.items()}
    return SparseEngine.initialize(params, sparsity, torch.Generator().manual_seed(seed), init, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# presets and their resolution
# --------------------------------------------------------------------------------------------------------------


def test_presets_are_the_paper_table():
    rows = {
        name: (p.init, p.removal, p.growth, p.redistribution, p.gate_redistribution, p.schedule)
        for name, p in METHODS.items()
    }
    assert rows == {
        "selfish": ("uniform", "magnitude", "random", "none", "joint", "cosine"),
        "static": ("uniform", "none", "none", "none", "joint", "never"),
        "set": ("er", "set", "random", "none", "joint", "cosine"),
        "set_selfish_rnn": ("er", "negativity", "random", "none", "joint", "cosine"),
        "dsr": ("uniform", "threshold", "random", "nonzeros", "joint", "cosine"),
        "snfs": ("uniform", "magnitude", "momentum", "momentum", "joint", "cosine"),
        "rigl": ("erk", "magnitude", "gradient", "none", "joint", "cosine"),
        "gmp": ("dense", "magnitude", "none", "none", "joint", "gmp"),
    }
    rigl = METHODS["rigl"]
    assert (rigl.prune_rate, rigl.min_prune_rate, rigl.update_every, rigl.update_until) == (0.3, 0.0, 100, 0.75)
    assert (rigl.removed_and_regrown, rigl.removal_rounding) == ("keep", "floor")  # RigL's code
    assert not METHODS["dsr"].grow_into_removed and METHODS["selfish"].grow_into_removed


def test_explicit_arguments_override_the_preset_and_none_keeps_it():
    cb = SelfishSparsityCallback(sparsity=0.5, method="rigl", update_every="epoch", prune_rate=None)
    assert (cb.update_every, cb.prune_rate, cb.growth.name, cb.init.name, cb.update_until) == (
        "epoch",
        0.3,
        "gradient",
        "erk",
        0.75,
    )
    assert cb.config.update_every == "epoch" and cb.method == "rigl"
    cb = SelfishSparsityCallback(sparsity=0.5, method="snfs", growth="random", gate_redistribution=False)
    assert (cb.growth.name, cb.redistribution.name, cb.gate_redistribution.name) == ("random", "momentum", "none")
    default = SelfishSparsityCallback(sparsity=0.5)
    assert (default.method, default.prune_rate, default.min_prune_rate, default.update_every) == (
        "selfish",
        0.5,
        0.005,
        "epoch",
    )
    assert resolve("selfish", 0.5, gate_redistribution=True).gate_redistribution.name == "joint"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="lottery"), ValueError, r"method must be one of \['selfish', 'static', 'set', 'set_selfish"),
        (dict(redistribution="gates"), ValueError, r"redistribution must be one of \['none', 'nonzeros', 'momentum'\]"),
        (dict(gate_redistribution="mean"), ValueError, r"gate_redistribution must be one of \['joint', 'none', 'mag"),
        (dict(schedule="linear"), ValueError, r"schedule must be one of \['cosine', 'gmp', 'never'\] or a Sched"),
        (dict(method="gmp", growth="random"), ValueError, "schedule='gmp' prunes without regrowth: growth must be"),
        (dict(growth="none"), ValueError, "growth='none' with removal='magnitude' would lose weights"),
        (dict(update_until=1.5), ValueError, r"update_until must be in \(0, 1\] or None, got 1.5"),
        (dict(method="gmp", pruning_end=1.5), ValueError, r"pruning_end must be a step .* got 1.5"),
        (dict(method="gmp", pruning_start="0"), TypeError, "pruning_start must be a step"),
        (dict(removed_and_regrown="zero"), ValueError, r"removed_and_regrown must be one of \['restart', 'keep'\]"),
        (dict(method="dsr", threshold=0.0), ValueError, r"threshold must be in \(0, inf\), got 0.0"),
    ],
)
def test_bad_method_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SelfishSparsityCallback(sparsity=0.5, **kwargs)


def test_gmp_window_must_fit_the_run():
    cb = SelfishSparsityCallback(sparsity=0.5, method="gmp", pruning_end=100, update_every=2)
    with pytest.raises(ValueError, match=r"pruning_end=100 \(step 100\).*24 steps|24 steps.*pruning_end=100"):
        make_trainer([cb], max_epochs=3).fit(TinyLM(), token_loader())


def test_dense_gradient_every_for_flops():
    def every(method, **kw):
        return resolve(method, 0.5, **kw).dense_gradient_every

    assert [every(m) for m in METHODS] == [None, None, None, None, None, 1, 100, None]
    assert every("rigl", update_every="epoch") == "epoch"


# --------------------------------------------------------------------------------------------------------------
# exact allocation
# --------------------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    caps=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    scores=st.lists(st.floats(0, 10, allow_nan=False), min_size=8, max_size=8),
    fraction=st.floats(0, 1),
)
def test_allocate_counts_is_exact_and_capped(caps, scores, fraction):
    scores = scores[: len(caps)]
    total = int(fraction * sum(caps))
    counts = allocate_counts(total, scores, caps)
    assert sum(counts) == total and all(0 <= c <= cap for c, cap in zip(counts, caps))
    # proportional where no cap binds: every count within 1 of its exact share among the uncapped parts
    free = [i for i, (c, cap) in enumerate(zip(counts, caps)) if c < cap]
    left = total - sum(counts[i] for i in range(len(caps)) if i not in free)
    weight = sum(scores[i] for i in free)
    if free and weight > 0:
        for i in free:
            assert abs(counts[i] - left * scores[i] / weight) < 1 + 1e-9


def test_allocate_counts_edges():
    assert allocate_counts(10, [1, 1, 1], [5, 5, 5]) == [4, 3, 3]  # ties go to the lower index
    assert allocate_counts(10, [10, 1, 1], [3, 10, 10]) == [3, 4, 3]  # the capped part's excess is shared again
    assert allocate_counts(7, [0, 0], [3, 4]) == [3, 4]  # no score: by free room
    assert allocate_counts(5, [float("nan"), 2], [5, 5]) == [0, 5]
    with pytest.raises(ValueError, match=r"total must be in \[0, 6\]"):
        allocate_counts(7, [1, 1], [3, 3])


# --------------------------------------------------------------------------------------------------------------
# the behaviour that defines each method (engine level)
# --------------------------------------------------------------------------------------------------------------


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


def test_momentum_is_normalised_under_adam_and_the_gradient_under_sntasgd():
    w = nn.Parameter(torch.randn(4, 4))
    adam = torch.optim.Adam([w])
    w.grad = torch.randn(4, 4)
    adam.step()
    state = adam.state[w]
    expected = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    assert torch.equal(momentum_of([adam], w, None, "w"), expected)
    grad = torch.randn(4, 4)
    assert momentum_of([SNTASGD([w], lr=1.0)], w, grad, "w") is grad
    with pytest.raises(ValueError, match="needs a momentum buffer for 'w'"):
        momentum_of([torch.optim.SGD([w], lr=1.0)], w, grad, "w")


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
    stats = update_engine(engine, 0.5, torch.Generator().manual_seed(1), gradients=grads)
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


# --------------------------------------------------------------------------------------------------------------
# Lightning runs
# --------------------------------------------------------------------------------------------------------------

METHOD_KWARGS = {
    "selfish": dict(prune_rate=0.6),
    "static": {},
    "set": {},
    "set_selfish_rnn": {},
    "dsr": dict(threshold=0.05),
    "snfs": {},
    "rigl": dict(update_every=3),
    "gmp": dict(update_every=2),
}


def optimizer_for(method: str) -> str:
    return "momentum" if method == "snfs" else "sgd"


class Recorder(Callback):
    """After every optimizer step: masks, inactive weights zero, and the count of active weights."""

    def __init__(self, cb: SelfishSparsityCallback) -> None:
        self.cb = cb
        self.masks: list[dict[str, torch.Tensor]] = []
        self.totals: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = dict(pl_module.named_parameters())
        for name, mask in self.cb.masks.items():
            assert (params[name][~mask] == 0).all(), name
        self.masks.append({n: m.clone() for n, m in self.cb.masks.items()})
        self.totals.append(sum(int(m.sum()) for m in self.cb.masks.values()))


def run(method, max_epochs=3, extra=(), model=None, trainer_kwargs=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    cb = SelfishSparsityCallback(sparsity=0.6, method=method, seed=1, **{**METHOD_KWARGS[method], **kwargs})
    recorder = Recorder(cb)
    model = model or TinyLM(optimizer=optimizer_for(method))
    trainer = make_trainer([cb, recorder, *extra], max_epochs=max_epochs, **(trainer_kwargs or {}))
    trainer.fit(model, token_loader(), token_loader(1, 2))
    return cb, recorder, model


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_in_lightning(method):
    cb, rec, _ = run(method)
    changed = any(not torch.equal(rec.masks[0][n], rec.masks[-1][n]) for n in rec.masks[0])
    if method == "gmp":
        assert rec.totals == sorted(rec.totals, reverse=True) and rec.totals[-1] < rec.totals[0]
        return
    assert len(set(rec.totals)) == 1  # the total never changes
    assert changed == (method != "static")
    if method == "static":
        assert cb.num_updates == 0


def test_rigl_updates_every_delta_t_steps_until_75_percent_with_cosine_fraction():
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(cb.num_updates)

    copies = []
    cb = SelfishSparsityCallback(sparsity=0.6, method="rigl", update_every=3, seed=1)
    original = SparseEngine.dense_gradients

    def counting(self):
        copies.append(1)
        return original(self)

    SparseEngine.dense_gradients = counting
    try:
        pl.seed_everything(0, verbose=False)
        make_trainer([cb, Spy()], max_epochs=3).fit(TinyLM(), token_loader())
    finally:
        SparseEngine.dense_gradients = original
    updated_at = [step + 1 for step in range(len(seen)) if seen[step] != (seen[step - 1] if step else 0)]
    assert updated_at == [3, 6, 9, 12, 15]  # 24 steps: 75 % is step 18, no update from there on
    assert len(copies) == 5  # the dense gradient is copied only before update steps
    assert [cb.update_at(s).prune_rate for s in (3, 9)] == pytest.approx(
        [0.3 / 2 * (1 + math.cos(math.pi * s / 18)) for s in (3, 9)]
    )
    assert cb.update_at(18) is None and cb.update_at(4) is None


def test_gmp_follows_the_cubic_schedule_to_the_step_and_never_regrows():
    cb, rec, model = run("gmp", max_epochs=3, pruning_start=2, pruning_end=20, update_every=4)
    sizes = {n: m.numel() for n, m in rec.masks[0].items()}
    total = sum(sizes.values())
    for step, (masks, count) in enumerate(zip(rec.masks, rec.totals), start=1):
        last = 20 if step >= 20 else (2 + (step - 2) // 4 * 4 if step >= 2 else 0)
        expected = gmp_sparsity(last, 24, cb.config) if last else 0.0
        assert count == sum(topology.uniform_count(n, 1 - expected) for n in sizes.values()), step
        assert scheduled_sparsity(step, 24, cb.config) == pytest.approx(expected)
        if step > 1:
            for n in masks:
                assert not (masks[n] & ~rec.masks[step - 2][n]).any(), f"{n} regrew at step {step}"
    assert 1 - rec.totals[-1] / total == pytest.approx(0.6, abs=1e-3)
    assert all(int(m.sum()) == topology.uniform_count(m.numel(), 0.4) for m in cb.masks.values())
    assert gmp_sparsity(11, 24, cb.config) == pytest.approx(0.6 * (1 - (1 - 9 / 18) ** 3))


def test_gmp_with_sntasgd_averages_pruned_weights_to_zero():
    class AveragingLM(TinyLM):
        def configure_optimizers(self):
            self.opt = SNTASGD(self.parameters(), lr=1.0)
            self.opt.start_averaging()
            return self.opt

    cb, rec, model = run("gmp", model=AveragingLM(), pruning_end=0.5, update_every=2)
    opt = model.opt
    params = dict(model.named_parameters())
    for name, mask in cb.masks.items():
        state = opt.state[params[name]]
        assert (state["ax"][~mask] == 0).all() and (state["ax"][mask] != 0).any(), name


def test_gradient_growth_with_epoch_updates_and_an_unsized_loader_equals_the_sized_run():
    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_loader().dataset

    results = []
    for loader in (token_loader(), torch.utils.data.DataLoader(Unsized(), batch_size=4)):
        pl.seed_everything(0, verbose=False)
        cb = SelfishSparsityCallback(sparsity=0.6, method="rigl", update_every="epoch", total_steps=24, seed=1)
        model = TinyLM()
        make_trainer([cb], max_epochs=3).fit(model, loader)
        assert cb.num_updates == 2
        results.append(({n: m.clone() for n, m in cb.masks.items()}, dict(model.named_parameters())))
    (sized_masks, sized_params), (unsized_masks, unsized_params) = results
    for name in sized_masks:
        assert torch.equal(sized_masks[name], unsized_masks[name]), name
    for name in sized_params:
        assert torch.equal(sized_params[name], unsized_params[name]), name


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_exact_for_every_method(method, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    full_cb, _, full_model = run(method, max_epochs=4)

    class Kill(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    pl.seed_everything(0, verbose=False)
    first = SelfishSparsityCallback(sparsity=0.6, method=method, seed=1, **METHOD_KWARGS[method])
    make_trainer([first, Kill(), ckpt], max_epochs=4, enable_checkpointing=True).fit(
        TinyLM(optimizer=optimizer_for(method)), token_loader(), token_loader(1, 2)
    )
    pl.seed_everything(0, verbose=False)
    resumed = SelfishSparsityCallback(sparsity=0.6, method=method, seed=99, **METHOD_KWARGS[method])
    model = TinyLM(optimizer=optimizer_for(method))
    make_trainer([resumed], max_epochs=4).fit(
        model, token_loader(), token_loader(1, 2), ckpt_path=tmp_path / "epoch=1.ckpt"
    )
    assert resumed.num_updates == full_cb.num_updates
    for name in full_cb.masks:
        assert torch.equal(full_cb.masks[name], resumed.masks[name]), name
    full_params = dict(full_model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, full_params[name]), name


def test_resume_with_another_method_fails(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    run("set", max_epochs=1, extra=[ckpt], trainer_kwargs=dict(enable_checkpointing=True))
    with pytest.raises(ValueError, match="trained with method='set', this callback has method='dsr'"):
        make_trainer([SelfishSparsityCallback(sparsity=0.6, method="dsr")], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=tmp_path / "last.ckpt"
        )


@pytest.mark.parametrize("method", ["dsr", "gmp"])
def test_tensorboard_has_per_tensor_and_per_gate_sparsity(method, tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(method, max_epochs=3, trainer_kwargs=dict(logger=TensorBoardLogger(tmp_path, name="tb")))
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"sparsity/rnn.weight_hh_l0/f", "sparsity/encoder.weight", "sparsity/overall", "topology/removed"} <= tags
    if method == "dsr":
        assert "topology/threshold" in tags
    else:
        overall = [e.value for e in events.Scalars("sparsity/overall")]
        assert overall[0] == 0.0 and overall[-1] == pytest.approx(0.6, abs=1e-3)
        assert overall == sorted(overall) and "topology/target_sparsity" in tags


def test_running_gradient_copy_resumes_exactly(tmp_path):
    """Epoch updates over an unsized loader: the last step's gradient copy travels in the checkpoint."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_loader().dataset

    def loader():
        return torch.utils.data.DataLoader(Unsized(), batch_size=4)

    def callback():
        return SelfishSparsityCallback(sparsity=0.6, method="rigl", update_every="epoch", total_steps=32, seed=1)

    class Kill(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    pl.seed_everything(0, verbose=False)
    full, full_model = callback(), TinyLM()
    make_trainer([full], max_epochs=4).fit(full_model, loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    pl.seed_everything(0, verbose=False)
    make_trainer([callback(), Kill(), ckpt], max_epochs=4, enable_checkpointing=True).fit(TinyLM(), loader())
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["callbacks"]["SelfishSparsityCallback"]
    assert set(state["gradients"]) == set(full.masks)  # the running copy is in the checkpoint
    pl.seed_everything(0, verbose=False)
    resumed, model = callback(), TinyLM()
    make_trainer([resumed], max_epochs=4).fit(model, loader(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert resumed.num_updates == full.num_updates == 2  # steps 8 and 16; step 24 is past 75 % of 32
    for name in full.masks:
        assert torch.equal(full.masks[name], resumed.masks[name]), name
    full_params = dict(full_model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, full_params[name]), name


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


# --------------------------------------------------------------------------------------------------------------
# a user's own part (docs/methods.md, "Adding a part")
# --------------------------------------------------------------------------------------------------------------


def test_a_growth_part_registered_as_documented_gives_the_builtin_gradient_masks(monkeypatch) -> None:
    """docs/methods.md: a growth rule is one object carrying what it reads. Wrapping the built-in gradient growth
    must give its masks exactly, registered by name or handed over as the object (the dense gradient copy is made
    because the part says it reads the gradient, not because of its name)."""
    from lightning_selfish.methods import GROWTHS
    from lightning_selfish.parts import Growth

    mine = Growth("gradient_v2", topology.gradient_growth, reads="gradient")
    monkeypatch.setitem(GROWTHS, "gradient_v2", mine)
    masks = []
    for growth in ("gradient", "gradient_v2", mine):
        cb = SelfishSparsityCallback(sparsity=0.6, method="rigl", growth=growth, seed=1, update_every=3)
        pl.seed_everything(0, verbose=False)
        make_trainer([cb], max_epochs=2).fit(TinyLM(), token_loader())
        assert cb.num_updates == 3 and cb.controller.needs_gradient  # steps 3, 6, 9 (RigL stops at 75 %)
        masks.append({name: mask.clone() for name, mask in cb.masks.items()})
    for other in masks[1:]:
        assert all(torch.equal(masks[0][name], other[name]) for name in masks[0])
    # and the dense gradient matters: growing from the masked gradient would give other masks
    masked = Growth("masked", lambda mask, n, grad: topology.gradient_growth(mask, n, grad * mask), reads="gradient")
    cb = SelfishSparsityCallback(sparsity=0.6, method="rigl", growth=masked, seed=1, update_every=3)
    pl.seed_everything(0, verbose=False)
    make_trainer([cb], max_epochs=2).fit(TinyLM(), token_loader())
    assert any(not torch.equal(masks[0][name], cb.masks[name]) for name in masks[0])


def test_a_part_that_reads_nothing_known_is_refused() -> None:
    from lightning_selfish.parts import Growth

    with pytest.raises(ValueError, match=r"Growth 'mine': reads must be 'generator', 'gradient' or 'momentum'"):
        Growth("mine", topology.gradient_growth, reads="grad")
