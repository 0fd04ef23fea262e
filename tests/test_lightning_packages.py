"""The library under both Lightning packages.

``pytorch_lightning`` and the unified ``lightning`` package (``lightning.pytorch``) are both installed by the dev
extra; the callback and the trigger subclass ``pytorch_lightning``'s ``Callback`` and must work unchanged with a
``lightning.pytorch.Trainer``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import VOCAB, token_loader
from torch import nn

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
    with pytest.raises(ValueError, match=rf"got {package}\.strategies\.fsdp\.FSDPStrategy\. FSDPStrategy \(FSDP1\)"):
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
