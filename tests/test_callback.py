"""SelfishSparsityCallback in real Lightning Trainer runs on a tiny LSTM language model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_selfish import SelfishSparsityCallback


class StepChecker(Callback):
    """After every optimizer step: inactive weights are exactly zero, counts fixed; records mask snapshots."""

    def __init__(self, sparsity_cb: SelfishSparsityCallback) -> None:
        self.cb = sparsity_cb
        self.steps = 0
        self.epoch_masks: list[dict[str, torch.Tensor]] = []
        self.counts: dict[str, int] | None = None

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = dict(pl_module.named_parameters())
        for name, mask in self.cb.masks.items():
            assert (params[name][~mask] == 0).all(), (
                f"{name} has nonzero inactive weights at step {trainer.global_step}"
            )
        counts = {n: int(m.sum()) for n, m in self.cb.masks.items()}
        self.counts = self.counts or counts
        assert counts == self.counts
        self.steps += 1

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_masks.append({n: m.clone() for n, m in self.cb.masks.items()})


def fit(cb, model=None, max_epochs=3, extra=(), **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or TinyLM()
    checker = StepChecker(cb)
    trainer = make_trainer([cb, checker, *extra], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader(), token_loader(1, 2))
    return model, checker, trainer


def test_default_selection_counts_and_zeros():
    cb = SelfishSparsityCallback(sparsity=0.67, prune_rate=0.7, seed=0)
    model, checker, _ = fit(cb)
    assert sorted(cb.masks) == sorted(
        [
            "encoder.weight",
            "rnn.weight_ih_l0",
            "rnn.weight_hh_l0",
            "rnn.weight_ih_l1",
            "rnn.weight_hh_l1",
            "decoder.weight",
        ]
    )
    params = dict(model.named_parameters())
    for name, mask in cb.masks.items():
        assert int(mask.sum()) == round(0.33 * mask.numel())
        assert mask.shape == params[name].shape and mask.dtype == torch.bool
    assert all((p != 0).float().mean() > 0.9 for n, p in params.items() if "bias" in n)  # biases dense
    assert checker.steps == 3 * 8
    # connectivity evolves between epochs, with the same count
    first, second = checker.epoch_masks[0], checker.epoch_masks[1]
    assert all(not torch.equal(first[n], second[n]) for n in first)


def test_per_gate_densities_drift_apart_jointly_and_stay_equal_per_gate():
    def gate_sparsity(cb):
        report = cb.engine.sparsity_report()
        return [report[f"rnn.weight_hh_l0/{g}"] for g in "ifgo"]

    joint = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.8, seed=0)
    fit(joint, max_epochs=4)
    per_gate = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.8, seed=0, gate_redistribution=False)
    fit(per_gate, max_epochs=4)
    assert max(gate_sparsity(joint)) - min(gate_sparsity(joint)) > 0.02
    assert gate_sparsity(per_gate) == [0.5] * 4


def test_update_every_steps_and_schedule():
    cb = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.5, seed=0, update_every=5)
    updates = []
    original = cb._update
    cb._update = lambda trainer, amount: (
        updates.append((trainer.global_step, cb.current_prune_rate(trainer.global_step))),
        original(trainer, amount),
    )
    fit(cb, max_epochs=2)
    assert [s for s, _ in updates] == [5, 10, 15]
    rates = [r for _, r in updates]
    assert rates == sorted(rates, reverse=True) and rates[0] < 0.5
    total = 16
    assert rates[0] == pytest.approx(0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * 5 / total)) / 2)


def test_gradient_accumulation_enforces_once_per_real_step(enforcement_calls):
    """Counts the library's own enforcement calls (a hook installed twice would enforce twice per step)."""
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0)
    _, _, trainer = fit(cb, max_epochs=2, accumulate_grad_batches=4)
    assert len(enforcement_calls) == 4  # 8 batches / 4 per step, 2 epochs
    assert all(opt is trainer.optimizers[0] for opt in enforcement_calls)


