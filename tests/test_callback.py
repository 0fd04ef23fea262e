"""SelfishSparsityCallback in real Trainer runs on the tiny LSTM LM of conftest.py: its arguments, what it
sparsifies and keeps sparse at every step, the update cadence and the run's length, the seed and the ranks,
strategies, what it logs and says, and what it lets go of when the fit ends. What an update does is in
``test_callback_updates.py``, checkpoints and resume in ``test_callback_resume.py``."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    RecordingLogger,
    TinyLM,
    Topology,
    assert_same,
    fit_checked,
    fit_tiny,
    make_trainer,
    snapshot,
    token_loader,
    unsized_loader,
)
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import SingleDeviceStrategy

import lightning_selfish.callbacks.sparsity
from lightning_selfish import SelfishSparsityCallback
from lightning_selfish.callbacks.compat import lightning_classes
from lightning_selfish.callbacks.sparsity import _check_strategy

# --------------------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sparsity=1.0), ValueError, r"sparsity must be in \(0, 1\), got 1.0"),
        (dict(sparsity=-0.1), ValueError, r"sparsity must be in \(0, 1\)"),
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
    "kwargs,error,match",
    [
        (dict(min_prune_rate=1.5), ValueError, r"min_prune_rate must be in \[0, 1\], got 1.5"),
        (dict(min_prune_rate="0.1"), TypeError, r"min_prune_rate must be a number in \[0, 1\], got str '0.1'"),
        (dict(prune_rate=True), TypeError, r"prune_rate must be a number in \[0, 1\], got bool True"),
        (dict(sparsity=0.5, prune_rate=-0.1), ValueError, r"prune_rate must be in \[0, 1\], got -0.1"),
        (
            dict(removal="mag"),
            ValueError,
            r"removal must be one of \[.*'magnitude', 'set'.*\] or a Removal object, got 'mag'",
        ),
        (dict(update_every=True), TypeError, r"update_every must be 'epoch' or a positive number of steps, got True"),
        (dict(update_every=2.5), TypeError, r"update_every must be 'epoch' or a positive number of steps, got 2.5"),
        (dict(update_every=-3), ValueError, r"update_every must be 'epoch' or a positive number of steps, got -3"),
        (
            dict(update_every="step"),
            ValueError,
            r"update_every must be 'epoch' or a positive number of steps, got 'step'",
        ),
        (
            dict(total_steps=0),
            ValueError,
            r"total_steps must be a positive int, a function of the trainer or None, got 0",
        ),
        (
            dict(total_steps=True),
            TypeError,
            r"total_steps must be a positive int, a function of the trainer or None, got True",
        ),
        (
            dict(total_steps=10.0),
            TypeError,
            r"total_steps must be a positive int, a function of the trainer or None, got 10.0",
        ),
        (dict(seed="1"), TypeError, "seed must be an int or None, got str"),
        (dict(seed=True), TypeError, "seed must be an int or None, got bool"),
        (dict(exclude="*prior*"), TypeError, r"exclude must be a list of name patterns \(str\), got '\*prior\*'"),
        (
            dict(include=["rnn.*", 3]),
            TypeError,
            r"include must be a list of name patterns \(str\), got \['rnn.\*', 3\]",
        ),
        (dict(gate_layouts=[("i", (0, 4))]), TypeError, "gate_layouts must be a mapping of parameter name to layout"),
    ],
)
def test_callback_arguments(kwargs, error, match):
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        SelfishSparsityCallback(**kwargs)


def test_a_one_step_run_is_a_valid_length() -> None:
    assert SelfishSparsityCallback(sparsity=0.5, total_steps=1).total_steps == 1


def test_resolved_arguments_are_the_attributes() -> None:
    """After ``__init__`` every method part is an attribute holding its resolved value, overrides included."""
    callback = SelfishSparsityCallback(
        sparsity=0.5,
        method="gmp",
        pruning_start=3,
        pruning_end=0.5,
        removed_and_regrown="keep",
        update_every=2,
    )
    assert (callback.pruning_start, callback.pruning_end, callback.removed_and_regrown) == (3, 0.5, "keep")
    dsr = SelfishSparsityCallback(sparsity=0.5, method="dsr", threshold=0.02, threshold_tolerance=0.3)
    assert (dsr.config.threshold, dsr.config.threshold_tolerance) == (0.02, 0.3)
    for part in ("prune_rate", "init", "removal", "growth", "gate_redistribution", "redistribution", "schedule"):
        assert getattr(dsr, part) == getattr(dsr.config, part), part


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


def test_include_and_exclude_that_leave_nothing():
    cb = SelfishSparsityCallback(sparsity=0.5, include=["rnn.*"], exclude=["rnn.*"])
    with pytest.raises(
        ValueError, match=r"no parameter left to sparsify \(include=\['rnn.\*'\], exclude=\['rnn.\*'\]\)"
    ):
        make_trainer([cb], max_epochs=1).fit(TinyLM(), token_loader())


def test_masks_before_fitting():
    with pytest.raises(RuntimeError, match=r"masks exist once fitting has started \(SelfishSparsityCallback"):
        _ = SelfishSparsityCallback(sparsity=0.5).masks


# --------------------------------------------------------------------------------------------------------------
# what it sparsifies, and zeros at every step
# --------------------------------------------------------------------------------------------------------------


def test_default_selection_counts_and_zeros():
    cb = SelfishSparsityCallback(sparsity=0.67, prune_rate=0.7, seed=0)
    model, checker, _ = fit_checked(cb)
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


def test_include_exclude():
    cb = SelfishSparsityCallback(sparsity=0.5, seed=0, include=["rnn.*"], exclude=["*_l1"])
    fit_checked(cb, max_epochs=1)
    assert sorted(cb.masks) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]


class TiedLM(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(12, 12)
        self.encoder = torch.nn.Embedding(40, 12)
        self.decoder = torch.nn.Linear(12, 40)
        self.decoder.weight = self.encoder.weight


def test_tied_weights_are_one_tensor():
    cb = SelfishSparsityCallback(sparsity=0.5, seed=0)
    model, _, _ = fit_checked(cb, model=TiedLM(), max_epochs=2)
    assert "encoder.weight" in cb.masks and "decoder.weight" not in cb.masks
    assert model.decoder.weight is model.encoder.weight
    assert int(cb.masks["encoder.weight"].sum()) == 240


def test_er_init_and_gru():
    cb = SelfishSparsityCallback(sparsity=0.7, seed=0, init="er")
    model, _, _ = fit_checked(cb, model=TinyLM(rnn="gru"), max_epochs=2)
    total = sum(m.numel() for m in cb.masks.values())
    active = sum(int(m.sum()) for m in cb.masks.values())
    assert active == sum(round(0.3 * m.numel()) for m in cb.masks.values()) and active < total
    assert cb.masks["encoder.weight"].float().mean() != cb.masks["rnn.weight_hh_l0"].float().mean()
    assert "rnn.weight_hh_l0/z" in cb.engine.sparsity_report()


def test_per_gate_densities_drift_apart_jointly_and_stay_equal_per_gate():
    def gate_sparsity(cb):
        report = cb.engine.sparsity_report()
        return [report[f"rnn.weight_hh_l0/{g}"] for g in "ifgo"]

    joint = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.8, seed=0)
    fit_checked(joint, max_epochs=4)
    per_gate = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.8, seed=0, gate_redistribution=False)
    fit_checked(per_gate, max_epochs=4)
    assert max(gate_sparsity(joint)) - min(gate_sparsity(joint)) > 0.02
    assert gate_sparsity(per_gate) == [0.5] * 4


def test_gradient_accumulation_enforces_once_per_real_step(enforcement_calls):
    """Counts the library's own enforcement calls (a hook installed twice would enforce twice per step)."""
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0)
    _, _, trainer = fit_checked(cb, max_epochs=2, accumulate_grad_batches=4)
    assert len(enforcement_calls) == 4  # 8 batches / 4 per step, 2 epochs
    assert all(opt is trainer.optimizers[0] for opt in enforcement_calls)


