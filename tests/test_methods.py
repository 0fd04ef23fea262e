"""The method registry: the presets (the paper's table), ``methods.resolve`` and its messages word for word, a
user's own part, and every preset in a real Lightning fit on the tiny LM of conftest.py (its schedule to the step,
exact resume, logging). Each method's rule in one engine update is in ``test_engine_methods.py``, and against its
own paper's reference in ``test_method_references.py``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import Callback

from lightning_selfish import SNTASGD, SelfishSparsityCallback, SparseEngine
from lightning_selfish.method import topology
from lightning_selfish.method.catalogue import METHODS, MethodPreset, resolve
from lightning_selfish.method.parts import MethodConfig
from lightning_selfish.method.schedules import gmp_sparsity, scheduled_sparsity

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
    assert [rigl.value(s) for s in ("prune_rate", "min_prune_rate", "update_every", "update_until")] == [
        0.3,
        0,
        100,
        0.75,
    ]
    assert (rigl.value("removed_and_regrown"), rigl.value("removal_rounding")) == ("keep", "floor")  # RigL's code
    assert not METHODS["dsr"].value("grow_into_removed") and METHODS["selfish"].value("grow_into_removed")


def test_a_preset_names_its_parts_and_only_the_settings_it_changes() -> None:
    """MethodConfig's defaults are written once, on MethodConfig: a preset holds its part names, its prune rate and
    the settings where it differs (nothing else of MethodConfig is repeated on MethodPreset)."""
    config_fields = {f.name: f for f in dataclasses.fields(MethodConfig)}
    repeated = {f.name for f in dataclasses.fields(MethodPreset)} & set(config_fields)
    assert repeated == {"name", "init", "removal", "growth", "redistribution", "gate_redistribution", "schedule"} | {
        "prune_rate"
    }
    assert dict(METHODS["selfish"].settings) == {}
    assert dict(METHODS["rigl"].settings) == dict(
        min_prune_rate=0.0, update_every=100, update_until=0.75, removed_and_regrown="keep", removal_rounding="floor",
        min_updates=10,
    )  # fmt: skip
    assert METHODS["rigl"].value("threshold") == config_fields["threshold"].default
    with pytest.raises(TypeError, match=r"MethodPreset 'mine': unknown settings \['update_evry'\]; the settings are"):
        MethodPreset("mine", "uniform", "magnitude", "random", "none", "joint", "cosine", 0.5, {"update_evry": 3})


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
        (
            dict(gate_redistribution="mean"),
            ValueError,
            r"gate_redistribution must be True, False, one of \['joint', 'none', 'mag",
        ),
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


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (
            dict(paper="mine"),  # what describes a preset is not a part of it
            TypeError,
            "unknown method parts ['paper']; the parts are ['gate_redistribution', 'grow_into_removed', "
            "'grown_optimizer_state', 'growth', 'init', 'min_prune_rate', 'prune_rate', 'pruning_end', "
            "'pruning_start', 'redistribution', 'removal', 'removal_rounding', 'removed_and_regrown', 'schedule', "
            "'structure', 'threshold', 'threshold_tolerance', 'update_every', 'update_until']",
        ),
        (dict(threshold_tolerance=1.5), ValueError, "threshold_tolerance must be in [0, 1], got 1.5"),
        (dict(threshold="0.1"), TypeError, "threshold must be a number in (0, inf), got str '0.1'"),
        (dict(update_until=0.0), ValueError, "update_until must be in (0, 1] or None, got 0.0"),
        (
            dict(gate_redistribution="mean"),
            ValueError,
            "gate_redistribution must be True, False, one of ['joint', 'none', 'magnitude', 'gradient'] or a "
            "GateRedistribution object, got 'mean'",
        ),
        (
            dict(schedule="gmp", growth="none", removal="threshold"),
            ValueError,
            "schedule='gmp' prunes to exact counts: removal must be one of ['magnitude', 'set', 'negativity'], got "
            "'threshold'",
        ),
        (
            dict(schedule="gmp"),
            ValueError,
            "schedule='gmp' prunes without regrowth: growth must be 'none', got 'random' (a sparse-to-sparse method "
            "uses schedule='cosine')",
        ),
        (
            dict(removal="set", growth="none"),
            ValueError,
            "growth='none' with removal='set' would lose weights at every update: a sparse-to-sparse schedule "
            "('cosine') needs a growth, and pruning without regrowth is schedule='gmp'",
        ),
    ],
)
def test_resolve_messages(overrides, error, message) -> None:
    with pytest.raises(error) as raised:
        resolve("selfish", 0.5, **overrides)
    assert str(raised.value) == message


def test_the_gmp_window_accepts_its_whole_range() -> None:
    for start, end in ((0, 0), (0.0, 1.0), (1.0, 1.0), (0, 24)):
        config = resolve("gmp", 0.5, pruning_start=start, pruning_end=end)
        assert (config.pruning_start, config.pruning_end) == (start, end)


def test_gmp_window_must_fit_the_run():
    cb = SelfishSparsityCallback(sparsity=0.5, method="gmp", pruning_end=100, update_every=2)
    with pytest.raises(ValueError, match=r"pruning_end=100 \(step 100\).*24 steps|24 steps.*pruning_end=100"):
        make_trainer([cb], max_epochs=3).fit(TinyLM(), token_loader())


def test_which_methods_read_the_dense_gradient() -> None:
    assert not resolve("selfish", 0.5).reads_gradient
    assert resolve("selfish", 0.5, gate_redistribution="gradient").reads_gradient
    assert resolve("rigl", 0.5).reads_gradient
    # FLOPs: dense gradient every step for momentum (growth or across-layer redistribution), never without growth
    assert resolve("dsr", 0.5, redistribution="momentum").dense_gradient_every == 1
    assert resolve("static", 0.5, growth="gradient").dense_gradient_every is None  # schedule "never"
    assert resolve("rigl", 0.5, schedule="gmp", growth="none").dense_gradient_every is None
    assert resolve("gmp", 0.5, redistribution="momentum").dense_gradient_every is None  # nothing regrows


def test_dense_gradient_every_for_flops():
    def every(method, **kw):
        return resolve(method, 0.5, **kw).dense_gradient_every

    assert [every(m) for m in METHODS] == [None, None, None, None, None, 1, 100, None]
    assert every("rigl", update_every="epoch") == "epoch"


def test_a_cosine_schedule_that_neither_removes_nor_grows_is_allowed() -> None:
    config = resolve("selfish", 0.5, removal="none", growth="none")
    assert (config.removal.name, config.growth.name, config.schedule.name) == ("none", "none", "cosine")
    assert resolve("selfish", 0.5, gate_redistribution="gradient").dense_gradient_every == "epoch"


# --------------------------------------------------------------------------------------------------------------
# a user's own part (docs/methods.md, "Adding a part")
# --------------------------------------------------------------------------------------------------------------


def test_a_growth_part_registered_as_documented_gives_the_builtin_gradient_masks(monkeypatch) -> None:
    """docs/methods.md: a growth rule is one object carrying what it reads. Wrapping the built-in gradient growth
    must give its masks exactly, registered by name or handed over as the object (the dense gradient copy is made
    because the part says it reads the gradient, not because of its name)."""
    from lightning_selfish.method.catalogue import GROWTHS
    from lightning_selfish.method.parts import Growth

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
    from lightning_selfish.method.parts import Growth

    with pytest.raises(
        ValueError, match=r"Growth 'mine': reads must be 'generator', 'draws', 'gradient' or 'momentum'"
    ):
        Growth("mine", topology.gradient_growth, reads="grad")


# --------------------------------------------------------------------------------------------------------------
# every preset in a real fit
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
