"""The sparse engine: masks of named parameters, their enforcement at every step, and topology updates.

Plain PyTorch, no Lightning: :class:`SparseEngine` holds one live bool mask per sparsified parameter and composes
the pure functions of :mod:`lightning_selfish.topology` (removal, growth) and :mod:`lightning_selfish.redistribution`
(how many each tensor and each gate regrows) per tensor (cell-gate redistribution: one ranking over the whole
stacked tensor) or per gate. Every method of :mod:`lightning_selfish.methods` is one combination of their names.
The Lightning callback only decides *when* things happen.

Hot path (every optimizer step): one ``torch._foreach_mul_`` of the parameters, and of the optimizer state tensors
shaped like them, by masks kept in the parameters' dtype on their device. No host sync, no boolean indexing, and the
parameters are changed in place, so cuDNN's flat LSTM weight buffer stays valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_selfish import topology
from lightning_selfish.gates import GateLayout
from lightning_selfish.optim_state import MaskUpdate, dense_state_keys, reset_optimizer_state, state_items_like
from lightning_selfish.parts import GateRedistribution, Growth, Init, MethodConfig, UpdateAmount
from lightning_selfish.protocols import keeps_inactive_state_zero
from lightning_selfish.redistribution import allocate_counts, momentum_of

log = logging.getLogger(__name__)


def gate_part(gate_redistribution: GateRedistribution | bool | str) -> GateRedistribution:
    """The gate handling part: one given, or ``True``/``"joint"`` (one ranking over all gates), ``False``/``"none"``
    (per-gate counts), or a registered Table 6 score name."""
    from lightning_selfish.methods import GATE_REDISTRIBUTIONS

    if isinstance(gate_redistribution, GateRedistribution):
        return gate_redistribution
    name = {True: "joint", False: "none"}.get(gate_redistribution, gate_redistribution)  # type: ignore[call-overload]
    if name not in GATE_REDISTRIBUTIONS:
        raise ValueError(
            f"gate_redistribution must be True, False or one of {list(GATE_REDISTRIBUTIONS)}, "
            f"got {gate_redistribution!r}"
        )
    return GATE_REDISTRIBUTIONS[name]


@dataclass
class SparseTensor:
    """One sparsified parameter: its live masks and the row blocks that removal and growth work on."""

    name: str
    param: Tensor
    mask: Tensor  # bool, live: updated in place
    groups: list[slice]  # one slice over all rows (joint ranking) or one per gate
    gates: GateLayout | None = None
    mask_as_param: Tensor = field(init=False)  # the mask in the parameter's dtype, for fast multiplies

    def __post_init__(self) -> None:
        self.mask_as_param = self.mask.to(self.param.dtype)

    @property
    def active(self) -> int:
        return int(self.mask.count_nonzero())


@dataclass(frozen=True)
class UpdateStats:
    """What one topology update did, per tensor and in total."""

    prune_rate: float
    removed: dict[str, int]
    grown: dict[str, int]
    newly_active: dict[str, int]  # active now, inactive before the update (regrown-in-place ones not counted)
    active: dict[str, int]
    threshold: float | None = None  # DSR: the global threshold for the next update

    @property
    def total_removed(self) -> int:
        return sum(self.removed.values())

    @property
    def total_grown(self) -> int:
        return sum(self.grown.values())

    @property
    def changed_fraction(self) -> dict[str, float]:
        """Per tensor: the share of its active weights that were not active before the update."""
        return {name: self.newly_active[name] / n if n else 0.0 for name, n in self.active.items()}

    @property
    def total_changed_fraction(self) -> float:
        active = sum(self.active.values())
        return sum(self.newly_active.values()) / active if active else 0.0


@dataclass
class UpdateContext:
    """What one update reads besides the method: the run's random generator, the optimizers (state to reset,
    momentum to read), the dense gradients of the step before (``None``: the parameters' ``.grad``), DDP's
    ``synchronize`` (overwrites a tensor in place with rank 0's; ``None`` on one process) and DSR's threshold."""

    generator: torch.Generator
    optimizers: Sequence[torch.optim.Optimizer] = ()
    gradients: Mapping[str, Tensor] | None = None
    synchronize: Callable[[Tensor], None] | None = None
    threshold: float | None = None


@dataclass
class _Removed:
    kept: dict[str, Tensor]  # per tensor: the mask after removal
    per_block: dict[str, list[int]]  # per tensor: how many each block removed
    expected: int  # threshold removal: the count the prune rate asked for (DSR's threshold adapts to it)


class SparseEngine:
    """Masks for a set of named parameters, enforced in place, updated by removal and growth strategies."""

    def __init__(
        self,
        params: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        gate_layouts: Mapping[str, GateLayout] | None = None,
        gate_redistribution: GateRedistribution | bool | str = True,
    ) -> None:
        gate_layouts = gate_layouts or {}
        self.gate_redistribution = gate_part(gate_redistribution)
        self.tensors: dict[str, SparseTensor] = {}
        for name, param in params.items():
            mask = masks[name].to(device=param.device, dtype=torch.bool)
            if mask.shape != param.shape:
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(param.shape)}"
                )
            gates = gate_layouts.get(name)
            groups = [rows for _, rows in gates] if gates and not self.gate_redistribution.joint else [slice(None)]
            self.tensors[name] = SparseTensor(name, param, mask, groups, gates)
        self._handles: list[RemovableHandle] = []
        self._records: dict[int, list[SparseTensor]] = {}  # per optimizer: the sparse tensors it holds

    # ----------------------------------------------------------------------------------------------------------
    # construction
    # ----------------------------------------------------------------------------------------------------------

    @classmethod
    def initialize(
        cls,
        params: Mapping[str, Tensor],
        sparsity: float,
        generator: torch.Generator,
        init: Init | str = "uniform",
        gate_layouts: Mapping[str, GateLayout] | None = None,
        gate_redistribution: GateRedistribution | bool | str = True,
    ) -> SparseEngine:
        """Random masks with exact counts (``init.budgets``), applied to the weights in place.

        Unless gates are ranked jointly every gate is a block of its own and starts at exactly the tensor's density
        (uniform init) or its share of the tensor's budget by size.
        """
        from lightning_selfish.methods import INITS

        gate_layouts = gate_layouts or {}
        mode = gate_part(gate_redistribution)
        density = 1.0 - sparsity
        if isinstance(init, str):
            if init not in INITS:
                raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
            init = INITS[init]
        counts = init.budgets({name: p.shape for name, p in params.items()}, density)
        masks = {}
        for name, param in params.items():
            gates = gate_layouts.get(name)
            if not gates or mode.joint:
                masks[name] = topology.random_mask(param.shape, counts[name], generator)
                continue
            row_numel = param[0].numel()
            sizes = [(rows.stop - rows.start) * row_numel for _, rows in gates]
            if init.budgets is topology.uniform_counts:
                gate_counts = [topology.uniform_count(size, density) for size in sizes]
            else:
                gate_counts = topology.split_count(counts[name], sizes)
            masks[name] = torch.cat(
                [
                    topology.random_mask((rows.stop - rows.start, *param.shape[1:]), count, generator)
                    for (_, rows), count in zip(gates, gate_counts)
                ]
            )
        engine = cls(params, masks, gate_layouts, mode)
        engine.apply_masks_()
        return engine

    # ----------------------------------------------------------------------------------------------------------
    # enforcement (hot path)
    # ----------------------------------------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, Tensor]:
        return {name: t.mask for name, t in self.tensors.items()}

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero every inactive weight, in place."""
        tensors = list(self.tensors.values())
        torch._foreach_mul_([t.param for t in tensors], [t.mask_as_param for t in tensors])

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of inactive weights (the stricter order: before clipping and the step)."""
        pairs = [(t.param.grad, t.mask_as_param) for t in self.tensors.values() if t.param.grad is not None]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    @torch.no_grad()
    def dense_gradients(self) -> dict[str, Tensor]:
        """A copy of the current (dense) gradients, for gradient growth at a later update."""
        return {name: t.param.grad.detach().clone() for name, t in self.tensors.items() if t.param.grad is not None}

    @torch.no_grad()
    def copy_dense_gradients_(self, into: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """Copy the current gradients into ``into`` (allocated at the first call), one ``_foreach_copy_``.

        The running copy for updates whose preceding step is not known in advance (epoch updates over a loader
        without a length): one pass over the sparsified weights' gradients per step, no allocation after the first.
        """
        pairs = [(name, t.param.grad) for name, t in self.tensors.items() if t.param.grad is not None]
        if into is None or any(
            name not in into or into[name].shape != grad.shape or into[name].device != grad.device
            for name, grad in pairs
        ):  # first call, or buffers restored from a checkpoint onto another device
            return self.dense_gradients()
        if pairs:
            torch._foreach_copy_([into[name] for name, _ in pairs], [grad for _, grad in pairs])
        return into

    @torch.no_grad()
    def enforce_after_step_(
        self, optimizer: torch.optim.Optimizer, mask_state: bool = True, dense_keys: frozenset[str] = frozenset()
    ) -> None:
        """Re-zero the weights this optimizer holds, and (``mask_state``) every state tensor shaped like them but
        those named in ``dense_keys`` (``grown_optimizer_state="dense"``: Adam's moments)."""
        tensors: list[Tensor] = []
        masks: list[Tensor] = []
        for record in self._records_of(optimizer):
            tensors.append(record.param)
            masks.append(record.mask_as_param)
            if not mask_state:
                continue
            for key, value in state_items_like(optimizer, record.param):
                if key in dense_keys:
                    continue
                if value.dtype == record.mask_as_param.dtype:
                    tensors.append(value)
                    masks.append(record.mask_as_param)
                else:  # integer counters and the like: rare, not worth a second cached mask
                    value.mul_(record.mask)
        if tensors:
            torch._foreach_mul_(tensors, masks)

    def attach(self, optimizer: torch.optim.Optimizer, mask_state: bool = True, grown_state: str = "zero") -> None:
        """Re-zero after every real step of ``optimizer`` and tell it the masks (``on_mask_update``).

        A step post-hook fires once per actual ``optimizer.step()``: after clipping of the dense gradient and the
        update, never for a step that mixed precision skipped, and once per accumulated batch group.
        ``mask_state=False`` leaves the optimizer state dense between updates (momentum growth ranks inactive
        positions by their momentum, which must keep accumulating there); weights are re-zeroed either way.
        ``grown_state`` is the method's ``grown_optimizer_state`` (:mod:`lightning_selfish.optim_state`).
        """
        self._records.pop(id(optimizer), None)
        mask_state = mask_state and not keeps_inactive_state_zero(optimizer)
        dense_keys = dense_state_keys(grown_state)

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.enforce_after_step_(opt, mask_state, dense_keys)

        self._handles.append(optimizer.register_step_post_hook(after_step))
        for record in self._records_of(optimizer):
            reset_optimizer_state(
                [optimizer], record.param, MaskUpdate(None, record.mask.clone(), record.mask), grown_state
            )

    def detach(self) -> None:
        """Remove every hook installed by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    def _records_of(self, optimizer: torch.optim.Optimizer) -> list[SparseTensor]:
        records = self._records.get(id(optimizer))
        if records is None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            records = [t for t in self.tensors.values() if id(t.param) in held]
            self._records[id(optimizer)] = records
        return records

    # ----------------------------------------------------------------------------------------------------------
    # topology update (at every update the schedule asks for: an epoch boundary or a step on the cadence)
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, amount: UpdateAmount, method: MethodConfig, context: UpdateContext) -> UpdateStats:
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
        ``method.removed_and_regrown == "keep"`` (the authors' code, RigL: such a weight keeps its value and its
        optimizer state, e.g. its SNT-ASGD averaging window). The returned stats carry DSR's next threshold.
        """
        old = {name: record.mask.clone() for name, record in self.tensors.items()}
        removal = self._remove(amount, method, context, old)
        budgets = self._tensor_budgets(amount, method, context, old, removal)
        counts: dict[str, Tensor] = {}
        for name, record in self.tensors.items():
            kept = removal.kept[name]
            new = self._grow(record, budgets[name], method, context, old[name], kept, removal.per_block[name])
            counts[name] = self._apply(record, old[name], kept, new, method, context)
        if context.synchronize is not None and self.tensors:
            device = next(iter(self.tensors.values())).param.device
            self._synchronize_generator(context.generator, context.synchronize, device)
        return self._statistics(amount, method, context, counts, removal.expected)

    def _remove(
        self, amount: UpdateAmount, method: MethodConfig, context: UpdateContext, old: Mapping[str, Tensor]
    ) -> _Removed:
        """Step 1: the mask after removal per tensor, the count removed per block, and (DSR) the count expected."""
        removed = _Removed({}, {}, 0)
        part = method.removal
        for name, record in self.tensors.items():
            if not part.removes:
                removed.kept[name], removed.per_block[name] = record.mask.clone(), [0] * len(record.groups)
            elif part.by_threshold:  # (the count-based ones know their counts; these read them back, once per block)
                if context.threshold is None:
                    raise ValueError(f"removal={part.name!r} needs the current threshold (UpdateContext.threshold)")
                removed.kept[name] = part.remove(record.param, record.mask, context.threshold)
                gone = old[name] & ~removed.kept[name]
                removed.per_block[name] = [int(gone[rows].count_nonzero()) for rows in record.groups]
                removed.expected += topology.removal_count(record.active, amount.prune_rate, method.removal_rounding)
            else:
                removed.kept[name], removed.per_block[name] = self._remove_blocks(record, amount, method)
        return removed

    def _remove_blocks(
        self, record: SparseTensor, amount: UpdateAmount, method: MethodConfig
    ) -> tuple[Tensor, list[int]]:
        """Count-based removal per block: ``ceil(prune_rate * active)``, or down to ``target_density``."""
        mask = record.mask
        block_active = [int(mask[rows].count_nonzero()) for rows in record.groups]
        if amount.target_density is None:
            counts = [topology.removal_count(n, amount.prune_rate, method.removal_rounding) for n in block_active]
        else:
            excess = max(0, sum(block_active) - topology.uniform_count(mask.numel(), amount.target_density))
            counts = allocate_counts(excess, block_active, block_active)
        kept = mask.clone()
        for rows, n in zip(record.groups, counts):
            kept[rows] = method.removal.remove(record.param[rows], mask[rows], n)
        return kept, counts

    def _tensor_budgets(
        self,
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
            return dict.fromkeys(self.tensors, 0)
        part = method.redistribution
        if part.score is None:
            return totals
        names = list(self.tensors)
        scores = []
        for name in names:
            record = self.tensors[name]
            signal = None
            if part.reads == "momentum":
                gradient = self._gradient_of(record, context.gradients, None)
                signal = momentum_of(context.optimizers, record.param, gradient, name, f"redistribution={part.name!r}")
            scores.append(part.score(old[name], removed.kept[name], signal))
        candidates = {name: self._candidates(method, old[name], removed.kept[name]) for name in names}
        caps = [int(candidates[name].count_nonzero()) for name in names]
        return dict(zip(names, allocate_counts(sum(totals.values()), scores, caps)))

    @staticmethod
    def _candidates(method: MethodConfig, old: Tensor, kept: Tensor) -> Tensor:
        """Where growth may go: every position inactive after removal, or (``grow_into_removed=False``, DSR) only
        those inactive before the update."""
        return ~kept if method.grow_into_removed else ~old

    def _grow(
        self,
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
        # Growth functions grow into the inactive positions of the mask they are handed: hand them the mask with
        # the just-removed positions still set where those may not be regrown (DSR), and take those out after.
        base = kept if method.grow_into_removed else old
        source = self._growth_input(record, part, context)
        new = base.clone()
        for rows, n in zip(record.groups, self._block_budgets(record, budget, removed_per_block, old, base, context)):
            block_source = source if isinstance(source, torch.Generator) else source[rows]
            new[rows] = part.grow(base[rows], n, block_source)
        return new if method.grow_into_removed else new & ~(old & ~kept)

    def _block_budgets(
        self,
        record: SparseTensor,
        budget: int,
        removed: list[int],
        old: Tensor,
        base: Tensor,
        context: UpdateContext,
    ) -> list[int]:
        """A tensor's regrowth split over its blocks (one block when gates are ranked jointly)."""
        if len(record.groups) == 1:
            return [budget]
        part = self.gate_redistribution
        caps = [base[rows].numel() - int(base[rows].count_nonzero()) for rows in record.groups]
        if part.score is None:  # each gate regrows its own count unless the tensor's changed (shared as removals)
            return allocate_counts(budget, removed, caps)
        signal = None
        if part.reads == "gradient":
            signal = self._gradient_of(record, context.gradients, f"gate_redistribution={part.name!r}")
        scores = [
            part.score(record.param[rows], old[rows], None if signal is None else signal[rows])
            for rows in record.groups
        ]
        return allocate_counts(budget, scores, caps)

    def _apply(
        self,
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
        if method.removed_and_regrown == "keep":
            kept = kept | (old & new)
        param, mask = record.param, record.mask
        param.mul_(kept.to(param.dtype))
        mask.copy_(new)
        record.mask_as_param.copy_(new)
        reset_optimizer_state(
            context.optimizers,
            param,
            MaskUpdate(old, kept, mask),
            grown_state=method.grown_optimizer_state,
            keep_dense=method.reads_momentum,
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

    @staticmethod
    def _statistics(
        amount: UpdateAmount,
        method: MethodConfig,
        context: UpdateContext,
        counts: Mapping[str, Tensor],
        expected_removed: int,
    ) -> UpdateStats:
        """The update's counts read back in one host transfer, and DSR's next threshold."""
        table = dict(zip(counts, torch.stack(list(counts.values())).tolist())) if counts else {}
        removed, grown, newly_active, active, by_rule = (
            {name: row[k] for name, row in table.items()} for k in range(5)
        )
        threshold = context.threshold
        if method.removal.by_threshold and threshold is not None:
            threshold = topology.adapt_threshold(
                threshold, sum(by_rule.values()), expected_removed, method.threshold_tolerance
            )
        return UpdateStats(amount.prune_rate, removed, grown, newly_active, active, threshold)

    @staticmethod
    def _synchronize_generator(
        generator: torch.Generator, synchronize: Callable[[Tensor], None], device: torch.device
    ) -> None:
        # Counts that depend on the data (DSR's threshold, redistribution scores) may make ranks draw different
        # amounts of randomness before rank 0's masks are taken: take rank 0's generator state too (on the
        # parameters' device, where the collective backend can send it).
        state = generator.get_state().to(device)
        synchronize(state)
        generator.set_state(state.cpu())

    @staticmethod
    def _gradient_of(record: SparseTensor, gradients: Mapping[str, Tensor] | None, what: str | None) -> Tensor | None:
        if gradients is not None and record.name in gradients:
            return gradients[record.name].to(record.param.device)
        if record.param.grad is not None:
            return record.param.grad
        if what is None:
            return None
        raise ValueError(
            f"{what} needs the dense gradient of {record.name!r}, but it has none at the topology update (was the "
            "gradient freed by zero_grad(set_to_none=True)?)"
        )

    def _growth_input(self, record: SparseTensor, part: Growth, context: UpdateContext) -> Tensor | torch.Generator:
        if part.reads == "generator":
            return context.generator
        if part.reads == "gradient":
            return self._gradient_of(record, context.gradients, f"growth={part.name!r}")
        gradient = self._gradient_of(record, context.gradients, None)
        return momentum_of(context.optimizers, record.param, gradient, record.name, f"growth={part.name!r}")

    # ----------------------------------------------------------------------------------------------------------
    # monitoring
    # ----------------------------------------------------------------------------------------------------------

    def sparsity_report(self) -> dict[str, float]:
        """Sparsity per tensor (``name``), per gate (``name/gate``) and over all sparsified tensors (``overall``)."""
        report: dict[str, float] = {}
        active_total = numel_total = 0
        for name, record in self.tensors.items():
            active = int(record.mask.count_nonzero())
            active_total += active
            numel_total += record.mask.numel()
            report[name] = 1.0 - active / record.mask.numel()
            for gate, rows in record.gates or []:
                block = record.mask[rows]
                report[f"{name}/{gate}"] = 1.0 - int(block.count_nonzero()) / block.numel()
        report["overall"] = 1.0 - active_total / numel_total if numel_total else 0.0
        return report

    def active_counts(self) -> dict[str, int]:
        return {name: record.active for name, record in self.tensors.items()}