def test_manual_optimization():
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0)
    _, checker, _ = fit_checked(cb, model=TinyLM(manual=True), max_epochs=2, gradient_clip_val=None)
    assert checker.steps == 16
    assert not torch.equal(checker.epoch_masks[0]["rnn.weight_hh_l0"], checker.epoch_masks[1]["rnn.weight_hh_l0"])


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_optimizer_state_is_masked(optimizer):
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0)
    model, _, trainer = fit_checked(cb, model=TinyLM(optimizer=optimizer), max_epochs=3)
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
    _, checker, _ = fit_checked(cb, model=TinyLM(optimizer=optimizer), max_epochs=2)
    assert not torch.equal(checker.epoch_masks[0]["rnn.weight_hh_l0"], checker.epoch_masks[1]["rnn.weight_hh_l0"])


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


def test_the_optimizer_is_released_when_the_fit_ends() -> None:
    """After ``fit`` the optimizer steps dense again (e.g. a dense fine-tuning afterwards): no re-zeroing left."""
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    model, trainer = fit_tiny(callback, max_epochs=1)
    optimizer = trainer.optimizers[0]
    weight = model.rnn.weight_hh_l0
    inactive = ~callback.masks["rnn.weight_hh_l0"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert (weight[inactive] != 0).all()


# --------------------------------------------------------------------------------------------------------------
# the update cadence
# --------------------------------------------------------------------------------------------------------------


def test_update_every_steps_and_schedule():
    cb = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.5, seed=0, update_every=5)
    updates = []
    original = cb._update
    cb._update = lambda trainer, amount: (
        updates.append((trainer.global_step, cb.current_prune_rate(trainer.global_step))),
        original(trainer, amount),
    )
    fit_checked(cb, max_epochs=2)
    assert [s for s, _ in updates] == [5, 10, 15]
    rates = [r for _, r in updates]
    assert rates == sorted(rates, reverse=True) and rates[0] < 0.5
    total = 16
    assert rates[0] == pytest.approx(0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * 5 / total)) / 2)


