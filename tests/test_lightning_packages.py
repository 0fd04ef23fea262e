"""The library under both Lightning packages, and the run-length check of the prune-rate schedule.

``pytorch_lightning`` and the unified ``lightning`` package (``lightning.pytorch``) are both installed by the dev
extra; the callback and the trigger subclass ``pytorch_lightning``'s ``Callback`` and must work unchanged with a
``lightning.pytorch.Trainer``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import BATCH, VOCAB, TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_selfish import SNTASGD, NonMonotonicTrigger, SelfishSparsityCallback

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]
VAL_LOSSES = [5.0, 4.0, 6.0, 3.0, 3.0]  # NT-ASGD (nonmono=1) fires at the end of epoch 2: 6 > min([5])


def module_class(pl):
    """A tiny LSTM language model of the package ``pl`` that logs a scripted validation loss."""

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Embedding(VOCAB, 8)
            self.rnn = nn.LSTM(8, 8)
            self.decoder = nn.Linear(8, VOCAB)

        def training_step(self, batch, batch_idx):
            x, y = batch[0].t(), batch[1].t()
            out, _ = self.rnn(self.encoder(x))
            return nn.functional.cross_entropy(self.decoder(out).reshape(-1, VOCAB), y.reshape(-1))

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self) -> None:
            self.log("val_loss", torch.tensor(VAL_LOSSES[self.current_epoch]))

        def configure_optimizers(self):
            return SNTASGD(self.parameters(), lr=0.5)

    return Tiny


@pytest.mark.parametrize("package", PACKAGES)
def test_tiny_fit_under_each_package(package: str, tmp_path) -> None:
    pl = importlib.import_module(package)
    sparsity = SelfishSparsityCallback(sparsity=0.5, seed=0)
    trigger = NonMonotonicTrigger(monitor="val_loss", nonmono=1)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=len(VAL_LOSSES),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[sparsity, trigger, checkpoint],
    )
    model = module_class(pl)()
    trainer.fit(model, token_loader(), token_loader(1, 2))
    assert trainer.state.finished and trainer.global_step == 8 * len(VAL_LOSSES)
    params = dict(model.named_parameters())
    for name, mask in sparsity.masks.items():
        assert int(mask.sum()) == mask.numel() // 2
        assert (params[name][~mask] == 0).all()
    assert trigger.averaging_started_epoch == 2 and trigger.averaging
    assert sparsity.num_updates == len(VAL_LOSSES) - 1 - 1  # one update per finished epoch, one skipped
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "raw_state_dict" in saved  # averaged weights as the state dict, the raw ones beside them


def test_trainer_fn_compares_across_packages() -> None:
    from lightning.pytorch.trainer.states import TrainerFn as Unified
    from pytorch_lightning.trainer.states import TrainerFn as Classic

    assert Unified.FITTING == Classic.FITTING and not (Unified.TESTING != Classic.TESTING)  # noqa: SIM202 (__ne__)
    assert Unified.FITTING != Classic.VALIDATING


@pytest.mark.parametrize("package", PACKAGES)
def test_unsupported_strategy_names_itself(package: str) -> None:
    strategies = importlib.import_module(f"{package}.strategies")
    cb = SelfishSparsityCallback(sparsity=0.5)
    fsdp = strategies.FSDPStrategy.__new__(strategies.FSDPStrategy)
    trainer = type("T", (), {"strategy": fsdp, "callbacks": [cb]})()
    with pytest.raises(ValueError, match=rf"got {package}\.strategies\.fsdp\.FSDPStrategy: every rank must hold"):
        cb.setup(trainer, None, "fit")
    single = type(
        "T",
        (),
        {
            "strategy": strategies.SingleDeviceStrategy(torch.device("cpu")),
            "callbacks": [cb],
            "max_epochs": 1,
            "max_steps": -1,
        },
    )()
    cb.setup(single, None, "fit")  # accepted


# ---------------------------------------------------------------------------------------------- run length


class Unsized(IterableDataset):
    def __iter__(self):
        yield from token_loader().dataset


class StepSpy(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def unsized_loader() -> DataLoader:
    return DataLoader(Unsized(), batch_size=BATCH)


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
