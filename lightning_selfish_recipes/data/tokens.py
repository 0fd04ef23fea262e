"""Tokenisation as every reference implementation does it: whitespace split, ``<eos>`` per line, one vocabulary.

:class:`Corpus` / :class:`Dictionary` read the three splits of a corpus directory into flat int64 tensors, with
ids in first-appearance order over train, valid, test (docs/data.md#tokenisation).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from lightning_selfish_recipes.data.sources import SPLITS, split_path

__all__ = ["EOS", "Corpus", "Dictionary", "tokenize_file"]

EOS = "<eos>"


class Dictionary:
    """Word <-> id mapping with ids in order of first appearance (not frequency-sorted, as in every reference
    implementation; the ids therefore depend on the order in which splits are read: train, valid, test)."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        """Id of ``word``, assigning the next free id on first sight."""
        idx = self.word2idx.get(word)
        if idx is None:
            idx = self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx


def tokenize_file(path: str | os.PathLike[str], dictionary: Dictionary) -> Tensor:
    """Ids of a text file as one flat int64 tensor, adding unseen words to ``dictionary``.

    Reads line by line as UTF-8, splits on whitespace and appends ``<eos>`` to every line, so a blank line
    becomes a lone ``<eos>`` (this matters for WikiText-2's token counts).
    """
    ids: list[int] = []
    add = dictionary.add_word
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            words.append(EOS)
            ids.extend(add(word) for word in words)
    return torch.tensor(ids, dtype=torch.int64)


class Corpus:
    """The three splits of a corpus directory as flat int64 tensors sharing one :class:`Dictionary`.

    The dictionary is built over train, then valid, then test, in first-appearance order, which reproduces
    the reference ids exactly (for PTB and WikiText-2, valid and test add no new words).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.dictionary = Dictionary()
        self.train = tokenize_file(split_path(self.path, "train"), self.dictionary)
        self.valid = tokenize_file(split_path(self.path, "valid"), self.dictionary)
        self.test = tokenize_file(split_path(self.path, "test"), self.dictionary)

    def split(self, name: str) -> Tensor:
        """Tensor of split ``name`` (one of ``train``, ``valid``, ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)

    def __len__(self) -> int:
        """Vocabulary size (``ntokens``)."""
        return len(self.dictionary)