@pytest.mark.parametrize("every,expected", [(1, list(range(1, 8))), (3, [3, 6])])
def test_step_updates_happen_once_per_optimizer_step_under_accumulation(every: int, expected: list[int]) -> None:
    """8 batches per epoch, 2 accumulated per step, 2 epochs: 8 optimizer steps; never at step 0, never twice, never
    on the last step (a weight grown there would end the run at zero)."""
    callback = SelfishSparsityCallback(sparsity=0.6, update_every=every, seed=0)
    topology = Topology(callback)
    fit_tiny(callback, topology, accumulate_grad_batches=2)
    assert topology.update_steps == expected
    assert callback.num_updates == len(expected)


def test_the_callback_reports_the_cadence_the_run_uses() -> None:
    """RigL's preset updates every 100 steps; a 300-step run gets the largest cadence that gives it 10 updates
    before 0.75 of the run (22: updates at 22, 44, ..., 220). The callback, its config and the run agree on it."""
    callback = SelfishSparsityCallback(sparsity=0.5, method="rigl", seed=0, total_steps=300)
    topology = Topology(callback)
    fit_tiny(callback, topology, max_epochs=-1, max_steps=23)
    assert topology.update_steps == [22]
    assert callback.update_every == 22 and callback.config.update_every == 22
    assert callback.config is callback.controller.config
    assert callback.dense_gradient_every == 22  # (what FlopsCallback books: RigL's dense gradient before an update)


def test_seed_and_run_length_have_one_meaning() -> None:
    """``seed`` is the seed of the run's draws (given, or drawn on rank 0 at fit start); ``total_steps`` the run's
    length in optimizer steps (given, or read at train start): the callback and its controller say the same."""
    callback = SelfishSparsityCallback(sparsity=0.5)
    assert callback.seed is None and callback.total_steps == 0
    fit_tiny(callback, max_epochs=2)
    assert isinstance(callback.seed, int) and callback.seed == callback.controller.seed
    assert callback.seed == callback.state_dict()["seed"]
    assert callback.total_steps == callback.controller.total_steps == 16  # 8 batches per epoch, 2 epochs
    given = SelfishSparsityCallback(sparsity=0.5, seed=3, total_steps=7)
    assert (given.seed, given.total_steps) == (3, 7) == (given.controller.seed, given.controller.total_steps)
    with pytest.raises(AttributeError):
        given.seed = 4


