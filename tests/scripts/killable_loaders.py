"""Runs killed by SIGKILL and resumed, for the train loaders of conftest's ``LOADER_KINDS``, under both Lightning
packages; tests/test_resume_loaders.py runs it.

``killable_loaders.py OUT``: for each case of ``CASES`` three runs, each in its own forked process (as three scripts
of a user's would be): the uninterrupted 3-epoch fit; the same fit killed by SIGKILL at the third batch of its third
epoch (no hook runs, nothing is flushed, so what is left is ``last.ckpt`` of the second epoch's end); and
``fit(ckpt_path=last.ckpt)`` in a new ``Trainer``. Saves ``OUT/results.pt``: per case the signal that ended the killed
run, and the windows trained and the final parameters of the uninterrupted and the resumed run.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch

# the tests (conftest) and the checkout under test, not whichever copy of the library is installed
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from conftest import BATCH, LOADER_KINDS, PACKAGES, dropout_lm, make_trainer, user_loader, windows  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_selfish import RandomStateCheckpoint, SelfishSparsityCallback  # noqa: E402

# (package, loader kind, with the sparsity callback): the shuffled loaders with and without it under both packages,
# the others with it under pytorch_lightning (tests/test_resume_loaders.py stops every case at an epoch end in-process)
CASES = [
    (package, kind, sparse)
    for package in PACKAGES
    for kind in LOADER_KINDS
    for sparse in (True, False)
    if kind.startswith("shuffle") or (sparse and package == PACKAGES[0])
]


def fit(package: str, kind: str, sparse: bool, out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    lightning = importlib.import_module(package)

    class KillMidEpoch(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    model = dropout_lm(package)
    callbacks = [*([SelfishSparsityCallback(sparsity=0.5, seed=1)] if sparse else []), RandomStateCheckpoint()]
    if mode == "killed":
        callbacks += [lightning.callbacks.ModelCheckpoint(dirpath=out, save_last=True), KillMidEpoch()]
    trainer = make_trainer(callbacks, 3, package=package, enable_checkpointing=mode == "killed")
    ckpt_path = out / "last.ckpt" if mode == "resumed" else None
    trainer.fit(model, user_loader(kind), DataLoader(windows(1, 2), BATCH), ckpt_path=ckpt_path)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"params": params, "trained": model.trained}, out / f"{mode}.pt")


def in_own_process(*args) -> int:
    """Run ``fit(*args)`` in a forked child; its exit status, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fit(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)  # no atexit handler, no flush of the parent's buffers
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main(out: Path) -> None:
    for package in PACKAGES:
        logging.getLogger(package).setLevel(logging.ERROR)
        warm = out / f"warm-up {package}"
        warm.mkdir()
        fit(package, LOADER_KINDS[0], True, warm, "straight")  # what a fit imports on first use, imported once, here
    results = {}
    for number, case in enumerate(CASES):
        folder = out / str(number)
        folder.mkdir()
        assert in_own_process(*case, folder, "straight") == 0, case
        killed = in_own_process(*case, folder, "killed")
        assert in_own_process(*case, folder, "resumed") == 0, case
        runs = {mode: torch.load(folder / f"{mode}.pt", weights_only=False) for mode in ("straight", "resumed")}
        results[case] = {"killed by": -killed, **runs}
    torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
