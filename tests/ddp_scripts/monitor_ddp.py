"""Two CPU processes (gloo) train the tiny LM with TopologyMonitor and MaskHistory; each rank saves its monitor state.

Run by tests/test_monitor_ddp.py as ``python monitor_ddp.py OUT_DIR``. Logging and mask files must come from rank
zero only; the monitor's exploration state must be the same on both ranks (it is part of every rank's checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]  # this checkout's library, and the tests' conftest
from conftest import TinyLM, make_trainer, token_loader  # noqa: E402

from lightning_selfish import MaskHistory, SelfishSparsityCallback, TopologyMonitor  # noqa: E402


class Save(pl.Callback):
    def __init__(self, monitor: TopologyMonitor) -> None:
        self.monitor = monitor

    def on_fit_end(self, trainer, pl_module):
        torch.save(self.monitor.state_dict(), Path(sys.argv[1]) / f"monitor_rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(0, verbose=False)
    monitor = TopologyMonitor()
    callbacks = [
        SelfishSparsityCallback(sparsity=0.6, prune_rate=0.7, seed=None),
        monitor,
        MaskHistory(),
        Save(monitor),
    ]
    trainer = make_trainer(
        callbacks, max_epochs=3, devices=2, strategy="ddp", logger=TensorBoardLogger(out, name="ddp")
    )
    trainer.fit(TinyLM(), token_loader(windows=16), token_loader(1, 4))


if __name__ == "__main__":
    main()