def test_manual_optimization():
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0)
    _, checker, _ = fit(cb, model=TinyLM(manual=True), max_epochs=2, gradient_clip_val=None)
    assert checker.steps == 16
    assert not torch.equal(checker.epoch_masks[0]["rnn.weight_hh_l0"], checker.epoch_masks[1]["rnn.weight_hh_l0"])


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_optimizer_state_is_masked(optimizer):
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0)
    model, _, trainer = fit(cb, model=TinyLM(optimizer=optimizer), max_epochs=3)
    opt = trainer.optimizers[0]
    params = dict(model.named_parameters())
    checked = 0
    for name, mask in cb.masks.items():
        for key, value in opt.state[params[name]].items():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert (value[~mask] == 0).all(), f"{key} of {name}"
                checked += 1
    assert checked == (12 if optimizer == "adam" else 6)


@pytest.mark.parametrize("growth,optimizer,strict", [("gradient", "sgd", True), ("momentum", "momentum", False)])
def test_other_growth_strategies_run(growth, optimizer, strict):
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0, growth=growth, removal="set", mask_gradients=strict)
    _, checker, _ = fit(cb, model=TinyLM(optimizer=optimizer), max_epochs=2)
    assert not torch.equal(checker.epoch_masks[0]["rnn.weight_hh_l0"], checker.epoch_masks[1]["rnn.weight_hh_l0"])


def test_er_init_and_gru():
    cb = SelfishSparsityCallback(sparsity=0.7, seed=0, init="er")
    model, _, _ = fit(cb, model=TinyLM(rnn="gru"), max_epochs=2)
    total = sum(m.numel() for m in cb.masks.values())
    active = sum(int(m.sum()) for m in cb.masks.values())
    assert active == sum(round(0.3 * m.numel()) for m in cb.masks.values()) and active < total
    assert cb.masks["encoder.weight"].float().mean() != cb.masks["rnn.weight_hh_l0"].float().mean()
    assert "rnn.weight_hh_l0/z" in cb.engine.sparsity_report()


def test_include_exclude():
    cb = SelfishSparsityCallback(sparsity=0.5, seed=0, include=["rnn.*"], exclude=["*_l1"])
    fit(cb, max_epochs=1)
    assert sorted(cb.masks) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]


CLIP = 0.02


