"""``LanguageModelingDataModule``: a corpus as consecutive BPTT windows for Lightning (docs/data.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from lightning_selfish_recipes.compat import pl
from lightning_selfish_recipes.data.sources import CORPORA, resolve_corpus
from lightning_selfish_recipes.data.tokens import Corpus, Dictionary
from lightning_selfish_recipes.data.windows import (
    BPTTWindows,
    _check_positive,
    batchify,
    epoch_rng,
    fixed_bptt_windows,
    rank_columns,
    variable_bptt_windows,
)

__all__ = ["LanguageModelingDataModule"]

log = logging.getLogger(__name__)


class LanguageModelingDataModule(pl.LightningDataModule):
    """PTB / WikiText-2 (or your own corpus) as consecutive BPTT windows for a stateful RNN language model.

    Args:
        corpus: ``"ptb"``, ``"wikitext-2"`` (bundled, checksummed), or any name for your own corpus in
            ``data_dir``.
        data_dir: directory with ``train.txt``, ``valid.txt``, ``test.txt``; None uses the bundled copy.
        cache_dir: cache root for extracted or downloaded corpora (default ``$LIGHTNING_SELFISH_CACHE`` or
            ``~/.cache/lightning_selfish``).
        batch_size: number of training streams (columns), global over all DDP ranks.
        eval_batch_size: validation streams. test_batch_size: test streams.
        bptt: training window length (mean length with ``variable_bptt``) and evaluation stride.
        variable_bptt: draw window lengths per step as awd-lstm-lm (ON-LSTM, MoS); else fixed ``bptt``.
        max_seq_len_delta: cap variable windows at ``bptt + max_seq_len_delta`` (MoS: 20); None = no cap.
        seed: seed of the variable-BPTT draws (epoch ``e`` uses ``default_rng([seed, e])``).
        download: allow downloading the canonical files if the package has no bundled archive.
        verify: checksum policy for ``data_dir`` (see :func:`resolve_corpus`); None = default.

    Training yields one :class:`BPTTBatch` per window, in corpus order; validation and test use a fixed
    stride of ``bptt`` at their own batch sizes. Under DDP each rank trains on its own contiguous group of
    ``batch_size / world_size`` columns with the same windows (so every rank takes the same number of steps),
    while validation and test run over all columns on every rank (identical metrics on every rank, no
    sampler, batch size 1 allowed).

    A checkpoint holds the epoch and the number of its windows already trained (:meth:`state_dict`), so a fit resumed
    from a checkpoint written in the middle of an epoch goes on with the next window, as the saved run did.
    """

    def __init__(
        self,
        corpus: str = "ptb",
        data_dir: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        test_batch_size: int = 1,
        bptt: int = 35,
        variable_bptt: bool = False,
        max_seq_len_delta: int | None = None,
        seed: int = 0,
        download: bool = True,
        verify: bool | None = None,
    ) -> None:
        super().__init__()
        for argument, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("test_batch_size", test_batch_size),
            ("bptt", bptt),
        ):
            _check_positive(argument, value)
        if max_seq_len_delta is not None:
            if not variable_bptt:
                raise ValueError(
                    f"max_seq_len_delta={max_seq_len_delta} caps variable-BPTT windows; it requires "
                    "variable_bptt=True (or leave it None)"
                )
            if bptt + max_seq_len_delta < 5:
                raise ValueError(
                    f"max_seq_len_delta={max_seq_len_delta} gives a cap bptt + delta = "
                    f"{bptt + max_seq_len_delta} below the minimum window of 5"
                )
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(corpus, str) or not corpus:
            raise ValueError(f"corpus must be a non-empty name, got {corpus!r}")
        if data_dir is None and corpus not in CORPORA:
            raise ValueError(
                f"corpus={corpus!r} is not bundled (allowed without data_dir: {', '.join(CORPORA)}); "
                "for your own corpus pass data_dir"
            )
        self.save_hyperparameters()
        self.corpus_name = corpus
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.test_batch_size = test_batch_size
        self.bptt = bptt
        self.variable_bptt = variable_bptt
        self.max_seq_len_delta = max_seq_len_delta
        self.seed = seed
        self.download = download
        self.verify = verify
        self._corpus: Corpus | None = None
        self._resolved: Path | None = None
        self._position = (-1, 0)  # (epoch, windows of it handed to training so far)
        self._resume: tuple[int, int] | None = None  # a checkpoint's position, for the next training pass

    # -- corpus -------------------------------------------------------------------------------------------------

    def _resolve(self) -> Path:
        if self._resolved is None:  # once per process: prepare_data and setup both need it
            self._resolved = resolve_corpus(
                self.corpus_name, self.data_dir, cache_dir=self.cache_dir, download=self.download, verify=self.verify
            )
        return self._resolved

    def prepare_data(self) -> None:
        """Extract or download the corpus once per node (Lightning calls this on local rank 0 only)."""
        self._resolve()

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the corpus and check the DDP layout before any step runs."""
        self.load_corpus()
        if stage in (None, "fit"):
            world_size, rank = self._world()
            rank_columns(self.batch_size, world_size, rank)

    def load_corpus(self) -> Corpus:
        """The tokenised corpus, resolved (verified) and built on first use, then kept."""
        if self._corpus is None:
            self._corpus = Corpus(self._resolve())
            log.info(
                "Corpus %r: %d words; train/valid/test %d / %d / %d tokens",
                self.corpus_name,
                len(self._corpus.dictionary),
                self._corpus.train.numel(),
                self._corpus.valid.numel(),
                self._corpus.test.numel(),
            )
        return self._corpus

    @property
    def corpus(self) -> Corpus:
        return self.load_corpus()

    @property
    def dictionary(self) -> Dictionary:
        return self.load_corpus().dictionary

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (``ntokens``) for the model; loads the corpus if ``setup`` has not run yet, so it
        can be linked to the model's constructor (e.g. LightningCLI ``link_arguments(apply_on="instantiate")``).
        """
        return len(self.load_corpus().dictionary)

    # -- layout helpers -------------------------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _split_batch_size(self, split: str) -> int:
        return {"train": self.batch_size, "valid": self.eval_batch_size, "test": self.test_batch_size}[split]

    def batchified(self, split: str) -> Tensor:
        """Split ``split`` batchified at its batch size over all columns (not the per-rank view)."""
        corpus = self.load_corpus()
        return batchify(corpus.split(split), self._split_batch_size(split))

    def split_rows(self, split: str) -> int:
        """Rows of the batchified split: evaluation normalises by ``rows - 1`` (Selfish) or ``rows`` (awd)."""
        return self.load_corpus().split(split).numel() // self._split_batch_size(split)

    @property
    def max_seq_len(self) -> int | None:
        return None if self.max_seq_len_delta is None else self.bptt + self.max_seq_len_delta

    def train_dataset(self) -> BPTTWindows:
        """This rank's training windows; the epoch is read from the trainer each time iteration starts."""
        world_size, rank = self._world()
        columns = rank_columns(self.batch_size, world_size, rank)
        source = self.batchified("train")[:, columns].contiguous()
        windows = BPTTWindows(
            source,
            self.bptt,
            variable=self.variable_bptt,
            max_seq_len=self.max_seq_len,
            seed=self.seed,
            epoch=self._current_epoch,
        )
        if self._resume is not None:
            windows.resume_at(*self._resume)
            self._position, self._resume = self._resume, None
        return windows

    # -- resuming ---------------------------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training windows of the epoch as Lightning hands them to the training step."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch, done = self._position
            epoch_now = self._current_epoch()
            self._position = (epoch_now, done + 1 if epoch == epoch_now else 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch, how many of its windows were trained, and whether that was
        its last one (Lightning decides, e.g. with ``limit_train_batches``). Lightning saves it in checkpoints."""
        epoch, done = self._position
        trainer = self.trainer
        finished = trainer is not None and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        return {"epoch": epoch, "windows_trained": done, "epoch_finished": finished}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next training pass go on where the checkpoint's run was (older checkpoints hold no position)."""
        if {"epoch", "windows_trained", "epoch_finished"} <= set(state_dict) and state_dict["epoch"] >= 0:
            epoch, done = int(state_dict["epoch"]), int(state_dict["windows_trained"])
            self._resume = (epoch + 1, 0) if state_dict["epoch_finished"] else (epoch, done)

    def num_train_windows(self, epoch: int = 0) -> int:
        """Exact number of training steps in ``epoch`` (the same on every rank)."""
        rows = self.split_rows("train")
        if not self.variable_bptt:
            return len(fixed_bptt_windows(rows, self.bptt))
        return len(variable_bptt_windows(rows, self.bptt, epoch_rng(self.seed, epoch), self.max_seq_len))

    # -- dataloaders ----------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return self.train_dataset().dataloader()

    def val_dataloader(self) -> DataLoader:
        return BPTTWindows(self.batchified("valid"), self.bptt).dataloader()

    def test_dataloader(self) -> DataLoader:
        return BPTTWindows(self.batchified("test"), self.bptt).dataloader()
