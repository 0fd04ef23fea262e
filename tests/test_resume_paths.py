"""Resuming a fit with the sparsity callback keeps what Lightning itself restores: a user's stateful train loader
(one with ``state_dict``/``load_state_dict``, which Lightning checkpoints) goes on from its saved position.

The callback reads the run's length in ``on_train_start``, after Lightning has loaded the train dataloader and
restored its state; reading it in ``on_fit_start`` made Lightning load and iterate the loader before the restore,
so the saved state never reached it (Lightning issue #20550).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import BATCH, STEPS, VOCAB, WINDOWS, TinyLM, make_trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_selfish import RandomStateCheckpoint, SelfishSparsityCallback


class StatefulWindows:
    """A user's train loader: numbered token windows handed out from a position it saves and restores.

    Sized, so Lightning fetches no batch ahead and the saved position is exactly the windows trained.
    """

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (WINDOWS, BATCH, STEPS + 1), generator=g)
        self.windows = [(t[:, :-1], t[:, 1:], torch.tensor(i)) for i, t in enumerate(tokens)]
        self.position = 0
        self.loaded: list[dict] = []

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        if self.position == len(self.windows):  # the epoch before ended: this one starts from the first window
            self.position = 0
        while self.position < len(self.windows):
            self.position += 1
            yield self.windows[self.position - 1]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(dict(state))
        self.position = state["position"]


class WindowLM(TinyLM):
    """TinyLM that records which window every training step trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.trained: list[int] = []

    def training_step(self, batch, batch_idx):
        self.trained.append(int(batch[2]))
        return super().training_step(batch[:2], batch_idx)


class DropoutWindowLM(WindowLM):
    """WindowLM with dropout 0.3 on the embeddings, and no state carried from window to window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(nn.functional.dropout(self.encoder(x), 0.3, self.training))
        return self.decoder(out)


class Crash(Exception):
    """Stands for a killed process."""


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash


def fit(callbacks: list, loader: StatefulWindows, ckpt_path: Path | None = None, lm=WindowLM, **kwargs) -> WindowLM:
    pl.seed_everything(0, verbose=False)
    model = lm()
    make_trainer(callbacks, **{"max_epochs": 2, **kwargs}).fit(model, loader, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("sparse", [True, False], ids=["with the sparsity callback", "without"])
def test_a_users_stateful_loader_resumes_mid_epoch_at_its_saved_position(sparse: bool, tmp_path: Path) -> None:
    """8 windows per epoch, 2 epochs; a checkpoint after step 11 (3 windows into the second epoch), then the process
    dies. The resumed run trains windows 3..7 of the second epoch, as the uninterrupted run did."""

    def sparsity() -> list:
        return [SelfishSparsityCallback(sparsity=0.5, seed=1)] if sparse else []

    straight = fit(sparsity(), StatefulWindows())
    assert straight.trained == list(range(8)) * 2
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=11, save_top_k=-1, filename="{step}")
    with pytest.raises(Crash):
        fit([*sparsity(), saver, CrashAtStep(13)], StatefulWindows(), enable_checkpointing=True)
    path = tmp_path / "step=11.ckpt"
    assert torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"position": 3}
    ]

    loader = StatefulWindows()
    callbacks = sparsity()
    resumed = fit(callbacks, loader, ckpt_path=path)
    assert loader.loaded == [{"position": 3}], "the checkpoint's loader state reached the loader"
    assert resumed.trained == straight.trained[11:] == [3, 4, 5, 6, 7]
    if sparse:
        assert callbacks[0].controller.total_steps == 16  # the run's length, read after the restore


@pytest.mark.parametrize("sparse", [True, False], ids=["with the sparsity callback", "without"])
def test_with_dropout_a_stateful_loader_resumed_mid_epoch_ends_with_the_uninterrupted_weights(
    sparse: bool, tmp_path: Path
) -> None:
    """A checkpoint after step 11 (3 windows into the second epoch) with ``RandomStateCheckpoint``: the resumed run
    draws, from the next window on, the dropout masks the uninterrupted run drew (restored at the first batch, after
    the loader handed it out)."""

    def callbacks(*extra) -> list:
        return [*([SelfishSparsityCallback(sparsity=0.5, seed=1)] if sparse else []), RandomStateCheckpoint(), *extra]

    straight = fit(callbacks(), StatefulWindows(), lm=DropoutWindowLM)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=11, save_top_k=-1, filename="{step}")
    with pytest.raises(Crash):
        fit(callbacks(saver, CrashAtStep(13)), StatefulWindows(), lm=DropoutWindowLM, enable_checkpointing=True)
    resumed = fit(callbacks(), StatefulWindows(), ckpt_path=tmp_path / "step=11.ckpt", lm=DropoutWindowLM)
    assert resumed.trained == straight.trained[11:] == [3, 4, 5, 6, 7]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resumed_run_keeps_the_cadence_its_checkpoint_ran_with(tmp_path: Path) -> None:
    """RigL's 100-step default is scaled to a short run (every step for 16 steps). A resume that trains longer plans
    its length after the restore, and still goes on with the checkpoint's cadence, not the one 32 steps would get."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = SelfishSparsityCallback(sparsity=0.5, seed=1, method="rigl")
    fit([first, saver], StatefulWindows(), enable_checkpointing=True)
    assert first.controller.config.update_every == 1
    fresh = SelfishSparsityCallback(sparsity=0.5, seed=1, method="rigl")
    fit([fresh], StatefulWindows(), max_epochs=4)
    assert fresh.controller.config.update_every == 2  # what a fresh run of 32 steps gets
    resumed = SelfishSparsityCallback(sparsity=0.5, seed=1, method="rigl")
    fit([resumed], StatefulWindows(), ckpt_path=tmp_path / "epoch=1.ckpt", max_epochs=4)
    assert resumed.controller.total_steps == 32 and resumed.controller.config.update_every == 1
