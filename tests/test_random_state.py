"""``RandomStateCheckpoint``: a resumed fit draws what the uninterrupted one drew (issue 15.7).

Lightning restores the model, the optimizers and the loops from a checkpoint, but not the global random generators:
with dropout, a run resumed from a checkpoint drew other masks than the run that wrote it, and ended with other
weights. The reference here is the uninterrupted run itself, compared with ``torch.equal``.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import BATCH, STEPS, VOCAB, WINDOWS, TinyLM, dropout_lm, make_trainer, user_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

from lightning_selfish import RandomStateCheckpoint, SelfishSparsityCallback
from lightning_selfish.callbacks.random_state import (
    capture_random_state,
    loader_generators,
    restore_random_state,
    train_loaders,
)


class DropoutLM(TinyLM):
    """TinyLM with dropout 0.5 on the embeddings: every training step draws from torch's global generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.hidden = self.rnn(nn.functional.dropout(self.encoder(x), 0.5, self.training), self.hidden)
        return self.decoder(out)


def loader(seed: int = 0, windows: int = WINDOWS) -> DataLoader:
    """Like conftest's token_loader, with its own generator: starting an epoch's iterator draws nothing global."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (windows * BATCH, STEPS + 1), generator=g)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return DataLoader(data, batch_size=BATCH, shuffle=False, generator=torch.Generator())


class Crash(Exception):
    pass


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash


class Draws(Callback):
    """At every training batch, one draw from each global generator (after the states are restored)."""

    def __init__(self) -> None:
        self.draws: list[tuple[float, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))


def fit(tmp_path: Path, with_states: bool, extra=(), ckpt_path=None) -> tuple[DropoutLM, Draws]:
    pl.seed_everything(0, verbose=False)
    model, draws = DropoutLM(), Draws()
    states = [RandomStateCheckpoint()] if with_states else []
    callbacks = [SelfishSparsityCallback(sparsity=0.5, seed=1), *states, draws, *extra]
    checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in extra)
    trainer = make_trainer(callbacks, max_epochs=4, enable_checkpointing=checkpointing)
    trainer.fit(model, loader(), loader(1, 2), ckpt_path=ckpt_path)
    return model, draws


@pytest.mark.parametrize("with_states", [True, False], ids=["RandomStateCheckpoint", "without"])
def test_a_resumed_fit_with_dropout_ends_with_the_same_weights(tmp_path: Path, with_states: bool) -> None:
    straight, straight_draws = fit(tmp_path, with_states)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    with pytest.raises(Crash):
        fit(tmp_path, with_states, extra=[saver, CrashAtEpoch(2)])
    resumed, resumed_draws = fit(tmp_path, with_states, ckpt_path=tmp_path / "epoch=1.ckpt")
    same = [torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values())]
    if with_states:
        assert all(same)
        assert resumed_draws.draws == straight_draws.draws[-len(resumed_draws.draws) :]  # torch, Python, NumPy
        assert len(resumed_draws.draws) == 2 * WINDOWS
    else:  # the failure this callback removes: other dropout masks, other weights
        assert not all(same)


def test_states_round_trip_and_are_plain_for_weights_only_loading(tmp_path: Path) -> None:
    state = capture_random_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_random_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    callback = RandomStateCheckpoint()
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)  # how Lightning reads checkpoints
    callback.load_state_dict(loaded)
    assert len(loaded["ranks"]) == 1 and loaded["ranks"][0]["cuda"] is None


def test_a_bad_state_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a RandomStateCheckpoint state: expected \{'ranks': .*got keys \['x'\]"):
        RandomStateCheckpoint().load_state_dict({"x": 1})


def test_the_generators_of_a_loader_are_found_by_their_attribute_path() -> None:
    data = TensorDataset(torch.arange(8))
    g, h = torch.Generator(), torch.Generator()
    cases = [
        (DataLoader(data, 2), {}),
        (DataLoader(data, 2, shuffle=True), {}),  # its RandomSampler draws a seed from torch's global generator
        (DataLoader(data, 2, shuffle=True, generator=g), {"generator": g}),  # the sampler holds the same g
        (DataLoader(data, 2, sampler=RandomSampler(data, generator=h)), {"sampler.generator": h}),
        (
            DataLoader(data, 2, sampler=RandomSampler(data, generator=h), generator=g),
            {"generator": g, "sampler.generator": h},
        ),
        (
            DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data, generator=h), 2, False)),
            {"batch_sampler.sampler.generator": h},
        ),
        (DataLoader(data, 2, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=3)), {}),
        ([(torch.zeros(2),)], {}),  # not a DataLoader: a list of batches
    ]
    for loader, expected in cases:
        found = loader_generators(loader)
        assert found.keys() == expected.keys() and all(found[k] is expected[k] for k in expected), loader
    a, b, c = (DataLoader(data) for _ in range(3))
    trainer = type("T", (), {"train_dataloader": {"x": [a, b], "y": c}})()
    assert train_loaders(trainer) == [a, b, c]
    assert train_loaders(type("T", (), {"train_dataloader": None})()) == []


# --------------------------------------------------------------------------------------------------------------
# resumes that cannot be exact: one line each, at the resume
# --------------------------------------------------------------------------------------------------------------


def stop_and_resume(tmp_path: Path, edit=None, resumed_loader: str = "shuffle, own generator", **loader_kwargs):
    """A 2-epoch fit of conftest's dropout LM stopped after its first epoch (``last.ckpt``), its checkpoint changed by
    ``edit``, and resumed; returns the ``RandomStateCheckpoint`` lines the resume warned."""

    def fit(loader: str, ckpt_path=None, **kwargs):
        pl.seed_everything(0, verbose=False)
        saver = [ModelCheckpoint(dirpath=tmp_path, save_last=True)] if ckpt_path is None else []
        trainer = make_trainer(
            [RandomStateCheckpoint(), *saver],
            max_epochs=1 if ckpt_path is None else 2,
            enable_checkpointing=ckpt_path is None,
        )
        trainer.fit(dropout_lm(), user_loader(loader, **kwargs), ckpt_path=ckpt_path)

    fit("shuffle, own generator", **loader_kwargs)
    path = tmp_path / "last.ckpt"
    if edit is not None:
        checkpoint = torch.load(path, weights_only=False)
        edit(checkpoint["callbacks"]["RandomStateCheckpoint"])
        torch.save(checkpoint, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(resumed_loader, ckpt_path=path, **loader_kwargs)
    return [str(w.message) for w in caught if str(w.message).startswith("RandomStateCheckpoint")]


def test_a_resume_exact_for_its_loader_warns_nothing(tmp_path: Path) -> None:
    assert stop_and_resume(tmp_path) == []


def test_another_number_of_processes_restores_nothing_and_says_so(tmp_path: Path) -> None:
    def saved_by_two(state: dict) -> None:
        state["ranks"] = state["ranks"] * 2

    assert stop_and_resume(tmp_path, saved_by_two) == [
        "RandomStateCheckpoint: the checkpoint holds the random states of 2 process(es), this run has 1; the random "
        "states are not restored, so this resume draws other random numbers than the saved run would have"
    ]


def test_workers_are_seeded_before_the_restore_and_a_resume_says_so(tmp_path: Path) -> None:
    assert stop_and_resume(tmp_path, num_workers=1) == [
        "RandomStateCheckpoint: the train DataLoader has num_workers=1, whose worker processes were seeded when this "
        "resumed fit started its iterator, before the saved random states could be restored: random draws inside the "
        "workers differ from the uninterrupted run; num_workers=0 resumes exactly"
    ]


def test_a_loader_whose_generators_the_checkpoint_does_not_hold_is_named(tmp_path: Path) -> None:
    """Written with ``shuffle=True, generator=g``, resumed with a ``RandomSampler`` that has its own generator."""
    assert stop_and_resume(tmp_path, resumed_loader="RandomSampler, own generator") == [
        "RandomStateCheckpoint: train loader 0 draws from generators at ['sampler.generator'], the checkpoint holds "
        "the states of ['generator']: only those in both are restored, so the data order may differ from the "
        "uninterrupted run; resume with the loaders the checkpoint was written with"
    ]


def test_a_checkpoint_of_the_earlier_version_resumes_as_it_did_and_says_so(tmp_path: Path) -> None:
    """An earlier version saved only ``{"ranks": [global states]}`` and restored them at the first training batch."""

    def earlier(state: dict) -> None:
        del state["between_epochs"]
        for rank in state["ranks"]:
            del rank["loaders"]

    assert stop_and_resume(tmp_path, earlier) == [
        "RandomStateCheckpoint: the checkpoint was written by an earlier version, which saved neither the train "
        "loaders' generators nor whether it was written inside an epoch; its global random states are restored at "
        "the first training batch, as that version did, which may differ from the uninterrupted run (a checkpoint "
        "written by this version resumes exactly)"
    ]