def clip_step_reference(mask_gradients: bool):
    """One training step; returns (weights before, captured gradients, weights after, masks)."""
    torch.manual_seed(0)
    model = TinyLM(lr=1.0)
    cb = SelfishSparsityCallback(sparsity=0.67, seed=0, mask_gradients=mask_gradients)
    seen = {}

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["before"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            seen["grad"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

    trainer = make_trainer([cb, Capture()], max_epochs=1, max_steps=1, limit_val_batches=0, gradient_clip_val=CLIP)
    trainer.fit(model, token_loader())
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return seen["before"], seen["grad"], after, cb.masks


@pytest.mark.parametrize("mask_gradients", [False, True])
def test_clipping_order(mask_gradients):
    before, grads, after, masks = clip_step_reference(mask_gradients)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert norm > CLIP  # clipping is active in this step
    inactive_grad = sum(float(grads[n][~m].abs().sum()) for n, m in masks.items())
    assert (inactive_grad > 0) != mask_gradients  # dense gradients by default, masked ones in the strict order
    scale = CLIP / (float(norm) + 1e-6)
    for name, w in before.items():
        expected = w - 1.0 * (grads[name] * scale + 1.2e-6 * w)
        if name in masks:
            expected = expected * masks[name]
        assert torch.allclose(after[name], expected, atol=1e-6), name
    if not mask_gradients:
        # the strict order clips a smaller norm: every clipped step is larger by about 1/sqrt(density)
        masked_norm = math.sqrt(
            sum(
                float(grads[n].pow(2).sum()) if n not in masks else float(grads[n][masks[n]].pow(2).sum())
                for n in grads
            )
        )
        assert masked_norm < float(norm)


def test_tensorboard_tags(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = SelfishSparsityCallback(sparsity=0.67, seed=0)
    fit(cb, max_epochs=3, logger=TensorBoardLogger(tmp_path, name="tb"))
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in [
        "sparsity/rnn.weight_hh_l0/f",
        "sparsity/rnn.weight_ih_l1/o",
        "sparsity/encoder.weight",
        "sparsity/overall",
        "topology/prune_rate",
        "topology/removed",
        "topology/grown",
        "topology/changed_fraction",
    ]:
        assert tag in tags, tag
    overall = events.Scalars("sparsity/overall")
    assert len(overall) == 3 and all(abs(e.value - 0.67) < 0.01 for e in overall)  # fit start + 2 updates
    removed = [e.value for e in events.Scalars("topology/removed")]
    assert removed == [e.value for e in events.Scalars("topology/grown")] and removed[0] > removed[1] > 0


def masks_and_weights(model, cb):
    return {n: m.clone() for n, m in cb.masks.items()}, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpoint_resume_is_exact(tmp_path: Path):
    full_cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3)
    full_model, _, _ = fit(full_cb, max_epochs=4)
    full = masks_and_weights(full_model, full_cb)

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first_cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3)

    class Kill(Callback):  # the run is interrupted after its second epoch, with its 4-epoch schedule
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    fit(first_cb, max_epochs=4, extra=[Kill(), ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["callbacks"]["SelfishSparsityCallback"]
    assert set(state) >= {"masks", "generator", "num_updates", "last_update_step"} and state["num_updates"] == 1
    assert state["last_updated_epoch"] == 0  # epoch 1's update runs as epoch 2 starts, after this checkpoint

    resumed_cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=999)  # the seed comes from the checkpoint
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    trainer = make_trainer([resumed_cb, StepChecker(resumed_cb)], max_epochs=4)
    trainer.fit(model, token_loader(), token_loader(1, 2), ckpt_path=tmp_path / "epoch=1.ckpt")
    resumed = masks_and_weights(model, resumed_cb)
    for name in full[0]:
        assert torch.equal(full[0][name], resumed[0][name]), name
    for name in full[1]:
        assert torch.equal(full[1][name], resumed[1][name]), name


def test_resume_with_mismatched_masks_fails(tmp_path: Path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit(SelfishSparsityCallback(sparsity=0.6, seed=0), max_epochs=1, extra=[ckpt], enable_checkpointing=True)
    path = tmp_path / "last.ckpt"
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0, exclude=["decoder.*"])
    with pytest.raises(ValueError, match=r"only in the checkpoint: \['decoder.weight'\]"):
        make_trainer([cb], max_epochs=2).fit(TinyLM(), token_loader(), ckpt_path=path)
    with pytest.raises(ValueError, match="sparsity=0.6.*sparsity=0.5"):
        make_trainer([SelfishSparsityCallback(sparsity=0.5)], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=path
        )
    dense = tmp_path / "dense"
    make_trainer([], max_epochs=1, enable_checkpointing=True, default_root_dir=dense).fit(TinyLM(), token_loader())
    with pytest.raises(ValueError, match="holds no SelfishSparsityCallback state"):
        make_trainer([SelfishSparsityCallback(sparsity=0.6)], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=next(dense.rglob("*.ckpt"))
        )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(sparsity="0.5"), TypeError, "sparsity must be a number"),
        (dict(sparsity=0.5, prune_rate=1.5), ValueError, r"prune_rate must be in \[0, 1\], got 1.5"),
        (dict(sparsity=0.5, init="xavier"), ValueError, r"init must be one of \['uniform', 'er', 'erk', 'dense'\]"),
        (dict(sparsity=0.5, removal="mag"), ValueError, "removal must be one of"),
        (
            dict(sparsity=0.5, growth="rigl"),
            ValueError,
            r"growth must be one of \['random', 'gradient', 'momentum', 'none'\]",
        ),
        (dict(sparsity=0.5, update_every=0), ValueError, "update_every must be 'epoch' or a positive number"),
        (dict(sparsity=0.5, update_every="step"), ValueError, "update_every"),
        (dict(sparsity=0.5, include="rnn.*"), TypeError, "include must be a list"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SelfishSparsityCallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(include=["lstm.*"]), r"include pattern 'lstm.\*' matches no parameter.*rnn.weight_hh_l0"),
        (dict(exclude=["prior*"]), "exclude pattern 'prior\\*' matches no parameter"),
        (dict(gate_layouts={"rnn.weight_hh_l0": [("i", (0, 10)), ("f", (10, 60))]}), "does not tile"),
        (dict(gate_layouts={"decoder.weight": ["a", "b", "c"]}), "does not divide"),
    ],
)
def test_bad_model_dependent_arguments_fail_before_training(kwargs, match):
    cb = SelfishSparsityCallback(sparsity=0.5, **kwargs)
    stepped = []

    class Spy(Callback):
        def on_train_batch_start(self, *args):
            stepped.append(1)

    with pytest.raises(ValueError, match=match):
        make_trainer([cb, Spy()], max_epochs=1).fit(TinyLM(), token_loader())
    assert not stepped


