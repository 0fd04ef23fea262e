"""What users write that cannot do what it says: each is refused before any step with one line that names the
argument, what was given and what is allowed, or, where the run is valid but not what the user may expect, said in
one line (issue 25: a sparsity of 0, a run without a topology update, a time limit, tied weights, gate layouts).

Each test builds what a user would with the public API and a real ``Trainer`` (docs/callback.md, "On your own
training code").
"""

from __future__ import annotations

import importlib
import time
import warnings
from typing import Any

import pytest
from conftest import VOCAB, TinyLM, make_trainer, tiny_module_of, token_loader
from pytorch_lightning.callbacks import Callback
from torch import nn

import lightning_selfish.callbacks.sparsity
from lightning_selfish import METHODS, SelfishSparsityCallback


def fit(callback: SelfishSparsityCallback, *extra: Callback, model=None, max_epochs: int | None = 2, **kwargs):
    model = model or TinyLM()
    trainer = make_trainer([callback, *extra], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader(), token_loader(1, 2))
    return model, trainer


QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


# --------------------------------------------------------------------------------------------------------------
# sparsity 0
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_a_sparsity_of_zero_is_refused_at_construction_for_every_preset(method: str) -> None:
    """It trained ~38% of every matrix at zero after the first update (each update removes and regrows at zero)."""
    with pytest.raises(ValueError) as error:
        SelfishSparsityCallback(sparsity=0.0, method=method)
    message = str(error.value)
    assert message.startswith("sparsity must be in (0, 1), got 0.0: ")
    assert "leave SelfishSparsityCallback out of the trainer's callbacks" in message
    with pytest.raises(ValueError, match=r"^sparsity must be in \(0, 1\), got 0: "):
        SelfishSparsityCallback(sparsity=0, method=method)  # (an int too)


# --------------------------------------------------------------------------------------------------------------
# runs that make no topology update
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the callback tells the user in INFO lines (rank_zero_info: Lightning's logger does not propagate)."""
    lines: list[str] = []
    monkeypatch.setattr(lightning_selfish.callbacks.sparsity, "rank_zero_info", lines.append)
    return lines


@pytest.mark.parametrize("method", ["selfish", "set", "dsr", "snfs", "rigl"])
def test_a_step_cadence_the_user_chose_that_makes_no_update_is_refused_for_every_method(method: str) -> None:
    """``update_every=1000`` with ``max_steps=3``: it was refused for RigL only, the default method ran static."""
    with pytest.raises(ValueError) as error:
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0, method=method, update_every=1000), max_steps=3)
    fitting = 1 if method == "rigl" else 2  # (RigL's preset wants 10 updates: the most it can get; else one)
    assert str(error.value) == (
        f"method={method!r} with update_every=1000 makes no topology update in this run of 3 optimizer steps: give a "
        f"smaller update_every (e.g. update_every={fitting}) or train longer"
    )


def test_an_epoch_cadence_the_user_chose_in_a_one_epoch_run_is_refused() -> None:
    with pytest.raises(ValueError) as error:
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0, update_every="epoch"), max_epochs=1)
    assert str(error.value) == (
        "method='selfish' with update_every='epoch' makes no topology update in this run of 1 epoch (8 optimizer "
        "steps): the masks are updated between epochs, never after the last. Train 2 or more epochs, or give "
        "update_every as a number of optimizer steps (e.g. update_every=7)"
    )


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_the_presets_epoch_cadence_in_a_one_epoch_run_says_so_in_one_line(package: str, said: list[str]) -> None:
    """A 1-epoch run of the default method: static sparse training labelled Selfish-RNN, and nothing said."""
    lightning = importlib.import_module(package)
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0)
    trainer = lightning.Trainer(max_epochs=1, callbacks=[callback], **QUIET)
    trainer.fit(tiny_module_of(lightning), token_loader())
    assert callback.num_updates == 0
    assert said == [
        "method='selfish': the preset's update_every='epoch' makes no topology update in this run of 1 epoch (8 "
        "optimizer steps): the masks are updated between epochs, never after the last, so they stay as drawn. "
        "Train 2 or more epochs, or pass update_every as a number of optimizer steps (e.g. update_every=7)"
    ]


