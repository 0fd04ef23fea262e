"""BPTT windows: the corpus cut into column streams and time-major windows, one window per training step.

:func:`batchify` / :func:`get_batch` cut a split into independent column streams and windows;
:func:`fixed_bptt_windows` / :func:`variable_bptt_windows` (with :func:`epoch_rng`) say which windows an epoch
visits; :func:`rank_columns` gives each DDP rank its columns; :class:`BPTTWindows` feeds the windows to a
DataLoader in order (docs/data.md#batching, docs/data.md#variable-length-bptt-on-lstm-mos, docs/data.md#ddp).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = [
    "BPTTBatch",
    "BPTTWindows",
    "batchify",
    "epoch_rng",
    "fixed_bptt_windows",
    "get_batch",
    "rank_columns",
    "variable_bptt_windows",
]


def batchify(data: Tensor, bsz: int) -> Tensor:
    """Cut a flat id tensor into ``bsz`` contiguous streams, shape ``(len(data) // bsz, bsz)``.

    Column ``j`` is the ``j``-th contiguous stretch of the corpus and is an independent stream whose hidden
    state is carried from window to window; the remainder tokens are dropped. There is never any shuffling.
    """
    if not isinstance(bsz, int) or isinstance(bsz, bool) or bsz < 1:
        raise ValueError(f"bsz must be a positive int, got {bsz!r}")
    if data.dim() != 1:
        raise ValueError(f"data must be a flat 1-D tensor of ids, got shape {tuple(data.shape)}")
    nbatch = data.size(0) // bsz
    if nbatch < 2:
        raise ValueError(
            f"bsz={bsz} leaves {nbatch} row(s) from {data.size(0)} tokens; at least 2 rows are needed to form "
            "an (input, target) pair. Use a smaller batch size or a larger corpus."
        )
    return data[: nbatch * bsz].view(bsz, nbatch).t().contiguous()


def get_batch(source: Tensor, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Window starting at row ``i``: input ``(L, B)`` and target ``(L*B,)``, ``L = min(seq_len, rows-1-i)``.

    The target is the input shifted by one step and flattened time-major, i.e. in the order of logits
    reshaped to ``(L*B, V)``.
    """
    length = min(seq_len, source.size(0) - 1 - i)
    if i < 0 or seq_len < 1 or length < 1:
        raise ValueError(f"no window at i={i} with seq_len={seq_len} in a source of {source.size(0)} rows")
    return source[i : i + length], source[i + 1 : i + 1 + length].reshape(-1)


def fixed_bptt_windows(rows: int, bptt: int) -> list[tuple[int, int]]:
    """``(start, seq_len)`` of a fixed-stride pass: ``i = 0, bptt, 2*bptt, ... < rows - 1``.

    ``seq_len`` is always ``bptt``; :func:`get_batch` clips the last window, which is therefore shorter.
    Used for fixed-BPTT training and for every evaluation.
    """
    _check_positive("bptt", bptt)
    return [(i, bptt) for i in range(0, rows - 1, bptt)]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's variable-BPTT draws, a pure function of ``(seed, epoch)``.

    Seeding per epoch (instead of one generator running across epochs, as awd-lstm-lm does) means a run
    resumed from a checkpoint at epoch ``e`` draws exactly the windows an uninterrupted run would have.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([int(seed), int(epoch)])


def variable_bptt_windows(
    rows: int, bptt: int, rng: np.random.Generator, max_seq_len: int | None = None
) -> list[tuple[int, int]]:
    """``(start, seq_len)`` of one variable-BPTT epoch (awd-lstm-lm; docs/data.md#variable-length-bptt-on-lstm-mos).

    Per window: ``base = bptt`` w.p. 0.95 else ``bptt / 2``; ``seq_len = max(5, int(Normal(base, 5)))``
    (truncated toward zero); then ``min(seq_len, max_seq_len)`` if a cap is given (MoS uses
    ``bptt + max_seq_len_delta``; awd main and ON-LSTM use none). Loops while ``i < rows - 2``.
    Random lengths vary which tokens start a window from epoch to epoch, the only "shuffling" the model gets.
    """
    _check_positive("bptt", bptt)
    if max_seq_len is not None and max_seq_len < 5:
        raise ValueError(f"max_seq_len must be None or >= 5 (the minimum window), got {max_seq_len}")
    windows: list[tuple[int, int]] = []
    i = 0
    while i < rows - 2:
        base = bptt if rng.random() < 0.95 else bptt / 2.0
        seq_len = max(5, int(rng.normal(base, 5)))
        if max_seq_len is not None:
            seq_len = min(seq_len, max_seq_len)
        windows.append((i, seq_len))
        i += seq_len
    return windows


def rank_columns(batch_size: int, world_size: int, rank: int) -> slice:
    """Contiguous, disjoint group of columns (streams) that ``rank`` trains on under DDP.

    Each column is an independent stream with its own hidden state, so giving every rank whole columns keeps
    hidden states consistent across windows, and together the ranks train on exactly the single-device batch.
    """
    _check_positive("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of processes world_size={world_size} "
            "(each rank trains on batch_size / world_size whole columns of the batchified corpus); "
            f"allowed batch sizes are multiples of {world_size}"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _check_positive(argument: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")


class BPTTBatch(NamedTuple):
    """One BPTT window, the unit of one training step.

    ``input``: ``(L, B)`` int64 ids; ``target``: ``(L*B,)`` int64, the input shifted by one, time-major.
    ``seq_len``: the window length drawn for this step, the quantity awd-lstm-lm scales the learning rate by
    (``lr * seq_len / bptt``). It equals ``L = input.size(0)`` except in the last window of a pass, which is
    clipped to the data; with fixed BPTT it is always ``bptt``.
    """

    input: Tensor
    target: Tensor
    seq_len: int


class BPTTWindows(Dataset):
    """Consecutive BPTT windows of a batchified split, in order: one item per window, never shuffled.

    The epoch is read when iteration starts (``epoch`` may be a callable, e.g. returning
    ``trainer.current_epoch``), so one DataLoader serves every epoch with that epoch's variable-BPTT draws and
    no reloading. With fixed BPTT ``len()`` is exact and item ``i`` is the ``i``-th window. With variable BPTT the
    count differs between epochs and ``len()`` raises ``TypeError`` on purpose: Lightning stops an epoch after
    ``len()`` batches and runs the end-of-epoch validation only at that count, so a merely *expected* length
    would drop windows or skip validation. Unsized, Lightning runs each epoch to exhaustion; :meth:`num_windows`
    gives exact counts. :meth:`dataloader` builds the loader Lightning needs for either case.
    """

    def __init__(
        self,
        source: Tensor,
        bptt: int,
        *,
        variable: bool = False,
        max_seq_len: int | None = None,
        seed: int = 0,
        epoch: int | Callable[[], int] = 0,
    ) -> None:
        super().__init__()
        if source.dim() != 2 or source.size(0) < 2:
            raise ValueError(f"source must be a batchified (rows >= 2, batch) tensor, got {tuple(source.shape)}")
        _check_positive("bptt", bptt)
        if max_seq_len is not None and not variable:
            raise ValueError("max_seq_len caps variable-BPTT draws; it requires variable=True")
        self.source = source
        self.bptt = bptt
        self.variable = variable
        self.max_seq_len = max_seq_len
        self.seed = seed
        self._epoch = epoch
        self._resume: tuple[int, int] | None = None
        epoch_rng(seed, 0)  # validate the seed now rather than at the first epoch

    def resume_at(self, epoch: int, done: int) -> None:
        """Make the next pass the windows of ``epoch`` from its window ``done`` on (a resume); later passes are
        whole epochs again.

        The epoch is given, not read: a resumed fit may start its iterator before Lightning has restored its epoch
        count (``configure_optimizers`` or a callback that reads ``trainer.estimated_stepping_batches`` at fit start
        loads the dataloader then).
        """
        self._resume = (int(epoch), int(done))

    def _next_pass(self) -> tuple[int, int]:
        """``(epoch, first window)`` of the pass that starts now: a pending resume's, else the current epoch's."""
        resume, self._resume = self._resume, None
        return resume if resume is not None else (self.epoch, 0)

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch whose windows the next iteration yields (for use outside a Trainer)."""
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch()) if callable(self._epoch) else int(self._epoch)

    @property
    def rows(self) -> int:
        return self.source.size(0)

    def windows(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """``(start, seq_len)`` of every window of ``epoch`` (default: the current one)."""
        if not self.variable:
            return fixed_bptt_windows(self.rows, self.bptt)
        epoch = self.epoch if epoch is None else epoch
        return variable_bptt_windows(self.rows, self.bptt, epoch_rng(self.seed, epoch), self.max_seq_len)

    def num_windows(self, epoch: int | None = None) -> int:
        """Exact number of windows (training steps) in ``epoch`` (default: the current one)."""
        return len(self.windows(epoch))

    def _window(self, start: int, seq_len: int) -> BPTTBatch:
        inp, target = get_batch(self.source, start, seq_len)
        return BPTTBatch(inp, target, seq_len)

    def __iter__(self) -> Iterator[BPTTBatch]:
        epoch, first = self._next_pass()
        for start, seq_len in self.windows(epoch)[first:]:
            yield self._window(start, seq_len)

    def __getitem__(self, index: int) -> BPTTBatch:
        if self.variable:
            return self._window(*self.windows()[index])
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range: {len(self)} windows")
        return self._window(index * self.bptt, self.bptt)  # fixed_bptt_windows without building the list

    def __len__(self) -> int:
        if self.variable:
            raise TypeError(
                "variable-BPTT windows have no fixed length: the count changes every epoch; "
                "use num_windows(epoch) for an exact count"
            )
        return len(range(0, self.rows - 1, self.bptt))

    def dataloader(self) -> DataLoader:
        """A loader of these windows, in order, one window per batch, that Lightning leaves as it is.

        Fixed BPTT: the windows as a sized map-style dataset, read in order by a one-replica
        ``DistributedSampler`` (Lightning replaces any other sampler by a distributed one under DDP, which would
        split the windows between ranks; here each rank already holds its own columns and must see every
        window). Variable BPTT: an unsized ``IterableDataset`` view, run to exhaustion every epoch. Either starts
        at the window :meth:`resume_at` names.
        """
        # batch_size=None: each item already is a whole batch. num_workers=0: the data is an in-memory tensor
        # (slicing is free), and worker processes would copy the trainer and read a stale epoch. generator: starting
        # an iterator draws a (here unused) seed, from this generator instead of torch's global one, so the global
        # random state a resumed run restores is not moved by the data (lightning_selfish.RandomStateCheckpoint).
        generator = torch.Generator()
        if self.variable:
            return DataLoader(_UnsizedWindows(self), batch_size=None, num_workers=0, generator=generator)
        return DataLoader(self, batch_size=None, sampler=_InOrder(self), num_workers=0, generator=generator)


class _InOrder(DistributedSampler):
    """Every window of a :class:`BPTTWindows`, in order, from the one a resume names; one replica, no shuffling."""

    def __init__(self, windows: BPTTWindows) -> None:
        super().__init__(windows, num_replicas=1, rank=0, shuffle=False)
        self.windows = windows

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.windows._next_pass()[1], len(self.windows)))


class _UnsizedWindows(IterableDataset):
    """Variable-BPTT windows as an iterable without a length (see :class:`BPTTWindows`)."""

    def __init__(self, windows: BPTTWindows) -> None:
        super().__init__()
        self.windows = windows

    def __iter__(self) -> Iterator[BPTTBatch]:
        return iter(self.windows)
