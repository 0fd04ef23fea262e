"""Every argument check of the recipes, triggered on purpose: the message names the argument, what was given and
what is allowed. (The CLI's own errors are tested in test_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_selfish_recipes import data as d
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.models import RHN, StackedLSTM
from lightning_selfish_recipes.models.common import WeightDrop
from lightning_selfish_recipes.models.on_lstm import ONLSTMCell


def tiny_lstm() -> StackedLSTM:
    return StackedLSTM(ntoken=10, ninp=8, nhid=8, nlayers=2, dropout=0.0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(network="lstm"), TypeError, "network must be a torch.nn.Module, got str"),
        (
            dict(network=nn.Linear(2, 2)),
            TypeError,
            r"network Linear has no init_hidden\(\): see lightning_selfish_recipes.models",
        ),
        (
            dict(optimizer="rmsprop"),
            ValueError,
            r"optimizer must be one of \['sntasgd', 'ntasgd', 'sgd', 'momentum', 'adam'\], got 'rmsprop'",
        ),
        (dict(lr=0), ValueError, "lr must be a positive number, got 0"),
        (dict(lr=float("nan")), ValueError, "lr must be a positive number, got nan"),
        (dict(clip=-0.25), ValueError, "clip must be a positive number, got -0.25"),
        (dict(bptt=0), ValueError, "bptt must be a positive int, got 0"),
        (dict(bptt=35.0), ValueError, "bptt must be a positive int, got 35.0"),
        (dict(sparsity={"sparsity": 1.0}), ValueError, r"sparsity.sparsity must be in \(0, 1\), got 1.0"),
        (dict(nonmono=0), ValueError, "nonmono must be an int >= 1, got 0"),
        (dict(plateau_factor=1.5), ValueError, r"plateau_factor must be in \(0, 1\), got 1.5"),
    ],
)
def test_language_model_arguments(kwargs, error, match):
    kwargs = {"network": tiny_lstm(), "lr": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        LanguageModel(**kwargs)


def test_model_arguments():
    with pytest.raises(ValueError, match="hidden_size 10 is not a multiple of chunk_size 4"):
        ONLSTMCell(4, 10, 4)
    with pytest.raises(ValueError, match="tie_weights requires ninp == nhid"):
        RHN(ntoken=10, ninp=8, nhid=6, depth=2, tie_weights=True)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        RHN(ntoken=10, ninp=8, nhid=8, depth=0)
    with pytest.raises(ValueError, match="LSTM has no parameter 'weight_hh_l5'"):
        WeightDrop(nn.LSTM(2, 3), weights=("weight_hh_l5",))


def test_corpus_and_split_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="corpus name must be a non-empty string, got ''"):
        d.resolve_corpus("")
    with pytest.raises(ValueError, match="verify must be None, True or False, got 'yes'"):
        d.resolve_corpus("ptb", verify="yes")
    with pytest.raises(ValueError, match="corpus name 'penn' is not a bundled corpus; allowed: ptb, wikitext-2"):
        d.expected_digests("penn")
    directory = tmp_path / "c"
    directory.mkdir()
    for split in d.SPLITS:
        (directory / f"{split}.txt").write_text("a b\n")
    with pytest.raises(ValueError, match="split must be one of train, valid, test, got 'dev'"):
        d.Corpus(directory).split("dev")
    (directory / "SHA256SUMS").write_text(f"{'0' * 64}  train.txt\n")
    with pytest.raises(ValueError, match=r"SHA256SUMS lists no digest for valid.txt, test.txt"):
        d.resolve_corpus("mine", directory)
    (directory / "SHA256SUMS").write_text("not a line\n")
    with pytest.raises(ValueError, match=r"line 1: expected '<64 hex digits>  <path>', got 'not a line'"):
        d.resolve_corpus("mine", directory)
    (directory / "SHA256SUMS").write_text(f"{'z' * 64}  train.txt\n")
    with pytest.raises(ValueError, match=r"line 1: 'z{64}' is not a hex SHA-256 digest"):
        d.resolve_corpus("mine", directory)


def test_batching_arguments():
    with pytest.raises(ValueError, match="bsz must be a positive int, got True"):
        d.batchify(torch.arange(10), True)
    with pytest.raises(ValueError, match=r"data must be a flat 1-D tensor of ids, got shape \(2, 5\)"):
        d.batchify(torch.arange(10).view(2, 5), 2)
    source = d.batchify(torch.arange(20), 2)  # 10 rows
    with pytest.raises(ValueError, match="no window at i=9 with seq_len=3 in a source of 10 rows"):
        d.get_batch(source, 9, 3)
    with pytest.raises(ValueError, match="seed and epoch must be non-negative, got seed=-1, epoch=0"):
        d.epoch_rng(-1, 0)
    with pytest.raises(ValueError, match=r"max_seq_len must be None or >= 5 \(the minimum window\), got 4"):
        d.variable_bptt_windows(100, 35, np.random.default_rng(0), max_seq_len=4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        d.rank_columns(20, 2, 2)
    with pytest.raises(ValueError, match=r"source must be a batchified \(rows >= 2, batch\) tensor, got \(10,\)"):
        d.BPTTWindows(torch.arange(10), 5)
    with pytest.raises(ValueError, match="bptt must be a positive int, got 0"):
        d.BPTTWindows(source, 0)
    with pytest.raises(ValueError, match="max_seq_len caps variable-BPTT draws; it requires variable=True"):
        d.BPTTWindows(source, 5, max_seq_len=10)
    with pytest.raises(TypeError, match=r"variable-BPTT windows have no fixed length.*use num_windows\(epoch\)"):
        len(d.BPTTWindows(source, 5, variable=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(test_batch_size=2.0), "test_batch_size must be a positive int, got 2.0"),
        (dict(bptt=-1), "bptt must be a positive int, got -1"),
        (dict(variable_bptt=True, max_seq_len_delta=-40, bptt=35), r"cap bptt \+ delta = -5 below the minimum window"),
        (dict(seed=-3), "seed must be a non-negative int, got -3"),
        (dict(corpus=""), "corpus must be a non-empty name, got ''"),
    ],
)
def test_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        d.LanguageModelingDataModule(**kwargs)
