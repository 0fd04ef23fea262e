"""How the ranks of a run agree: the few collective operations a sparse run needs, and the exact selections built on
them (plain ``torch.distributed``; the method's own selections in :mod:`lightning_selfish.method.topology` call these
when a tensor is split over ranks, through a :class:`Span`).

DDP uses :meth:`Collective.broadcast_` today (every rank takes rank 0's masks and generator after an update). The
rest is the seam sharded training builds on (docs/architecture.md): a sharded update sums its counts and scores over
ranks (:meth:`~Collective.all_reduce_`) and selects over a tensor whose shards live on different ranks
(:func:`lowest_positions`, :func:`kth_lowest`): a radix select over the scores' integer keys
(:mod:`lightning_selfish.method.keys`), one histogram of the top bits over each local shard, then small histograms of
the few local candidates left, each summed over the ranks. What crosses ranks is a few thousand counts per
selection, never a tensor, and the result is the one a single process gets over the whole tensor, ties at the
``n``-th value to the lowest global positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_selfish.method.keys import key_value, order_keys, position_keys

__all__ = [
    "Collective",
    "ProcessGroup",
    "SINGLE_PROCESS",
    "SingleProcess",
    "Span",
    "collective_for",
    "kth_lowest",
    "lowest_positions",
    "random_positions",
]


@runtime_checkable
class Collective(Protocol):
    """The operations, in place on tensors on the parameters' device. Every rank calls each in the same order."""

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None: ...

    def all_reduce_(self, tensor: Tensor) -> None: ...

    def kth_value(self, values: Tensor, k: int) -> Tensor: ...


class SingleProcess:
    """One process: nothing to agree on."""

    world_size = 1
    rank = 0

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """(every rank already holds rank 0's tensor)"""

    def all_reduce_(self, tensor: Tensor) -> None:
        """(the sum over one rank is its own value)"""

    def kth_value(self, values: Tensor, k: int) -> Tensor:
        """The ``k``-th smallest (1-based, as :func:`torch.kthvalue`) of ``values``."""
        _check_k(k, values.numel())
        return torch.kthvalue(values.flatten(), k).values


class ProcessGroup:
    """The ranks of a ``torch.distributed`` process group (the default one unless given)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` with rank ``src``'s, in place."""
        dist.broadcast(tensor, src=src, group=self.group)

    def all_reduce_(self, tensor: Tensor) -> None:
        """Replace ``tensor`` by its sum over the ranks, in place."""
        dist.all_reduce(tensor, group=self.group)

    def kth_value(self, values: Tensor, k: int) -> Tensor:
        """The ``k``-th smallest (1-based) of the values of every rank together (each rank its own shard; shards
        may differ in size), by :func:`kth_lowest`: counts cross the ranks, not values."""
        return kth_lowest(values, k, self)


SINGLE_PROCESS = SingleProcess()


@dataclass(frozen=True)
class Span:
    """Where a block's local part lies in the whole block: the global flat position (in its tensor) of the local
    part's first element, the whole block's size, and the ranks that hold the other parts (:class:`SingleProcess`:
    the local part is the whole block).

    The method's selections take one (:mod:`lightning_selfish.method.topology`): with one rank they run as on any
    tensor; with several they count and select over every rank's part (:func:`lowest_positions`), each rank calling
    the same selections in the same order. ``start`` also keys random draws
    (:func:`~lightning_selfish.method.keys.position_keys`), so a draw is the same however the tensor is split.
    """

    start: int
    numel: int
    collective: Collective = SINGLE_PROCESS

    @property
    def split(self) -> bool:
        """Whether other ranks hold parts of the block (the counts and selections cross ranks)."""
        return self.collective.world_size > 1

    def count(self, mask: Tensor) -> int:
        """The active positions of the whole block (``mask`` is the local part)."""
        if not self.split:
            return int(mask.count_nonzero())
        return int(self.sum_(mask.count_nonzero().reshape(1)))

    def sum_(self, values: Tensor) -> Tensor:
        """``values`` (a small tensor of local sums) summed over the ranks, in place."""
        if self.split:
            self.collective.all_reduce_(values)
        return values


