"""Exact resumes for the train loaders users write (issue 25.1), with ``RandomStateCheckpoint`` and dropout.

The loaders (conftest's ``LOADER_KINDS``): in order, ``shuffle=True``, ``shuffle=True`` with the loader's own
``generator=``, a ``RandomSampler`` with its own generator, a seeded ``DistributedSampler``. Each is stopped at an
epoch end and resumed from ``last.ckpt`` by a new ``Trainer`` (or killed by SIGKILL in the middle of the next epoch,
in a subprocess), with and without the sparsity callback, under both Lightning packages. The reference is the
uninterrupted run: the windows trained in the same order and every parameter ``torch.equal`` after the same steps.

Before the fix every one of them differed: the random states were put back at the first training batch after the
resume, after the resumed run had started its data iterator and drawn the epoch's order from other states, and the
loader's and the sampler's own generators were not saved at all.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import BATCH, LOADER_KINDS, PACKAGES, Kill, dropout_lm, make_trainer, user_loader, windows
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from lightning_selfish import RandomStateCheckpoint, SelfishSparsityCallback

EPOCHS = 3  # of 4 batches; the stopped run ends after the second, the resumed one trains the third


def fit(package: str, kind: str, sparse: bool, max_epochs: int = EPOCHS, extra=(), ckpt_path=None, **loader_kwargs):
    """One run as a user's script makes it: seeded, a fresh model, ``RandomStateCheckpoint`` (after the sparsity
    callback when ``sparse``) and the ``extra`` callbacks, a validation loader without a generator."""
    pl.seed_everything(0, verbose=False)
    model = dropout_lm(package)
    callbacks = [*([SelfishSparsityCallback(sparsity=0.5, seed=1)] if sparse else []), RandomStateCheckpoint(), *extra]
    checkpointing = any(type(cb).__name__ == "ModelCheckpoint" for cb in extra)
    trainer = make_trainer(callbacks, max_epochs, package=package, enable_checkpointing=checkpointing)
    trainer.fit(model, user_loader(kind, **loader_kwargs), DataLoader(windows(1, 2), BATCH), ckpt_path=ckpt_path)
    return model


def last_checkpoint(package: str, tmp_path: Path):
    return importlib.import_module(package).callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)


def assert_resumed_exactly(straight, resumed, steps: int) -> None:
    """The resumed run trained the uninterrupted run's last ``steps`` windows, in its order, to the same weights."""
    assert len(resumed.trained) == steps
    assert resumed.trained == straight.trained[-steps:], "the resumed epoch reads other windows, or another order"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: max |diff| {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("kind", LOADER_KINDS)
def test_a_fit_stopped_at_an_epoch_end_resumes_bit_exact_in_a_new_trainer(
    kind: str, sparse: bool, package: str, tmp_path: Path
) -> None:
    straight = fit(package, kind, sparse)
    fit(package, kind, sparse, extra=[Kill(after_epoch=1), last_checkpoint(package, tmp_path)])  # stop after epoch 2
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1
    resumed = fit(package, kind, sparse, ckpt_path=tmp_path / "last.ckpt")
    assert_resumed_exactly(straight, resumed, steps=4)


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("kind", LOADER_KINDS)
def test_a_fit_that_reached_max_epochs_goes_on_bit_exact_with_more_epochs(kind: str, package: str, tmp_path: Path):
    """``max_epochs=2``, then a new ``Trainer(max_epochs=3)`` from its ``last.ckpt``: the third epoch of a run of 3."""
    straight = fit(package, kind, sparse=False)
    fit(package, kind, sparse=False, max_epochs=2, extra=[last_checkpoint(package, tmp_path)])
    resumed = fit(package, kind, sparse=False, ckpt_path=tmp_path / "last.ckpt")
    assert_resumed_exactly(straight, resumed, steps=4)


def test_two_train_loaders_one_with_a_batch_sampler_resume_bit_exact(tmp_path: Path) -> None:
    """A dict of train loaders (Lightning cycles the shorter): a ``shuffle=True`` one without a generator, and one
    with a ``batch_sampler`` over a ``RandomSampler`` with its own generator; stopped after epoch 2, resumed."""

    class TwoLoaders(type(dropout_lm())):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["a"], batch_idx) + super().training_step(batch["b"], batch_idx)

    def fit_two(extra=(), ckpt_path=None) -> pl.LightningModule:
        pl.seed_everything(0, verbose=False)
        model, data = TwoLoaders(), windows(2, 3)
        sampler = BatchSampler(RandomSampler(data, generator=torch.Generator().manual_seed(2)), BATCH, False)
        loaders = {"a": user_loader("shuffle"), "b": DataLoader(data, batch_sampler=sampler)}
        callbacks = [SelfishSparsityCallback(sparsity=0.5, seed=1), RandomStateCheckpoint(), *extra]
        trainer = make_trainer(callbacks, EPOCHS, enable_checkpointing=bool(extra))
        trainer.fit(model, loaders, ckpt_path=ckpt_path)
        return model

    straight = fit_two()
    fit_two(extra=[Kill(after_epoch=1), last_checkpoint(PACKAGES[0], tmp_path)])
    resumed = fit_two(ckpt_path=tmp_path / "last.ckpt")
    assert_resumed_exactly(straight, resumed, steps=8)  # 4 batches of each loader


