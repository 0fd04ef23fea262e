"""The recipes' loaders as Lightning sees them: sized and in order with fixed BPTT (without Lightning's warning about
an ``IterableDataset`` with a length), unsized with variable BPTT, and never split by a distributed sampler."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_selfish_recipes import data as d
from tests.conftest import write_random_corpus


@pytest.fixture
def datamodule(tmp_path: Path) -> d.LanguageModelingDataModule:
    write_random_corpus(tmp_path, seed=0, vocab=20, lines=(60, 12, 12))
    dm = d.LanguageModelingDataModule("mine", data_dir=str(tmp_path), batch_size=4, eval_batch_size=2, bptt=5)
    dm.setup("fit")
    return dm


def test_fixed_bptt_loader_is_sized_map_style_and_in_order(datamodule: d.LanguageModelingDataModule) -> None:
    loader = datamodule.train_dataloader()
    dataset = loader.dataset
    assert not isinstance(dataset, IterableDataset) and len(loader) == len(dataset) == datamodule.num_train_windows()
    starts = [start for start, _ in d.fixed_bptt_windows(dataset.rows, 5)]
    for batch, start in zip(loader, starts, strict=True):
        expected = d.get_batch(dataset.source, start, 5)
        assert torch.equal(batch.input, expected[0]) and torch.equal(batch.target, expected[1]) and batch.seq_len == 5
    assert [dataset[i].input.tolist() for i in range(len(dataset))] == [b.input.tolist() for b in loader]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_variable_bptt_loader_has_no_length(datamodule: d.LanguageModelingDataModule) -> None:
    datamodule.variable_bptt = True
    loader = datamodule.train_dataloader()
    assert isinstance(loader.dataset, IterableDataset)
    with pytest.raises(TypeError):
        len(loader)
    assert [b.seq_len for b in loader] == [s for _, s in datamodule.train_dataset().windows(0)]


def test_lightning_neither_warns_nor_injects_a_distributed_sampler(datamodule: d.LanguageModelingDataModule) -> None:
    from pytorch_lightning.utilities.data import has_len_all_ranks

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    connector = trainer._data_connector
    plain = DataLoader(TensorDataset(torch.zeros(4)), batch_size=None)
    assert connector._requires_distributed_sampler(plain)  # what happens to an ordinary map-style loader
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert not connector._requires_distributed_sampler(loader)
        assert connector._resolve_sampler(loader, shuffle=False) is loader.sampler
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Your `IterableDataset` has `__len__` defined" would raise
            assert has_len_all_ranks(loader, pl.Trainer(accelerator="cpu", devices=1, logger=False).strategy)
