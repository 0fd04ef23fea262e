"""One topology update, in steps: remove, budget per tensor, grow per block, apply, statistics.

:meth:`lightning_selfish.core.engine.SparseEngine.update` runs :func:`topology_update` over its masks. The parts of the
method (:mod:`lightning_selfish.method.parts`) decide what each step does; nothing here branches on a method's name.

1. :func:`_remove`, per block (the whole tensor, or each gate unless gates are ranked jointly).
2. :func:`_tensor_budgets`: how many each tensor regrows (its removals, or shared by an across-layer score).
3. :func:`_grow`: the tensor's regrowth split over its blocks (:func:`_block_budgets`), grown per block.
4. :func:`_apply`: rank 0's outcome on every rank (DDP), the new masks, the weights and optimizer states.
5. :func:`_statistics`: the counts read back in one host transfer, and DSR's next threshold.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_selfish.core.masks import SparseTensor
from lightning_selfish.core.optim_state import reset_optimizer_state
from lightning_selfish.core.signals import UpdateContext
from lightning_selfish.core.types import MaskUpdate, UpdateStats
from lightning_selfish.method import topology
from lightning_selfish.method.parts import MethodConfig, UpdateAmount
from lightning_selfish.method.redistribution import allocate_counts
from lightning_selfish.method.shards import Span

__all__ = ["topology_update"]


@dataclass
class _Removed:
    kept: dict[str, Tensor]  # per tensor: the mask after removal
    per_block: dict[str, list[int]]  # per tensor: how many each block removed
    expected: int  # threshold removal: the count the prune rate asked for (DSR's threshold adapts to it)


@torch.no_grad()
def topology_update(
    tensors: Mapping[str, SparseTensor], amount: UpdateAmount, method: MethodConfig, context: UpdateContext
) -> UpdateStats:
    """One topology update: removal, then growth of exactly as many weights as were removed.

    1. :meth:`_remove`, per block (the whole tensor, or each gate unless gates are ranked jointly): the
       ``ceil(prune_rate * active)`` (or ``floor``: ``method.removal_rounding``) weights named by
       ``method.removal``; with ``amount.target_density`` (dense-to-sparse, GMP) the weights above
       ``round(target_density * numel)``; with a threshold removal (DSR) every active weight below
       ``context.threshold``, one threshold for all tensors.
    2. :meth:`_tensor_budgets`: as many as each tensor removed, or the total shared out by
       ``method.redistribution`` (exact, capped by each tensor's free room); nothing when pruning to a target
       or without growth.
    3. :meth:`_grow`: inside a tensor, the regrowth goes to its blocks (one block; each gate its own removals;
       or shared by the gate score of Table 6), then ``method.growth`` picks the positions per block.
    4. :meth:`_apply`: rank 0's outcome on every rank (DDP), the new masks, the weights and optimizer states.

    Grown weights start at zero, also one removed and regrown in the same update, unless
    ``method.removed_and_regrown`` keeps them (the authors' code, RigL: such a weight keeps its value and its
    optimizer state, e.g. its SNT-ASGD averaging window). The returned stats carry DSR's next threshold.
    """
    old = {name: record.mask.clone() for name, record in tensors.items()}
    removal = _remove(tensors, amount, method, context, old)
    budgets = _tensor_budgets(tensors, amount, method, context, old, removal)
    counts: dict[str, Tensor] = {}
    for name, record in tensors.items():
        kept = removal.kept[name]
        new = _grow(record, budgets[name], method, context, old[name], kept, removal.per_block[name])
        counts[name] = record.span.sum_(_apply(record, old[name], kept, new, method, context))
    if context.synchronize is not None and tensors:
        device = next(iter(tensors.values())).param.device
        _synchronize_generator(context.generator, context.synchronize, device)
    return _statistics(amount, method, context, counts, removal.expected)


def _remove(
    tensors: Mapping[str, SparseTensor],
    amount: UpdateAmount,
    method: MethodConfig,
    context: UpdateContext,
    old: Mapping[str, Tensor],
) -> _Removed:
    """Step 1: the mask after removal per tensor, the count removed per block, and (DSR) the count expected."""
    removed = _Removed({}, {}, 0)
    part = method.removal
    for name, record in tensors.items():
        if not part.removes:
            removed.kept[name], removed.per_block[name] = record.mask.clone(), [0] * len(record.groups)
        elif part.by_threshold:  # (the count-based ones know their counts; these read them back, once per block)
            if context.threshold is None:
                raise ValueError(f"removal={part.name!r} needs the current threshold (UpdateContext.threshold)")
            removed.kept[name] = part.remove(record.param, record.mask, context.threshold)
            gone = old[name] & ~removed.kept[name]
            counts = _block_counts(record, [gone] * len(record.groups) + [old[name]])
            removed.per_block[name], active = counts[:-1], counts[-1]
            removed.expected += topology.removal_count(active, amount.prune_rate, method.removal_rounding)
        else:
            removed.kept[name], removed.per_block[name] = _remove_blocks(record, amount, method)
    return removed


def _remove_blocks(record: SparseTensor, amount: UpdateAmount, method: MethodConfig) -> tuple[Tensor, list[int]]:
    """Count-based removal per block: ``ceil(prune_rate * active)``, or down to ``target_density``."""
    mask = record.mask
    block_active = _block_counts(record, [mask] * len(record.groups))
    if amount.target_density is None:
        counts = [topology.removal_count(n, amount.prune_rate, method.removal_rounding) for n in block_active]
    else:
        excess = max(0, sum(block_active) - topology.uniform_count(record.numel, amount.target_density))
        counts = allocate_counts(excess, block_active, block_active)
    kept = mask.clone()
    remove = method.removal.remove
    for (rows, span), n in zip(record.blocks(), counts):
        kept[rows] = _on_span(remove, span, f"removal={method.removal.name!r}")(record.param[rows], mask[rows], n)
    return kept, counts


def _block_counts(record: SparseTensor, masks: Sequence[Tensor]) -> list[int]:
    """Active positions of each whole row block of ``masks`` (one per block of ``record``; a last extra mask is
    counted over the whole tensor): one host read, and one exchange of the counts when the tensor is split."""
    blocks = record.blocks()
    parts = [mask[rows].count_nonzero() for mask, (rows, _) in zip(masks, blocks)]
    parts += [mask.count_nonzero() for mask in masks[len(blocks) :]]
    counts = record.span.sum_(torch.stack(parts)) if parts else torch.zeros(0)
    return [int(c) for c in counts.tolist()]


def _on_span(function: Callable[..., Any], span: Span, what: str) -> Callable[..., Any]:
    """``function`` told where its block lies (``span=``) when it takes it: the library's selections do, and count
    and select over every rank's part of a split block. A function that does not cannot run on a split block."""
    if "span" in inspect.signature(function).parameters:
        return lambda *args: function(*args, span=span)
    if span.split:
        raise ValueError(
            f"{what}: {getattr(function, '__qualname__', function)!r} selects over the block it is handed, but the "
            "tensor is split across ranks (FSDP2): give it a keyword argument span (a "
            "lightning_selfish.method.shards.Span) and count and select through it, as the library's functions do"
        )
    return function


def _tensor_budgets(
    tensors: Mapping[str, SparseTensor],
    amount: UpdateAmount,
    method: MethodConfig,
    context: UpdateContext,
    old: Mapping[str, Tensor],
    removed: _Removed,
) -> dict[str, int]:
    """Step 2: how many each tensor regrows: its own removals, or the total shared by an across-layer score
    (none above its free room)."""
    totals = {name: sum(blocks) for name, blocks in removed.per_block.items()}
    if not method.growth.grows or amount.target_density is not None:
        return dict.fromkeys(tensors, 0)
    part = method.redistribution
    if part.score is None:
        return totals
    names = list(tensors)
    scores = []
    what = f"redistribution={part.name!r}"
    for name in names:
        record = tensors[name]
        signal = context.read(part.reads, record, what)
        scores.append(_on_span(part.score, record.span, what)(old[name], removed.kept[name], signal))
    caps = []
    for name in names:
        record = tensors[name]
        caps.append(record.numel - record.span.count(_growth_base(method, old[name], removed.kept[name])))
    return dict(zip(names, allocate_counts(sum(totals.values()), scores, caps)))


def _growth_base(method: MethodConfig, old: Tensor, kept: Tensor) -> Tensor:
    """The mask growth grows into (its inactive positions are the candidates): the mask after removal, or
    (``grow_into_removed=False``, DSR) the mask before the update, so that just-removed weights are not regrown."""
    return kept if method.grow_into_removed else old


def _grow(
    record: SparseTensor,
    budget: int,
    method: MethodConfig,
    context: UpdateContext,
    old: Tensor,
    kept: Tensor,
    removed_per_block: list[int],
) -> Tensor:
    """Step 3: the mask after growth: the tensor's regrowth split over its blocks, then grown per block."""
    if budget <= 0:
        return kept.clone()
    part = method.growth
    # Growth functions grow into the inactive positions of the mask they are handed; where just-removed positions
    # may not be regrown (DSR) they are still set in the base, and taken out after.
    base = _growth_base(method, old, kept)
    what = f"growth={part.name!r}"
    source = context.read(part.reads, record, what)
    taken = base
    if method.structure is not None:  # positions the structure does not allow are taken too, and given back after
        assert part.score is not None  # (resolve checks it)
        score = _on_span(part.score, record.span, what)(base, source)
        taken = base | ~method.structure.allowed(base, score)
    new = taken.clone()
    budgets = _block_budgets(record, budget, removed_per_block, old, taken, method, context)
    for (rows, span), n in zip(record.blocks(), budgets):
        block_source = source[rows] if isinstance(source, Tensor) else source
        new[rows] = _on_span(part.grow, span, what)(taken[rows], n, block_source)
    if taken is not base:
        new &= ~(taken & ~base)
    return new if method.grow_into_removed else new & ~(old & ~kept)


def _block_budgets(
    record: SparseTensor,
    budget: int,
    removed: list[int],
    old: Tensor,
    base: Tensor,
    method: MethodConfig,
    context: UpdateContext,
) -> list[int]:
    """A tensor's regrowth split over its blocks (one block when gates are ranked jointly)."""
    if len(record.groups) == 1:
        return [budget]
    part = method.gate_redistribution
    blocks = record.blocks()
    active = _block_counts(record, [base] * len(blocks))
    caps = [span.numel - n for (_, span), n in zip(blocks, active)]
    if part.score is None:  # each gate regrows its own count unless the tensor's changed (shared as removals)
        return allocate_counts(budget, removed, caps)
    what = f"gate_redistribution={part.name!r}"
    signal = context.read(part.reads, record, what)
    scores = [
        _on_span(part.score, span, what)(record.param[rows], old[rows], None if signal is None else signal[rows])
        for rows, span in blocks
    ]
    return allocate_counts(budget, scores, caps)


def _apply(
    record: SparseTensor,
    old: Tensor,
    kept: Tensor,
    new: Tensor,
    method: MethodConfig,
    context: UpdateContext,
) -> Tensor:
    """Step 4: take rank 0's outcome, set the mask, zero what restarts, reset the optimizer state; returns the
    tensor's counts (removed, grown, newly active, active, removed by the rule) as one device tensor."""
    if context.synchronize is not None:
        code = kept.to(torch.uint8) + 2 * new.to(torch.uint8)
        context.synchronize(code)
        kept, new = (code & 1).bool(), (code >= 2)
    by_rule = (old & ~kept).count_nonzero()
    if method.removed_and_regrown.keeps:
        kept = kept | (old & new)
    param, mask = record.param, record.mask
    param.mul_(kept.to(param.dtype))
    mask.copy_(new)
    record.mask_as_param.copy_(new)
    reset_optimizer_state(
        context.optimizers,
        record.owner,
        MaskUpdate(old, kept, mask),
        grown_state=method.grown_optimizer_state,
        keep_dense=method.reads_momentum,
        span=record.span,
    )
    return torch.stack(
        [
            (old & ~kept).count_nonzero(),
            (new & ~kept).count_nonzero(),
            (new & ~old).count_nonzero(),
            new.count_nonzero(),
            by_rule,
        ]
    )


def _statistics(
    amount: UpdateAmount,
    method: MethodConfig,
    context: UpdateContext,
    counts: Mapping[str, Tensor],
    expected_removed: int,
) -> UpdateStats:
    """The update's counts read back in one host transfer, and DSR's next threshold."""
    table = dict(zip(counts, torch.stack(list(counts.values())).tolist())) if counts else {}
    removed, grown, newly_active, active, by_rule = ({name: row[k] for name, row in table.items()} for k in range(5))
    threshold = context.threshold
    if method.removal.by_threshold and threshold is not None:
        threshold = topology.adapt_threshold(
            threshold, sum(by_rule.values()), expected_removed, method.threshold_tolerance
        )
    return UpdateStats(amount.prune_rate, removed, grown, newly_active, active, threshold)


def _synchronize_generator(
    generator: torch.Generator, synchronize: Callable[[Tensor], None], device: torch.device
) -> None:
    # Counts that depend on the data (DSR's threshold, redistribution scores) may make ranks draw different
    # amounts of randomness before rank 0's masks are taken: take rank 0's generator state too (on the
    # parameters' device, where the collective backend can send it).
    state = generator.get_state().to(device)
    synchronize(state)
    generator.set_state(state.cpu())
