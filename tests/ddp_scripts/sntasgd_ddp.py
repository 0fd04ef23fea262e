"""2-process DDP (gloo, CPU) run of SNT-ASGD with the sparsity callback; each rank saves what it ended with.

Run by tests/test_trigger.py as ``python sntasgd_ddp.py OUT_DIR``; Lightning starts the second rank by running this
script again. The ranks log *different* scripted validation values (rank 1's would never trigger), so identical
averages also show that the trigger takes one decision for all ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

# the tests (conftest) and the checkout under test, not whichever copy of the library is installed
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from conftest import TinyLM, make_trainer, pattern_loader  # noqa: E402

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback  # noqa: E402
from lightning_selfish.callbacks.trigger import NonMonotonicTrigger  # noqa: E402
from lightning_selfish.optim.sntasgd import SNTASGD  # noqa: E402

SCRIPTED = {0: [2.0, 3.0, 4.0, 4.0, 4.0], 1: [2.0, 1.0, 0.5, 0.2, 0.1]}


class DDPLM(TinyLM):
    def on_validation_epoch_end(self) -> None:
        self.log("val_score", SCRIPTED[self.global_rank][self.current_epoch], rank_zero_only=False)

    def configure_optimizers(self):
        return SNTASGD(self.parameters(), lr=2.0, weight_decay=1.2e-6)


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    sparsity = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0)
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    trainer = make_trainer(
        [sparsity, trigger], max_epochs=5, devices=2, strategy="ddp", limit_train_batches=2, gradient_clip_val=None
    )
    model = DDPLM()
    trainer.fit(model, pattern_loader(0), pattern_loader(1, windows=2))
    opt = trainer.optimizers[0]
    params = list(model.parameters())
    torch.save(
        {
            "averaging_started_epoch": trigger.averaging_started_epoch,
            "history": trigger.history,
            "params": [p.detach().clone() for p in params],
            "averages": [a.clone() for a in opt.averaged_parameters()],
            "ages": [opt.state[p]["age"].clone() for p in params if "age" in opt.state[p]],
            "masks": [m.clone() for m in sparsity.masks.values()],
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