def test_a_run_with_epoch_updates_says_nothing(said: list[str]) -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0)
    fit(callback, max_epochs=2)
    assert callback.num_updates == 1 and said == []


@pytest.mark.parametrize(
    "trainer_kwargs,expected",
    [
        (
            dict(fast_dev_run=True),
            "method='rigl': the preset's update_every=100 makes no topology update in this run of 1 optimizer step, "
            "and no cadence would: a method that regrows never updates on the run's last step. The masks stay as "
            "drawn",
        ),
        (
            dict(max_steps=2),
            "method='rigl': the preset's update_every=100 would give this run of 2 optimizer steps no topology "
            "update; it updates every step instead (1 update; pass update_every=... to choose)",
        ),
        (
            dict(max_steps=60),
            "method='rigl': the preset's update_every=100 would give this run of 60 optimizer steps no topology "
            "update; it updates every 4 steps instead (11 updates; pass update_every=... to choose)",
        ),
    ],
    ids=["fast_dev_run", "two steps", "sixty steps"],
)
def test_the_short_run_line_is_true_and_grammatical(trainer_kwargs: dict, expected: str, said: list[str]) -> None:
    """It read "would give this run of 1 optimizer steps 0 topology updates; it updates every 1 steps instead (0
    updates ...)" under fast_dev_run."""
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, method="rigl")
    model = TinyLM()
    trainer = make_trainer([callback], max_epochs=10, **trainer_kwargs)
    trainer.fit(model, token_loader(), token_loader(1, 2))
    assert said == [expected]
    updates = int(expected.split("(")[1].split(" ")[0]) if "instead" in expected else 0
    assert callback.num_updates == updates


# --------------------------------------------------------------------------------------------------------------
# a time limit
# --------------------------------------------------------------------------------------------------------------


class Slow(Callback):
    """Makes every training batch take ``seconds`` (a model slower than its time limit)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_a_time_limit_alone_is_refused_naming_max_time(package: str) -> None:
    """``Trainer(max_time=...)`` alone: the refusal named ``max_epochs=-1``, which the user never wrote."""
    lightning = importlib.import_module(package)
    trainer = lightning.Trainer(
        callbacks=[SelfishSparsityCallback(sparsity=0.5, seed=0)], max_time="00:00:01:00", **QUIET
    )
    with pytest.raises(ValueError) as error:
        trainer.fit(tiny_module_of(lightning), token_loader())
    message = str(error.value)
    assert "max_time=0:01:00 without max_epochs or max_steps (Lightning then sets max_epochs=-1 and stops on time)" in (
        message
    )
    assert "Give SelfishSparsityCallback(total_steps=...)" in message


def test_a_time_limit_is_warned_about_at_fit_start_and_said_when_it_cut_the_schedule(said: list[str]) -> None:
    """``max_epochs=1000, max_time=...``: the cosine was planned over 8,000 steps and the run stopped after a few,
    silently (the prune rate never annealed)."""
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, update_every=2)
    with pytest.warns(UserWarning) as warned:
        _, trainer = fit(callback, Slow(0.15), max_epochs=1000, max_time={"seconds": 1})
    lines = [str(w.message) for w in warned if "max_time" in str(w.message)]
    assert lines == [
        "SelfishSparsityCallback: the trainer has a time limit (max_time, or a Timer callback: 0:00:01 left), which "
        "the schedule cannot foresee: it plans its prune rate over the 8000 optimizer steps of max_epochs=1000, "
        "max_steps=-1. A run the time limit stops earlier ends with its schedule unfinished (the prune rate not "
        "annealed, late updates regrowing weights at zero). Give SelfishSparsityCallback(total_steps=...) with "
        "the number of steps the time allows (or Trainer(max_steps=...))"
    ]
    step = trainer.global_step
    assert 2 <= step < 100
    rate = callback.current_prune_rate(step)
    assert said == [
        f"SelfishSparsityCallback: the run stopped at its time limit (max_time) after optimizer step {step} of the "
        f"schedule's 8000: the prune rate reached {rate:.3f}, not min_prune_rate=0.005, after "
        f"{callback.num_updates} topology updates. Give total_steps=... (or max_steps=...) that the time allows "
        "for a complete schedule"
    ]


def test_a_time_limit_with_total_steps_given_is_not_warned_about(said: list[str]) -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, update_every=2, total_steps=10)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _, trainer = fit(callback, max_epochs=2, max_time={"minutes": 5})
    assert not [w for w in warned if "SelfishSparsityCallback" in str(w.message)]
    assert trainer.global_step == 16 and said == []  # (not stopped on time: nothing to say)


# --------------------------------------------------------------------------------------------------------------
# tied weights, gate layouts
# --------------------------------------------------------------------------------------------------------------


class TiedLM(TinyLM):
    """A language model whose decoder is tied to its encoder (the AWD-LSTM habit): one tensor, two names;
    ``named_parameters()`` yields it once, as ``encoder.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(12, 12)
        self.encoder = nn.Embedding(VOCAB, 12)
        self.decoder = nn.Linear(12, VOCAB)
        self.decoder.weight = self.encoder.weight