def collective_for(world_size: int) -> Collective:
    """The collective of a run of ``world_size`` processes: the default process group when there is one to use."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        return ProcessGroup()
    return SingleProcess()


# ------------------------------------------------------------------------------------------------------------------
# Exact selections over shards
# ------------------------------------------------------------------------------------------------------------------

_FIRST_DIGIT_BITS = 12  # the histogram over the whole shard: 4096 buckets
_DIGIT_BITS = 8  # then over the few candidates left in the chosen bucket
_CHUNK = 1 << 18  # elements per chunk of the passes over the whole shard: their temporaries stay small (and cached)


def _chunks(numel: int) -> range:
    return range(0, numel, _CHUNK)


def _keys(score: Tensor) -> Tensor:
    """:func:`order_keys` of the flat ``score``, computed a chunk at a time: one tensor of keys, not the three
    temporaries of its size that a pass over the whole at once holds."""
    flat = score.detach().reshape(-1)
    if flat.dtype in (torch.int32, torch.int64) or flat.numel() <= _CHUNK:
        return order_keys(flat)
    keys = torch.empty(
        flat.numel(), dtype=torch.int64 if flat.dtype == torch.float64 else torch.int32, device=flat.device
    )
    for start in _chunks(flat.numel()):
        keys[start : start + _CHUNK] = order_keys(flat[start : start + _CHUNK])
    return keys


def _check_k(k: int, available: int) -> None:
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] (the number of values), got {k}")


def _summed(counts: Tensor, collective: Collective) -> Tensor:
    collective.all_reduce_(counts)  # (one process: a no-op)
    return counts


def _radix_select(keys: Tensor, candidates: Tensor, n: int, collective: Collective) -> tuple[int, int, Tensor, int]:
    """The ``n``-th lowest key among the candidates of every rank (flat local tensors), and: how many of the
    candidates holding that key are among the ``n`` lowest (by position), this rank's positions holding it, and the
    number of candidates of all ranks (only that when ``n`` is outside ``[1, candidates]``)."""
    buckets = 1 << _FIRST_DIGIT_BITS
    shift = 8 * keys.element_size() - _FIRST_DIGIT_BITS
    # Pass 1, over the shard a chunk at a time: the top bits (an arithmetic shift keeps the signed keys' order); the
    # non-candidates land in bucket 0 and are taken out of its count.
    counts = torch.zeros(buckets, dtype=torch.int64, device=keys.device)
    for start in _chunks(keys.numel()):
        chunk = slice(start, start + _CHUNK)
        digit = torch.bitwise_right_shift(keys[chunk], shift).add_(buckets // 2).mul_(candidates[chunk])
        counts += torch.bincount(digit, minlength=buckets)
    counts[0] -= candidates.numel() - int(candidates.count_nonzero())
    counts = _summed(counts, collective)
    available = int(counts.sum())
    if not 1 <= n <= available:
        return 0, 0, keys.new_empty(0, dtype=torch.int64), available
    bucket, rank_in_bucket = _bucket_of(counts, n)
    prefix = bucket - buckets // 2  # the n-th lowest key's top bits, signed
    positions = _positions_with_top_bits(keys, candidates, shift, prefix)
    left = keys[positions].long()
    # Passes 2...: narrower digits of the few candidates left, until every bit of the n-th lowest key is known.
    while shift > 0:
        width = min(_DIGIT_BITS, shift)
        shift -= width
        digit = torch.bitwise_right_shift(left, shift).bitwise_and_((1 << width) - 1)
        counts = _summed(torch.bincount(digit, minlength=1 << width), collective)
        bucket, rank_in_bucket = _bucket_of(counts, rank_in_bucket)
        prefix = prefix * (1 << width) + bucket
        keep = digit == bucket
        positions, left = positions[keep], left[keep]
    return prefix, rank_in_bucket, positions, available


def _positions_with_top_bits(keys: Tensor, candidates: Tensor, shift: int, prefix: int) -> Tensor:
    """The flat positions of the candidates whose keys' top bits (``keys >> shift``) are ``prefix``, a chunk at a
    time."""
    parts = [keys.new_empty(0, dtype=torch.int64)]  # (an empty shard has no chunk)
    for start in _chunks(keys.numel()):
        chunk = slice(start, start + _CHUNK)
        in_bucket = torch.bitwise_right_shift(keys[chunk], shift).eq_(prefix).logical_and_(candidates[chunk])
        parts.append(in_bucket.nonzero().squeeze(1).add_(start))
    return torch.cat(parts)


def _bucket_of(counts: Tensor, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th (1-based) counted key, and that key's rank inside the bucket."""
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype, device=counts.device)))
    return bucket, rank - (int(cumulative[bucket - 1]) if bucket else 0)


