"""Two CPU processes (gloo) train the tiny LM with SelfishSparsityCallback; each rank saves its masks per epoch.

Run by tests/test_ddp.py as ``python sparsity_ddp.py OUT_DIR``. Rank 1 perturbs its weights before every update so
that, without the rank-0 broadcast, magnitude removal would pick different weights on the two ranks. Each rank seeds
its global RNG differently (as independent processes would be) and the callback gets ``seed=None``, so its masks
agree only if the callback shares rank 0's seed. At the end every rank takes part in saving ``OUT_DIR/last.ckpt``,
whose ``RandomStateCheckpoint`` state holds the random state of each rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

# the tests (conftest) and the checkout under test, not whichever copy of the library is installed
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
from conftest import TinyLM, make_trainer, token_loader  # noqa: E402

from lightning_selfish import RandomStateCheckpoint, SelfishSparsityCallback  # noqa: E402
from lightning_selfish.callbacks.random_state import capture_random_state  # noqa: E402


class Record(pl.Callback):
    def __init__(self, cb: SelfishSparsityCallback) -> None:
        self.cb = cb
        self.history: list[dict[str, torch.Tensor]] = []
        self.global_seed = torch.initial_seed()

    def on_train_epoch_start(self, trainer, pl_module):
        self.history.append({n: m.clone() for n, m in self.cb.masks.items()})

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)

    def on_fit_end(self, trainer, pl_module):
        self.history.append({n: m.clone() for n, m in self.cb.masks.items()})
        random_state = capture_random_state()["torch"]  # what this rank's RandomStateCheckpoint saves next
        trainer.save_checkpoint(Path(sys.argv[1]) / "last.ckpt")  # every rank takes part; rank 0 writes
        torch.save(
            {"global_seed": self.global_seed, "history": self.history, "random_state": random_state},
            Path(sys.argv[1]) / f"masks_rank{trainer.global_rank}.pt",
        )


def main() -> None:
    # Lightning starts rank 1 by running this script again with LOCAL_RANK=1 in its environment.
    pl.seed_everything(100 + int(os.environ.get("LOCAL_RANK", "0")), verbose=False)
    cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.7, seed=None)
    trainer = make_trainer([cb, RandomStateCheckpoint(), Record(cb)], max_epochs=4, devices=2, strategy="ddp")
    trainer.fit(TinyLM(), token_loader(windows=16))


if __name__ == "__main__":
    main()