def test_skip_next_update():
    cb = SelfishSparsityCallback(sparsity=0.5, seed=0)

    class SkipAfterFirstEpoch(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                cb.skip_next_update()

    _, checker, _ = fit_checked(cb, max_epochs=3, extra=[SkipAfterFirstEpoch()])
    masks = checker.epoch_masks
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])  # skipped at the start of epoch 1
    assert not torch.equal(masks[1]["rnn.weight_hh_l0"], masks[2]["rnn.weight_hh_l0"])
    assert cb.num_updates == 1


# --------------------------------------------------------------------------------------------------------------
# the run's length
# --------------------------------------------------------------------------------------------------------------


RUN_LENGTH = (
    "SelfishSparsityCallback anneals the prune rate over the whole run, which needs a finite length in optimizer "
    "steps: {cause} (estimated_stepping_batches={total}, max_epochs={epochs}, max_steps={steps}). Give "
    "SelfishSparsityCallback(total_steps=...), or set Trainer(max_steps=...), or use a sized train dataloader with "
    "Trainer(max_epochs=...)"
)


def test_a_run_without_a_length_is_refused_with_its_cause() -> None:
    with pytest.raises(ValueError) as endless:
        fit_tiny(SelfishSparsityCallback(sparsity=0.5), max_epochs=-1)
    cause = "max_epochs=-1 without max_steps trains for ever"
    assert str(endless.value) == RUN_LENGTH.format(cause=cause, total="inf", epochs=-1, steps=-1)
    with pytest.raises(ValueError) as empty:
        fit_tiny(SelfishSparsityCallback(sparsity=0.5), max_steps=0, max_epochs=2)
    cause = "max_epochs=2, max_steps=0 trains no step"
    assert str(empty.value) == RUN_LENGTH.format(cause=cause, total=0, epochs=2, steps=0)
    with pytest.raises(ValueError) as no_epoch:
        fit_tiny(SelfishSparsityCallback(sparsity=0.5), max_epochs=0)
    cause = "max_epochs=0, max_steps=-1 trains no step"
    assert str(no_epoch.value) == RUN_LENGTH.format(cause=cause, total=0, epochs=0, steps=-1)
    with pytest.raises(ValueError) as unsized:
        fit_tiny(SelfishSparsityCallback(sparsity=0.5), loader=unsized_loader(), max_epochs=2)
    cause = (
        "the train dataloader has no length (an IterableDataset without __len__), so Lightning cannot count the "
        "steps of an epoch"
    )
    assert str(unsized.value) == RUN_LENGTH.format(cause=cause, total=-1, epochs=2, steps=-1)


