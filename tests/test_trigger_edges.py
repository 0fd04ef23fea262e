"""NonMonotonicTrigger's edges that mutation testing (docs/testing.md) found unpinned: defaults, validation outside
fit, tied weights in checkpoints, restarts without averaging, state round trips, logs and messages."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from conftest import AvgLM, pattern_loader, run
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_selfish import NonMonotonicTrigger
from lightning_selfish.trigger import RAW_STATE_DICT_KEY


def test_defaults_and_state_before_fitting():
    trigger = NonMonotonicTrigger()
    assert (trigger.monitor, trigger.nonmono, trigger.restart_at_epochs) == ("val_loss", 5, [])
    assert trigger.averaging is False
    assert NonMonotonicTrigger(restart_at_epochs=[1, 1]).restart_at_epochs == [1]  # epoch 1 is allowed


def test_state_dict_round_trip_and_older_checkpoints():
    trigger = NonMonotonicTrigger()
    trigger.load_state_dict({"history": [3, 2.5], "averaging_started_epoch": 2, "restarted_at_epochs": [4]})
    assert trigger.state_dict() == {"history": [3.0, 2.5], "averaging_started_epoch": 2, "restarted_at_epochs": [4]}
    trigger.load_state_dict({"history": [1.0], "averaging_started_epoch": None})  # saved before restarts existed
    assert trigger.restarted_at_epochs == []


def test_messages_in_full():
    prefix = re.escape("NonMonotonicTrigger: restart_at_epochs must be a list of epoch numbers >= 1 (completed epochs)")
    for bad, error in (("5", TypeError), ([0], ValueError)):
        with pytest.raises(error, match=f"^{prefix}, got {re.escape(repr(bad))}$"):
            NonMonotonicTrigger(restart_at_epochs=bad)

    class TwoOptimizers(AvgLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0), torch.optim.Adam(self.parameters())

    with pytest.raises(TypeError, match=re.escape("from configure_optimizers), found: SGD, Adam")):
        run(TwoOptimizers(), [NonMonotonicTrigger()], 1, gradient_clip_val=None)

    with pytest.raises(ValueError, match=re.escape("in validation_step or on_validation_epoch_end, or pass the right")):
        run(AvgLM(), [NonMonotonicTrigger(monitor="val_los")], 1)


def test_validate_outside_fit_neither_swaps_nor_decides():
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    model = AvgLM(lr=2.0, scripted=[2, 3, 4, 4, 4])
    trainer = run(model, [trigger], 4, limit_train_batches=2)
    assert trigger.averaging_started_epoch == 2
    raw = [p.detach().clone() for p in model.parameters()]
    seen = []

    def record(*args, **kwargs):
        seen.append([p.detach().clone() for p in model.parameters()])

    model.on_validation_epoch_start = record
    trainer.validate(model, pattern_loader(1, windows=2), verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], raw))  # the raw weights: no swap outside fit

    fresh = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    fresh_model = AvgLM(scripted=[1.0] * 5)
    fresh_trainer = run(fresh_model, [fresh], 2, limit_train_batches=1)
    history = list(fresh.history)
    fresh_model.scripted = [9.0] * 5
    fresh_trainer.validate(fresh_model, pattern_loader(1, windows=2), verbose=False)
    assert fresh.history == history and not fresh_trainer.optimizers[0].averaging  # validate() decides nothing


def test_restart_epochs_do_nothing_before_averaging():
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1, restart_at_epochs=[2])
    run(AvgLM(scripted=[3, 2, 1, 0.5]), [trigger], 4, limit_train_batches=1)
    assert trigger.averaging_started_epoch is None and trigger.restarted_at_epochs == []
    assert trigger.history == [3, 2, 1, 0.5]  # not cleared

    restarting = NonMonotonicTrigger(monitor="val_score", nonmono=1, restart_at_epochs=[3])
    run(AvgLM(scripted=[2, 3, 4, 4]), [restarting], 4, limit_train_batches=1)
    assert restarting.restarted_at_epochs == [3]


def test_start_is_logged_at_its_step(tmp_path: Path):
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    run(
        AvgLM(scripted=[2, 3, 4, 1]),
        [trigger],
        4,
        logger=CSVLogger(tmp_path, name="", version=""),
        limit_train_batches=2,
    )
    (metrics,) = tmp_path.rglob("metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("nt_asgd/averaging_started_epoch")]
    assert [(float(r["nt_asgd/averaging_started_epoch"]), int(r["step"])) for r in rows] == [(2.0, 6)]


class TiedAvgLM(AvgLM):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rnn = torch.nn.LSTM(12, 12, num_layers=2)
        self.decoder = torch.nn.Linear(12, self.encoder.num_embeddings)
        self.decoder.weight = self.encoder.weight


def test_checkpoints_hold_averages_only_once_averaging_and_under_every_tied_name(tmp_path: Path):
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = TiedAvgLM(lr=2.0, scripted=[2, 3, 4, 4])
    trainer = run(model, [trigger, ckpt], 4, enable_checkpointing=True, limit_train_batches=2)
    before = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    assert RAW_STATE_DICT_KEY not in before  # nothing averaged yet: the plain state dict
    last = torch.load(tmp_path / "epoch=3.ckpt", weights_only=False)
    state, raw = last["state_dict"], last[RAW_STATE_DICT_KEY]
    average = trainer.optimizers[0].state[model.encoder.weight]["ax"]
    assert torch.equal(state["encoder.weight"], average) and torch.equal(state["decoder.weight"], average)
    assert torch.equal(raw["decoder.weight"], model.encoder.weight.detach())