def test_exclude_by_the_name_a_tied_weight_has_in_its_other_module() -> None:
    """``exclude=["decoder.weight"]`` said "matches no parameter" and listed the candidates without the alias."""
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, exclude=["decoder.weight"])
    model, _ = fit(callback, model=TiedLM(), max_epochs=1)
    assert sorted(callback.masks) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert not (model.decoder.weight == 0).any()  # the tied tensor trained dense


def test_include_by_the_name_a_tied_weight_has_in_its_other_module() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, include=["decoder.*"])
    model, _ = fit(callback, model=TiedLM(), max_epochs=1)
    assert sorted(callback.masks) == ["encoder.weight"]  # keyed by its name in named_parameters()
    assert int((model.decoder.weight != 0).sum()) == VOCAB * 12 // 2


def test_a_gate_layout_keyed_by_the_other_name_of_a_tied_weight_applies_to_it() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, gate_layouts={"decoder.weight": ["x", "y"]})
    fit(callback, model=TiedLM(), max_epochs=1)
    assert callback.engine.tensors["encoder.weight"].gates == [("x", slice(0, 20)), ("y", slice(20, 40))]


def test_a_gate_layout_named_twice_through_a_tied_weight_is_refused() -> None:
    layouts = {"encoder.weight": ["x", "y"], "decoder.weight": ["a", "b"]}
    with pytest.raises(ValueError) as error:
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0, gate_layouts=layouts), model=TiedLM(), max_epochs=1)
    assert str(error.value) == (
        "gate_layouts names one tensor twice: 'encoder.weight' and 'decoder.weight' are tied (one parameter); "
        "give one layout"
    )


def test_a_pattern_that_matches_nothing_lists_the_names_of_tied_weights() -> None:
    with pytest.raises(ValueError) as error:
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0, exclude=["head.weight"]), model=TiedLM(), max_epochs=1)
    assert str(error.value) == (
        "exclude pattern 'head.weight' matches no parameter with 2 or more dimensions; these are: "
        "['decoder.weight (tied to encoder.weight)', 'encoder.weight', 'rnn.weight_hh_l0', 'rnn.weight_ih_l0']"
    )


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(exclude=["decoder.*"]), "exclude pattern 'decoder.*' keeps it dense"),
        (dict(include=["rnn.*"]), "no include pattern matches it: include=['rnn.*']"),
    ],
    ids=["excluded", "not included"],
)
def test_a_gate_layout_of_a_parameter_that_is_not_sparsified_is_refused(kwargs: dict, reason: str) -> None:
    """It was ignored silently."""
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, gate_layouts={"decoder.weight": ["x", "y"]}, **kwargs)
    with pytest.raises(ValueError) as error:
        fit(callback, max_epochs=1)
    assert str(error.value) == (
        f"gate_layouts names 'decoder.weight', which is not sparsified ({reason}): a layout is only used for a "
        "sparsified tensor. Remove the entry, or sparsify the parameter"
    )


def test_a_gate_layout_of_a_one_dimensional_parameter_is_refused() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, gate_layouts={"rnn.bias_hh_l0": ["i", "f", "g", "o"]})
    with pytest.raises(ValueError) as error:
        fit(callback, max_epochs=1)
    assert str(error.value) == (
        "gate_layouts names 'rnn.bias_hh_l0', which is not sparsified (it has 1 dimension: only parameters with 2 or "
        "more are sparsified): a layout is only used for a sparsified tensor. Remove the entry, or sparsify the "
        "parameter"
    )
