"""Two CPU processes (gloo) train the tiny LM with one method preset; each rank saves its masks per epoch.

Run by tests/test_methods_ddp.py as ``python methods_ddp.py OUT_DIR METHOD``. Before every update rank 1 perturbs
its weights and optimizer state, so that without synchronisation DSR's threshold removal and SNFS's momentum
redistribution would give it different counts, different masks and a different random stream than rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TinyLM, make_trainer, token_loader  # noqa: E402

from lightning_selfish import SelfishSparsityCallback  # noqa: E402


class Record(pl.Callback):
    def __init__(self, cb: SelfishSparsityCallback) -> None:
        self.cb = cb
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.history.append({n: m.clone() for n, m in self.cb.masks.items()})

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank != 1:
            return
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
            for state in trainer.optimizers[0].state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        value.mul_(1 + torch.rand_like(value))

    def on_fit_end(self, trainer, pl_module):
        self.history.append({n: m.clone() for n, m in self.cb.masks.items()})
        self.history.append(
            {
                "generator": self.cb.controller.generator.get_state(),
                "threshold": torch.tensor(self.cb.controller.threshold),
            }
        )
        torch.save(self.history, Path(sys.argv[1]) / f"masks_rank{trainer.global_rank}.pt")


def main() -> None:
    method = sys.argv[2]
    pl.seed_everything(0, verbose=False)
    cb = SelfishSparsityCallback(sparsity=0.6, method=method, prune_rate=0.6, seed=None, threshold=0.05)
    trainer = make_trainer([cb, Record(cb)], max_epochs=4, devices=2, strategy="ddp")
    trainer.fit(TinyLM(optimizer="momentum" if method == "snfs" else "sgd"), token_loader(windows=16))


if __name__ == "__main__":
    main()