def lowest_positions(
    score: Tensor, candidates: Tensor, n: int, start: int = 0, collective: Collective | None = None
) -> Tensor:
    """Bool mask (shaped like ``candidates``) of this rank's share of the ``n`` lowest-scoring candidates.

    ``score`` (floats, or integer keys of :mod:`lightning_selfish.method.keys`) and ``candidates`` are this rank's
    part of a tensor: its global flat positions ``start`` to ``start + candidates.numel() - 1``; ``n`` counts over
    all ranks. Every rank of ``collective`` calls this together; the union of the returned masks is exactly ``n``
    positions, those one process selecting over the whole tensor gets (ties at the ``n``-th lowest score to the
    lowest positions: :func:`lightning_selfish.method.topology.lowest_positions` on the CPU).
    """
    collective = collective or SingleProcess()
    keys = _keys(score)
    flat = candidates.reshape(-1)
    kth, ties_taken, positions, available = _radix_select(keys, flat, n, collective)
    if not 0 <= n <= available:
        raise ValueError(f"cannot choose {n} positions among {available} candidates")
    if n == 0 or n == available:
        return candidates.clone() if n else torch.zeros_like(candidates)
    chosen = flat & (keys < kth)
    # This rank's candidates holding the n-th lowest key are `positions`; of all ranks' such positions the first
    # `ties_taken` (by global position) are chosen. A rank's range is contiguous: the ranks before it in position
    # order are those whose range starts before its own.
    table = torch.zeros(2 * collective.world_size, dtype=torch.int64, device=keys.device)
    table[2 * collective.rank], table[2 * collective.rank + 1] = start, positions.numel()
    starts, ties = _summed(table, collective).view(-1, 2).unbind(1)
    before = int(ties[starts < start].sum())
    chosen[positions[: max(0, min(positions.numel(), ties_taken - before))]] = True
    return chosen.view_as(candidates)


def kth_lowest(values: Tensor, k: int, collective: Collective | None = None) -> Tensor:
    """The ``k``-th smallest (1-based) of the values of every rank together, as a 0-d tensor of their dtype."""
    collective = collective or SingleProcess()
    keys = _keys(values)
    kth, _, _, available = _radix_select(keys, torch.ones_like(keys, dtype=torch.bool), k, collective)
    _check_k(k, available)
    return key_value(kth, values.dtype)


def random_positions(
    candidates: Tensor, n: int, seed: int, draw: int, start: int = 0, collective: Collective | None = None
) -> Tensor:
    """``n`` of the candidate positions, uniformly at random over the whole tensor and the same on any number of
    ranks: those with the lowest :func:`~lightning_selfish.method.keys.position_keys` of draw ``draw``."""
    keys = position_keys(seed, draw, start, candidates.shape, candidates.device)
    return lowest_positions(keys, candidates, n, start, collective)