def test_infinite_run_and_sharded_strategy_are_rejected():
    with pytest.raises(ValueError, match="needs a finite length"):
        make_trainer([SelfishSparsityCallback(sparsity=0.5)], max_epochs=-1).fit(TinyLM(), token_loader())
    from pytorch_lightning.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="supports the single-device and DDP strategies.*FSDPStrategy"):
        cb = SelfishSparsityCallback(sparsity=0.5)
        trainer = make_trainer([cb], max_epochs=1)
        trainer.strategy._accelerator = trainer.strategy.accelerator
        cb.setup(type("T", (), {"strategy": FSDPStrategy.__new__(FSDPStrategy), "callbacks": [cb]})(), None, "fit")
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `SelfishSparsityCallback`"):
        make_trainer([SelfishSparsityCallback(sparsity=0.5), SelfishSparsityCallback(sparsity=0.4)]).fit(
            TinyLM(), token_loader()
        )


class TiedLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(12, 12)
        self.encoder = torch.nn.Embedding(40, 12)
        self.decoder = torch.nn.Linear(12, 40)
        self.decoder.weight = self.encoder.weight


def test_tied_weights_are_one_tensor():
    cb = SelfishSparsityCallback(sparsity=0.5, seed=0)
    model, _, _ = fit(cb, model=TiedLM(), max_epochs=2)
    assert "encoder.weight" in cb.masks and "decoder.weight" not in cb.masks
    assert model.decoder.weight is model.encoder.weight
    assert int(cb.masks["encoder.weight"].sum()) == 240


def test_skip_next_update():
    cb = SelfishSparsityCallback(sparsity=0.5, seed=0)

    class SkipAfterFirstEpoch(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                cb.skip_next_update()

    _, checker, _ = fit(cb, max_epochs=3, extra=[SkipAfterFirstEpoch()])
    masks = checker.epoch_masks
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])  # skipped at the start of epoch 1
    assert not torch.equal(masks[1]["rnn.weight_hh_l0"], masks[2]["rnn.weight_hh_l0"])
    assert cb.num_updates == 1


def test_gradient_growth_with_an_unsized_loader():
    # Epoch updates over a loader without a length keep a running copy of the last dense gradient (issue 7);
    # step updates copy it only before each update. tests/test_methods.py checks the grown positions.
    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_loader().dataset

    loader = torch.utils.data.DataLoader(Unsized(), batch_size=4)
    cb = SelfishSparsityCallback(sparsity=0.5, growth="gradient", total_steps=16, seed=0)
    make_trainer([cb], max_epochs=2).fit(TinyLM(), loader)
    assert cb.num_updates == 1 and cb.controller.running_gradient
    cb = SelfishSparsityCallback(sparsity=0.5, growth="gradient", total_steps=10, update_every=3, seed=0)
    model, checker, _ = fit(cb, max_epochs=1)
    assert cb.num_updates == 2  # steps 3 and 6 of 8
