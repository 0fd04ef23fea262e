"""``RandomStateCheckpoint``: a resumed fit draws what the uninterrupted one drew (issue 15.7).

Lightning restores the model, the optimizers and the loops from a checkpoint, but not the global random generators:
with dropout, a run resumed from a checkpoint drew other masks than the run that wrote it, and ended with other
weights. The reference here is the uninterrupted run itself, compared with ``torch.equal``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import BATCH, STEPS, VOCAB, WINDOWS, TinyLM, make_trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_selfish import RandomStateCheckpoint, SelfishSparsityCallback
from lightning_selfish.callbacks.random_state import capture_random_state, restore_random_state


class DropoutLM(TinyLM):
    """TinyLM with dropout 0.5 on the embeddings: every training step draws from torch's global generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.hidden = self.rnn(nn.functional.dropout(self.encoder(x), 0.5, self.training), self.hidden)
        return self.decoder(out)


def loader(seed: int = 0, windows: int = WINDOWS) -> DataLoader:
    """Like conftest's token_loader, with its own generator: starting an epoch's iterator draws nothing global."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (windows * BATCH, STEPS + 1), generator=g)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return DataLoader(data, batch_size=BATCH, shuffle=False, generator=torch.Generator())


class Crash(Exception):
    pass


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash


class Draws(Callback):
    """At every training batch, one draw from each global generator (after the states are restored)."""

    def __init__(self) -> None:
        self.draws: list[tuple[float, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))


def fit(tmp_path: Path, with_states: bool, extra=(), ckpt_path=None) -> tuple[DropoutLM, Draws]:
    pl.seed_everything(0, verbose=False)
    model, draws = DropoutLM(), Draws()
    states = [RandomStateCheckpoint()] if with_states else []
    callbacks = [SelfishSparsityCallback(sparsity=0.5, seed=1), *states, draws, *extra]
    checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in extra)
    trainer = make_trainer(callbacks, max_epochs=4, enable_checkpointing=checkpointing)
    trainer.fit(model, loader(), loader(1, 2), ckpt_path=ckpt_path)
    return model, draws


@pytest.mark.parametrize("with_states", [True, False], ids=["RandomStateCheckpoint", "without"])
def test_a_resumed_fit_with_dropout_ends_with_the_same_weights(tmp_path: Path, with_states: bool) -> None:
    straight, straight_draws = fit(tmp_path, with_states)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    with pytest.raises(Crash):
        fit(tmp_path, with_states, extra=[saver, CrashAtEpoch(2)])
    resumed, resumed_draws = fit(tmp_path, with_states, ckpt_path=tmp_path / "epoch=1.ckpt")
    same = [torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values())]
    if with_states:
        assert all(same)
        assert resumed_draws.draws == straight_draws.draws[-len(resumed_draws.draws) :]  # torch, Python, NumPy
        assert len(resumed_draws.draws) == 2 * WINDOWS
    else:  # the failure this callback removes: other dropout masks, other weights
        assert not all(same)


def test_states_round_trip_and_are_plain_for_weights_only_loading(tmp_path: Path) -> None:
    state = capture_random_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_random_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    callback = RandomStateCheckpoint()
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)  # how Lightning reads checkpoints
    callback.load_state_dict(loaded)
    assert len(loaded["ranks"]) == 1 and loaded["ranks"][0]["cuda"] is None


def test_a_bad_state_and_another_world_size() -> None:
    callback = RandomStateCheckpoint()
    with pytest.raises(ValueError, match=r"not a RandomStateCheckpoint state: expected \{'ranks': .*got keys \['x'\]"):
        callback.load_state_dict({"x": 1})
    callback.load_state_dict({"ranks": [capture_random_state(), capture_random_state()]})  # saved by 2 processes
    trainer, module = type("T", (), {"world_size": 1, "global_rank": 0})(), TinyLM()
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"holds the random states of 2 process\(es\), this run has 1; .* not"):
        callback.on_train_batch_start(trainer, module, None, 0)
    assert torch.equal(torch.get_rng_state(), before)