class StepSpy(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_unsized_loader_with_max_epochs_fails_before_the_first_step() -> None:
    cb, spy = SelfishSparsityCallback(sparsity=0.5), StepSpy()
    trainer = make_trainer([cb, spy], max_epochs=2)
    assert trainer.max_steps == -1  # what Lightning then returns as estimated_stepping_batches
    with pytest.raises(
        ValueError, match=r"needs a finite length.*no length.*estimated_stepping_batches=-1.*total_steps"
    ):
        trainer.fit(TinyLM(), unsized_loader())
    assert spy.steps == 0


def test_unsized_loader_with_total_steps_follows_the_cosine() -> None:
    # 8 windows per epoch, 2 epochs: the measurement was 0.5000 at step 8 of 16 where the cosine gives 0.2525
    rates: list[float] = []

    class Rates(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            rates.append(cb.current_prune_rate(trainer.global_step))

    cb = SelfishSparsityCallback(sparsity=0.5, total_steps=16, update_every=8, seed=0)
    trainer = make_trainer([cb, Rates()], max_epochs=2)
    trainer.fit(TinyLM(), unsized_loader())
    assert trainer.global_step == 16 and cb.num_updates == 1  # at step 8 (never on the last step)
    assert rates[7] == pytest.approx(0.2525, abs=1e-4)  # at step 8
    assert rates[-1] == pytest.approx(0.005)


def test_total_steps_given_as_a_callable_is_asked_at_fit_start() -> None:
    # fn(trainer) -> int | None: an int is the run's length, None falls back to the trainer's estimate
    asked: list[int] = []

    def length(trainer) -> int:
        asked.append(trainer.max_epochs)
        return 16

    cb = SelfishSparsityCallback(sparsity=0.5, total_steps=length, update_every=8, seed=0)
    make_trainer([cb], max_epochs=2).fit(TinyLM(), unsized_loader())
    assert asked == [2] and cb.controller.total_steps == 16
    sized = SelfishSparsityCallback(sparsity=0.5, total_steps=lambda trainer: None, seed=0)
    trainer = make_trainer([sized], max_epochs=1, limit_train_batches=3)
    trainer.fit(TinyLM(), token_loader())
    assert sized.controller.total_steps == 3 == trainer.estimated_stepping_batches
    for wrong, error in ((0, ValueError), (2.5, TypeError)):
        refused = SelfishSparsityCallback(sparsity=0.5, total_steps=lambda trainer, wrong=wrong: wrong, seed=0)
        with pytest.raises(error, match=f"total_steps\\(trainer\\) must return a positive int or None, got {wrong}"):
            make_trainer([refused], max_epochs=1, limit_train_batches=3).fit(TinyLM(), token_loader())


def test_unsized_loader_with_max_steps_is_a_known_length() -> None:
    cb = SelfishSparsityCallback(sparsity=0.5, update_every=4, seed=0)
    trainer = make_trainer([cb], max_epochs=-1, max_steps=12)
    trainer.fit(TinyLM(), unsized_loader())
    assert cb.controller.total_steps == 12 and trainer.global_step == 12


# --------------------------------------------------------------------------------------------------------------
# the seed and the ranks
# --------------------------------------------------------------------------------------------------------------


def test_a_drawn_seed_is_reproducible_recorded_and_reproduces_the_masks() -> None:
    first, second = SelfishSparsityCallback(sparsity=0.6), SelfishSparsityCallback(sparsity=0.6)
    model_a, _ = fit_tiny(first)
    fit_tiny(second)  # the same global seed draws the same seed
    seed = first.state_dict()["seed"]
    assert isinstance(seed, int) and seed == second.state_dict()["seed"]
    assert 0 <= seed < 2**62 and seed.bit_length() > 32  # a 62-bit draw is below 2**32 with probability 2**-30
    explicit = SelfishSparsityCallback(sparsity=0.6, seed=seed)
    model_b, _ = fit_tiny(explicit)
    assert_same(snapshot(model_a, first), snapshot(model_b, explicit))
    other = SelfishSparsityCallback(sparsity=0.6)
    pl.seed_everything(1, verbose=False)
    make_trainer([other], max_epochs=1).fit(TinyLM(), token_loader())
    assert other.state_dict()["seed"] != seed


class RankOne(SingleDeviceStrategy):
    """Rank 1 of a 2-process run as the callback sees it: rank 0's broadcast delivers ``RANK_ZERO_SEED``."""

    RANK_ZERO_SEED = 2**61 + 12345

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self.global_rank = 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.RANK_ZERO_SEED if src == 0 else obj


def test_a_non_zero_rank_takes_rank_zeros_seed_and_logs_nothing() -> None:
    callback, logger = SelfishSparsityCallback(sparsity=0.6), RecordingLogger()
    fit_tiny(callback, strategy=RankOne(), logger=logger, max_epochs=2)
    assert callback.state_dict()["seed"] == RankOne.RANK_ZERO_SEED
    reference = SelfishSparsityCallback(sparsity=0.6, seed=RankOne.RANK_ZERO_SEED)
    fit_tiny(reference, max_epochs=2)
    for name, mask in reference.masks.items():
        assert torch.equal(mask, callback.masks[name]), name
    assert not any(key.startswith(("sparsity/", "topology/")) for _, metrics in logger.records for key in metrics)


# --------------------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------------------


def test_infinite_run_and_sharded_strategy_are_rejected():
    with pytest.raises(ValueError, match="needs a finite length"):
        make_trainer([SelfishSparsityCallback(sparsity=0.5)], max_epochs=-1).fit(TinyLM(), token_loader())
    from pytorch_lightning.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="supports the single-device and DDP strategies.*FSDPStrategy.*use Model"):
        cb = SelfishSparsityCallback(sparsity=0.5)
        trainer = make_trainer([cb], max_epochs=1)
        trainer.strategy._accelerator = trainer.strategy.accelerator
        cb.setup(type("T", (), {"strategy": FSDPStrategy.__new__(FSDPStrategy), "callbacks": [cb]})(), None, "fit")
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `SelfishSparsityCallback`"):
        make_trainer([SelfishSparsityCallback(sparsity=0.5), SelfishSparsityCallback(sparsity=0.4)]).fit(
            TinyLM(), token_loader()
        )


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_deepspeed_is_refused_although_it_is_a_ddp_strategy(package: str) -> None:
    """Lightning's DeepSpeedStrategy derives from DDPStrategy; it is recognised by class, under either package."""
    deepspeed = importlib.import_module(f"{package}.strategies").DeepSpeedStrategy
    assert issubclass(deepspeed, importlib.import_module(f"{package}.strategies").DDPStrategy)
    strategy = deepspeed.__new__(deepspeed)
    with pytest.raises(ValueError) as error:
        _check_strategy(SimpleNamespace(strategy=strategy))
    assert str(error.value) == (
        "SelfishSparsityCallback supports the single-device and DDP strategies ('auto', 'ddp', 'ddp_spawn', ...) "
        "and, for parameters sharded across devices, ModelParallelStrategy (FSDP2: fully_shard in configure_model); "
        f"got {deepspeed.__module__}.DeepSpeedStrategy. FSDPStrategy (FSDP1) and DeepSpeedStrategy flatten "
        "parameters into buffers whose slices do not follow the weights' rows: use ModelParallelStrategy"
    )


def test_lightning_classes_are_found_under_both_packages() -> None:
    """The one compat function: each package's own class (they are distinct), and none for a name it lacks."""
    import lightning.pytorch.callbacks
    import pytorch_lightning.callbacks

    found = lightning_classes("callbacks", "ModelPruning", "NoSuchCallback")
    assert found == (pytorch_lightning.callbacks.ModelPruning, lightning.pytorch.callbacks.ModelPruning)
    assert found[0] is not found[1]


# --------------------------------------------------------------------------------------------------------------
# what it logs and says, what monitors are handed
# --------------------------------------------------------------------------------------------------------------


def test_tensorboard_tags(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = SelfishSparsityCallback(sparsity=0.67, seed=0)
    fit_checked(cb, max_epochs=3, logger=TensorBoardLogger(tmp_path, name="tb"))
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


def test_sparsity_is_logged_at_fit_start_and_at_each_update_step() -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, update_every=3, min_prune_rate=0.05, seed=0)
    logger = RecordingLogger()
    fit_tiny(callback, logger=logger)
    steps = [step for step, _ in logger.steps_of("sparsity/overall")]
    assert steps == [0, 3, 6, 9, 12, 15]
    assert [step for step, _ in logger.steps_of("topology/prune_rate")] == [3, 6, 9, 12, 15]
    for step, rate in logger.steps_of("topology/prune_rate"):  # the cosine from 0.5 to 0.05 over 16 steps
        assert rate == pytest.approx(0.05 + (0.5 - 0.05) / 2 * (1 + math.cos(math.pi * step / 16))), step
        assert callback.current_prune_rate(step) == pytest.approx(rate)
    assert callback.current_prune_rate(16) == pytest.approx(0.05)


def test_gmp_logs_its_target_sparsity_on_the_cubic() -> None:
    callback, logger = SelfishSparsityCallback(sparsity=0.6, method="gmp", update_every=2, seed=0), RecordingLogger()
    fit_tiny(callback, logger=logger, max_epochs=3)  # 24 steps; pruning from step 0 to 0.75 * 24 = 18
    targets = logger.steps_of("topology/target_sparsity")
    assert [step for step, _ in targets] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    for step, target in targets:
        assert target == pytest.approx(0.6 * (1 - (1 - step / 18) ** 3)), step
        assert callback.scheduled_sparsity(step) == pytest.approx(target)
    assert callback.scheduled_sparsity(0) == 0.0 and callback.scheduled_sparsity(24) == pytest.approx(0.6)


def test_dsr_adapts_its_threshold_and_checkpoints_the_adapted_one() -> None:
    callback, logger = SelfishSparsityCallback(sparsity=0.6, method="dsr", threshold=1e-4, seed=0), RecordingLogger()
    fit_tiny(callback, logger=logger, max_epochs=3)
    thresholds = [value for _, value in logger.steps_of("topology/threshold")]
    assert thresholds == [2e-4, 4e-4]  # far too low a start: hardly any weight falls below it, doubled each time
    assert callback.state_dict()["threshold"] == thresholds[-1]
    # a tolerance of 100 % never doubles (fewer than 0 removals cannot happen)
    tolerant = SelfishSparsityCallback(sparsity=0.6, method="dsr", threshold=1e-4, threshold_tolerance=1.0, seed=0)
    logger = RecordingLogger()
    fit_tiny(tolerant, logger=logger, max_epochs=3)
    assert [value for _, value in logger.steps_of("topology/threshold")] == [1e-4, 1e-4]


def test_updates_are_quiet_unless_verbose_and_a_skipped_update_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []  # what the callback tells the user (rank_zero_info: Lightning's logger does not propagate)
    monkeypatch.setattr(lightning_selfish.callbacks.sparsity, "rank_zero_info", said.append)
    fit_tiny(SelfishSparsityCallback(sparsity=0.6, seed=0))
    assert said == []

    class SkipTheFirst(Callback):
        def on_fit_start(self, trainer, pl_module):
            callback.skip_next_update()

    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    fit_tiny(callback, SkipTheFirst(), max_epochs=3)  # (after the callback's own fit start, which resets the schedule)
    assert said == ["SelfishSparsityCallback: topology update skipped at step 8"]
    assert callback.num_updates == 1 and callback.state_dict()["skip_next_update"] is False


def test_verbose_summary_per_tensor_and_gate(monkeypatch):
    said: list[str] = []  # (rank_zero_info: Lightning's logger does not propagate to caplog)
    monkeypatch.setattr(lightning_selfish.callbacks.sparsity, "rank_zero_info", said.append)
    sparsity = SelfishSparsityCallback(sparsity=0.5, seed=0, verbose=True, update_every=4)
    pl.seed_everything(0, verbose=False)
    make_trainer([sparsity], max_epochs=1).fit(TinyLM(), token_loader(), token_loader(1, 2))
    summaries = [text for text in said if text.startswith("topology update")]
    assert len(summaries) == 1  # at step 4 of 8 (never on the last step)
    lines = summaries[0].split("\n")
    header = re.fullmatch(
        r"topology update 1: prune rate (0\.\d{4}), removed (\d+), grown (\d+), overall sparsity (0\.\d{4})", lines[0]
    )
    assert header and header[2] == header[3] and float(header[4]) == pytest.approx(0.5, abs=1e-3)
    assert len(lines) == 1 + len(sparsity.masks)
    by_name = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert re.fullmatch(
        r"  rnn.weight_hh_l0: sparsity 0\.\d{4}, changed 0\.\d{3} "
        r"\| gates: i 0\.\d{3}, f 0\.\d{3}, g 0\.\d{3}, o 0\.\d{3}",
        by_name["rnn.weight_hh_l0"],
    )
    assert re.fullmatch(r"  decoder.weight: sparsity 0\.5000, changed 0\.\d{3}", by_name["decoder.weight"])


def test_monitors_are_handed_the_lightning_module() -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    topology = Topology(callback)
    model, _ = fit_tiny(callback, topology)
    assert [call["update"] for call in topology.calls] == [False, True]
    assert all(call["module"] is model for call in topology.calls)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_model_parallel_with_tensor_parallelism_is_refused_naming_the_fix(package: str) -> None:
    """ModelParallelStrategy is accepted for data parallelism only; its default tensor_parallel_size="auto" makes
    every device tensor parallel, which splits weights by columns. Read from the strategy's public mesh."""
    strategies = importlib.import_module(f"{package}.strategies")
    model_parallel = strategies.ModelParallelStrategy

    def strategy(tensor_parallel: int):
        """A ModelParallelStrategy whose mesh (set up before the callbacks' setup) has this tensor-parallel size."""
        mesh = {"tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel)}
        meshed = type("Meshed", (model_parallel,), {"device_mesh": mesh})
        return meshed.__new__(meshed)

    with pytest.raises(ValueError) as error:
        _check_strategy(SimpleNamespace(strategy=strategy(2)))
    assert "tensor_parallel_size=2 (the default 'auto' makes every device tensor parallel)" in str(error.value)
    assert "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)" in str(error.value)
    _check_strategy(SimpleNamespace(strategy=strategy(1)))  # data parallel only: accepted
