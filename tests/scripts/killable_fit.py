"""A tiny sparse SNT-ASGD fit that tests/test_callback_resume.py runs three ways, each in its own process.

``killable_fit.py full OUT``: 6 epochs, saves the final state to ``OUT/final.pt``.
``killable_fit.py kill OUT``: the same run, killed by SIGKILL at the third batch of epoch 4 (no hook, no cleanup),
so what is left is ``OUT/last.ckpt`` from the end of epoch 3.
``killable_fit.py resume OUT CKPT``: resumes the run from ``CKPT`` and saves its final state to ``OUT/final.pt``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

# the tests (conftest) and the checkout under test, not whichever copy of the library is installed
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from conftest import AvgLM, make_trainer, pattern_loader  # noqa: E402

from lightning_selfish import NonMonotonicTrigger, SelfishSparsityCallback  # noqa: E402


class KillMidEpoch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 4 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, out: Path, ckpt_path: str | None) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    sparsity = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=1)
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    checkpoint = ModelCheckpoint(dirpath=out, save_last=True, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    callbacks = [sparsity, trigger, checkpoint] + ([KillMidEpoch()] if mode == "kill" else [])
    model = AvgLM(lr=2.0, scripted=[2, 3, 3, 3, 3, 3])
    trainer = make_trainer(callbacks, max_epochs=6, enable_checkpointing=True)
    trainer.fit(model, pattern_loader(0), pattern_loader(1, windows=2), ckpt_path=ckpt_path)
    torch.save(
        {
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "masks": {name: m.clone() for name, m in sparsity.masks.items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "averaging_started_epoch": trigger.averaging_started_epoch,
            "num_updates": sparsity.num_updates,
        },
        out / "final.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
