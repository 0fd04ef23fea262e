"""Language-modelling data for the Selfish-RNN recipes: PTB and WikiText-2 (docs/data.md).

Everything here reproduces the data pipeline shared by the reference implementations (Selfish-RNN,
awd-lstm-lm, MoS, ON-LSTM) exactly, because the published perplexities depend on it:

- :func:`resolve_corpus` finds a verified copy of a corpus: a directory you give, else the archive bundled
  with this package extracted into a cache, else the canonical files downloaded into that cache. Every file
  is checked against the bundled SHA-256 digests before it is read, so a run never trains on a wrong corpus.
- :class:`Corpus` / :class:`Dictionary` tokenise it (whitespace split, ``<eos>`` per line, one vocabulary in
  first-appearance order over train, valid, test).
- :func:`batchify` / :func:`get_batch` cut it into independent column streams and time-major windows.
- :func:`fixed_bptt_windows` / :func:`variable_bptt_windows` say which windows an epoch visits.
- :class:`BPTTWindows` and :class:`LanguageModelingDataModule` feed those windows to Lightning, one window
  per training step, in order, with per-rank column groups under DDP.

One module per concern: :mod:`lightning_selfish_recipes.data.sources` (finding, verifying, extracting, downloading),
:mod:`lightning_selfish_recipes.data.tokens` (tokenisation), :mod:`lightning_selfish_recipes.data.windows` (batching,
BPTT windows and their random lengths, DDP columns) and :mod:`lightning_selfish_recipes.data.datamodule` (the Lightning
DataModule). Everything public is imported here: ``from lightning_selfish_recipes.data import
LanguageModelingDataModule``.
"""

from __future__ import annotations

from lightning_selfish_recipes.data.datamodule import LanguageModelingDataModule
from lightning_selfish_recipes.data.sources import (
    BUNDLED_DIR,
    CACHE_ENV_VAR,
    CORPORA,
    PTB_URLS,
    SPLITS,
    WIKITEXT2_URL,
    CorpusChecksumError,
    CorpusError,
    CorpusNotFoundError,
    default_cache_dir,
    expected_digests,
    resolve_corpus,
    sha256_file,
    verify_corpus,
)
from lightning_selfish_recipes.data.tokens import EOS, Corpus, Dictionary, tokenize_file
from lightning_selfish_recipes.data.windows import (
    BPTTBatch,
    BPTTWindows,
    batchify,
    epoch_rng,
    fixed_bptt_windows,
    get_batch,
    rank_columns,
    variable_bptt_windows,
)

__all__ = [
    "BPTTBatch",
    "BPTTWindows",
    "BUNDLED_DIR",
    "CACHE_ENV_VAR",
    "CORPORA",
    "Corpus",
    "CorpusChecksumError",
    "CorpusError",
    "CorpusNotFoundError",
    "Dictionary",
    "EOS",
    "LanguageModelingDataModule",
    "PTB_URLS",
    "SPLITS",
    "WIKITEXT2_URL",
    "batchify",
    "default_cache_dir",
    "epoch_rng",
    "expected_digests",
    "fixed_bptt_windows",
    "get_batch",
    "rank_columns",
    "resolve_corpus",
    "sha256_file",
    "tokenize_file",
    "variable_bptt_windows",
    "verify_corpus",
]