class Crash(Exception):
    """Stands for a killed process."""


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash


@pytest.mark.parametrize("kind", ["shuffle", "shuffle, own generator"])
def test_a_checkpoint_after_the_last_batch_of_an_epoch_resumes_bit_exact(kind: str, tmp_path: Path) -> None:
    """``every_n_train_steps=8`` writes after the second epoch's last batch, before its validation and its end: the
    resumed run starts the third epoch as the uninterrupted run did (it counts as written between epochs). Without
    the sparsity callback: Lightning does not call that epoch's ``on_train_epoch_end`` on this resume, so the
    callback's epoch-cadence update of that epoch is pinned by the next test."""
    straight = fit(PACKAGES[0], kind, sparse=False)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    with pytest.raises(Crash):
        fit(PACKAGES[0], kind, sparse=False, extra=[saver, CrashAtStep(9)])
    resumed = fit(PACKAGES[0], kind, sparse=False, ckpt_path=tmp_path / "step=8.ckpt")
    assert_resumed_exactly(straight, resumed, steps=4)


def test_a_checkpoint_after_an_epochs_last_batch_keeps_that_epochs_update(tmp_path) -> None:
    """``every_n_train_steps`` landing on an epoch's last batch writes before the epoch's end: the resumed run
    still makes the epoch-cadence update of that epoch's end, as the uninterrupted run did (same masks, weights and
    number of updates)."""

    def sparse_fit(extra=(), ckpt_path=None):
        model = fit("pytorch_lightning", "shuffle", sparse=True, extra=extra, ckpt_path=ckpt_path)
        return model, model.trainer.callbacks

    straight, straight_callbacks = sparse_fit()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    with pytest.raises(Crash):
        sparse_fit(extra=[saver, CrashAtStep(9)])
    resumed, resumed_callbacks = sparse_fit(ckpt_path=tmp_path / "step=8.ckpt")
    (a,) = [cb for cb in straight_callbacks if isinstance(cb, SelfishSparsityCallback)]
    (b,) = [cb for cb in resumed_callbacks if isinstance(cb, SelfishSparsityCallback)]
    assert a.controller.num_updates == b.controller.num_updates == 2
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name


def test_a_plain_loader_checkpointed_inside_an_epoch_resumes_with_lightnings_warning(tmp_path: Path) -> None:
    """Inside an epoch only a loader with ``state_dict``/``load_state_dict`` goes on at its position (see
    tests/test_resume_paths.py); a plain ``DataLoader`` restarts the epoch's data, and Lightning says so."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    with pytest.raises(Crash):
        fit(PACKAGES[0], "shuffle", sparse=False, extra=[saver, CrashAtStep(7)])
    with pytest.warns(
        UserWarning,
        match="resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
    ):
        fit(PACKAGES[0], "shuffle", sparse=False, ckpt_path=tmp_path / "step=6.ckpt")


# --------------------------------------------------------------------------------------------------------------
# killed by SIGKILL
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_a_fit_killed_mid_epoch_resumes_bit_exact_from_last_ckpt(tmp_path: Path) -> None:
    """``tests/scripts/killable_loaders.py``: ``shuffle=True`` with and without its own generator, with and without
    the sparsity callback, under both packages, and the other loaders with the sparsity callback; for each, three runs
    in their own processes: the uninterrupted one, one killed by SIGKILL at the third batch of its third epoch (no
    hook runs, nothing is flushed: ``last.ckpt`` of the second epoch's end is left), and ``fit(ckpt_path=last.ckpt)``
    in a new ``Trainer``."""
    script = Path(__file__).parent / "scripts" / "killable_loaders.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    shuffled = {"shuffle", "shuffle, own generator"}
    assert {(kind, sparse) for package, kind, sparse in results if package == PACKAGES[1]} == {
        (kind, sparse) for kind in shuffled for sparse in (True, False)
    }
    assert {kind for package, kind, sparse in results if package == PACKAGES[0] and sparse} == set(LOADER_KINDS)
    differ = {}
    for case, runs in results.items():
        assert runs["killed by"] == 9, case  # SIGKILL
        straight, resumed = runs["straight"], runs["resumed"]
        assert len(resumed["trained"]) == 4, case
        diffs = [float((a - resumed["params"][name]).abs().max()) for name, a in straight["params"].items()]
        same = all(torch.equal(a, resumed["params"][name]) for name, a in straight["params"].items())
        if resumed["trained"] != straight["trained"][-4:] or not same:
            differ[case] = max(diffs)
    assert not differ, f"resumed runs that differ from the uninterrupted one (max |diff|): {differ}"
