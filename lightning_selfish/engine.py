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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_selfish import topology
from lightning_selfish.gates import GateLayout
from lightning_selfish.optim_state import MaskUpdate, reset_optimizer_state, state_tensors_like
from lightning_selfish.redistribution import (
    GATE_SCORES,
    GATE_SIGNALS,
    LAYER_SCORES,
    LAYER_SIGNALS,
    allocate_counts,
    momentum_of,
)

log = logging.getLogger(__name__)

_GATE_MODE_ALIASES = {True: "joint", False: "none"}


def gate_mode(gate_redistribution: bool | str) -> str:
    """``True``/``"joint"``: one ranking over all gates; ``False``/``"none"``: per-gate counts; or a Table 6 score."""
    mode = _GATE_MODE_ALIASES.get(gate_redistribution, gate_redistribution)  # type: ignore[call-overload]
    if mode not in ("joint", "none", *GATE_SCORES):
        raise ValueError(
            f"gate_redistribution must be True, False or one of {['joint', 'none', *GATE_SCORES]}, "
            f"got {gate_redistribution!r}"
        )
    return mode


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


class SparseEngine:
    """Masks for a set of named parameters, enforced in place, updated by removal and growth strategies."""

    def __init__(
        self,
        params: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        gate_layouts: Mapping[str, GateLayout] | None = None,
        gate_redistribution: bool | str = True,
    ) -> None:
        gate_layouts = gate_layouts or {}
        self.gate_redistribution = gate_mode(gate_redistribution)
        self.tensors: dict[str, SparseTensor] = {}
        for name, param in params.items():
            mask = masks[name].to(device=param.device, dtype=torch.bool)
            if mask.shape != param.shape:
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(param.shape)}"
                )
            gates = gate_layouts.get(name)
            groups = [rows for _, rows in gates] if gates and self.gate_redistribution != "joint" else [slice(None)]
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
        init: str = "uniform",
        gate_layouts: Mapping[str, GateLayout] | None = None,
        gate_redistribution: bool | str = True,
    ) -> SparseEngine:
        """Random masks with exact counts (``topology.INIT_BUDGETS[init]``), applied to the weights in place.

        Unless gates are ranked jointly (``gate_redistribution=True``/``"joint"``) every gate is a block of its own
        and starts at exactly the tensor's density.
        """
        gate_layouts = gate_layouts or {}
        mode = gate_mode(gate_redistribution)
        density = 1.0 - sparsity
        if init not in topology.INIT_BUDGETS:
            raise ValueError(f"init must be one of {list(topology.INIT_BUDGETS)}, got {init!r}")
        counts = topology.INIT_BUDGETS[init]({name: p.shape for name, p in params.items()}, density)
        masks = {}
        for name, param in params.items():
            gates = gate_layouts.get(name)
            if not gates or mode == "joint":
                masks[name] = topology.random_mask(param.shape, counts[name], generator)
                continue
            row_numel = param[0].numel()
            sizes = [(rows.stop - rows.start) * row_numel for _, rows in gates]
            if init == "uniform":
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
    def enforce_after_step_(self, optimizer: torch.optim.Optimizer, mask_state: bool = True) -> None:
        """Re-zero the weights this optimizer holds, and (``mask_state``) every state tensor shaped like them."""
        tensors: list[Tensor] = []
        masks: list[Tensor] = []
        for record in self._records_of(optimizer):
            tensors.append(record.param)
            masks.append(record.mask_as_param)
            if not mask_state:
                continue
            for value in state_tensors_like(optimizer, record.param):
                if value.dtype == record.mask_as_param.dtype:
                    tensors.append(value)
                    masks.append(record.mask_as_param)
                else:  # integer counters and the like: rare, not worth a second cached mask
                    value.mul_(record.mask)
        if tensors:
            torch._foreach_mul_(tensors, masks)

    def attach(self, optimizer: torch.optim.Optimizer, mask_state: bool = True) -> None:
        """Re-zero after every real step of ``optimizer`` and tell it the masks (``on_mask_update``).

        A step post-hook fires once per actual ``optimizer.step()``: after clipping of the dense gradient and the
        update, never for a step that mixed precision skipped, and once per accumulated batch group.
        ``mask_state=False`` leaves the optimizer state dense between updates (momentum growth ranks inactive
        positions by their momentum, which must keep accumulating there); weights are re-zeroed either way.
        """
        self._records.pop(id(optimizer), None)
        mask_state = mask_state and not getattr(optimizer, "keeps_inactive_state_zero", False)

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.enforce_after_step_(opt, mask_state)

        self._handles.append(optimizer.register_step_post_hook(after_step))
        for record in self._records_of(optimizer):
            reset_optimizer_state([optimizer], record.param, MaskUpdate(None, record.mask.clone(), record.mask))

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
    # topology update (once per epoch)
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(
        self,
        prune_rate: float,
        generator: torch.Generator,
        removal: str = "magnitude",
        growth: str = "random",
        optimizers: Iterable[torch.optim.Optimizer] = (),
        synchronize: Callable[[Tensor], None] | None = None,
        gradients: Mapping[str, Tensor] | None = None,
        *,
        redistribution: str = "none",
        target_density: float | None = None,
        removed_and_regrown: str = "restart",
        threshold: float | None = None,
        threshold_tolerance: float = 0.02,
    ) -> UpdateStats:
        """One topology update: removal, then growth of exactly as many weights as were removed.

        1. Removal, per block (the whole tensor, or each gate unless gates are ranked jointly): the
           ``ceil(prune_rate * active)`` weights named by ``topology.REMOVAL_STRATEGIES[removal]``; with
           ``target_density`` (dense-to-sparse, GMP) the weights above ``round(target_density * numel)``; with
           ``removal="threshold"`` (DSR) every active weight below ``threshold``, one threshold for all tensors.
        2. Regrowth per tensor: as many as it removed (``redistribution="none"``), or the total removed shared out
           by ``redistribution.LAYER_SCORES[redistribution]`` (exact, capped by each tensor's free room); nothing
           with ``target_density`` or ``growth="none"``.
        3. Inside a tensor, the regrowth goes to its blocks: one block; each gate its own removals
           (``gate_redistribution="none"``); or shared by ``redistribution.GATE_SCORES`` (Table 6 variants).
        4. Growth per block by ``topology.GROWTH_STRATEGIES[growth]``.

        Grown weights start at zero, also one removed and regrown in the same update, unless
        ``removed_and_regrown="keep"`` (the authors' code: such a weight keeps its value and its optimizer state,
        e.g. its SNT-ASGD averaging window). ``synchronize`` (DDP) gets each tensor's outcome encoded as
        ``kept + 2 * new`` in a uint8 tensor and must overwrite it in place with rank 0's, and then the generator
        state likewise, so every rank ends with identical masks and an identical generator whatever its
        floating-point history. ``gradients`` (from :meth:`dense_gradients`) replace the parameters' ``.grad``.
        The returned stats carry DSR's next threshold (``stats.threshold``).
        """
        optimizers = list(optimizers)
        threshold_removal = topology.THRESHOLD_REMOVALS.get(removal)
        if removal != "none" and threshold_removal is None and removal not in topology.REMOVAL_STRATEGIES:
            raise ValueError(
                f"removal must be one of {[*topology.REMOVAL_STRATEGIES, *topology.THRESHOLD_REMOVALS, 'none']}, "
                f"got {removal!r}"
            )
        if growth != "none" and growth not in topology.GROWTH_STRATEGIES:
            raise ValueError(f"growth must be one of {[*topology.GROWTH_STRATEGIES, 'none']}, got {growth!r}")
        if threshold_removal is not None and threshold is None:
            raise ValueError(f"removal={removal!r} needs the current threshold (threshold=...)")
        old = {name: record.mask.clone() for name, record in self.tensors.items()}

        # 1. removal (count-based removal knows its counts; the others read them back, once per block)
        kept: dict[str, Tensor] = {}
        block_removed: dict[str, list[int]] = {}
        expected_removed = 0
        for name, record in self.tensors.items():
            if removal == "none":
                kept[name], block_removed[name] = record.mask.clone(), [0] * len(record.groups)
                continue
            if threshold_removal is None:
                kept[name], block_removed[name] = self._remove_blocks(record, prune_rate, target_density, removal)
                continue
            kept[name] = threshold_removal(record.param, record.mask, threshold)
            gone = old[name] & ~kept[name]
            block_removed[name] = [int(gone[rows].count_nonzero()) for rows in record.groups]
            expected_removed += topology.removal_count(record.active, prune_rate)
        removed = {name: sum(blocks) for name, blocks in block_removed.items()}

        # 2. regrowth per tensor
        if growth == "none" or target_density is not None:
            budgets = dict.fromkeys(self.tensors, 0)
        elif redistribution == "none":
            budgets = removed
        else:
            budgets = self._layer_budgets(redistribution, old, kept, removed, optimizers, gradients)

        # 3-4. regrowth per block, growth, synchronisation, application
        counts: dict[str, Tensor] = {}  # per tensor: removed, grown, newly active, active, removed by the rule
        for name, record in self.tensors.items():
            param, mask = record.param, record.mask
            kept_mask = kept[name]
            new = kept_mask.clone()
            if budgets[name] > 0:
                source = self._growth_input(record, growth, generator, optimizers, gradients)
                blocks = self._block_budgets(
                    record, budgets[name], block_removed[name], old[name], kept_mask, gradients
                )
                for rows, n in zip(record.groups, blocks):
                    block_source = source if isinstance(source, torch.Generator) else source[rows]
                    new[rows] = topology.GROWTH_STRATEGIES[growth](kept_mask[rows], n, block_source)
            if synchronize is not None:
                code = kept_mask.to(torch.uint8) + 2 * new.to(torch.uint8)
                synchronize(code)
                kept_mask, new = (code & 1).bool(), (code >= 2)
            by_rule = (old[name] & ~kept_mask).count_nonzero()
            if removed_and_regrown == "keep":
                kept_mask = kept_mask | (old[name] & new)
            param.mul_(kept_mask.to(param.dtype))
            mask.copy_(new)
            record.mask_as_param.copy_(new)
            reset_optimizer_state(optimizers, param, MaskUpdate(old[name], kept_mask, mask))
            counts[name] = torch.stack(
                [
                    (old[name] & ~kept_mask).count_nonzero(),
                    (new & ~kept_mask).count_nonzero(),
                    (new & ~old[name]).count_nonzero(),
                    new.count_nonzero(),
                    by_rule,
                ]
            )
        if synchronize is not None and self.tensors:
            self._synchronize_generator(generator, synchronize, next(iter(self.tensors.values())).param.device)
        table = dict(zip(counts, torch.stack(list(counts.values())).tolist())) if counts else {}
        stats_removed, grown, newly_active, active, by_rule_removed = (
            {name: row[k] for name, row in table.items()} for k in range(5)
        )
        next_threshold = threshold
        if threshold_removal is not None:
            next_threshold = topology.adapt_threshold(
                threshold, sum(by_rule_removed.values()), expected_removed, threshold_tolerance
            )
        return UpdateStats(prune_rate, stats_removed, grown, newly_active, active, next_threshold)

    def _remove_blocks(
        self, record: SparseTensor, prune_rate: float, target_density: float | None, removal: str
    ) -> tuple[Tensor, list[int]]:
        """Count-based removal per block: ``ceil(prune_rate * active)``, or down to ``target_density``."""
        remove = topology.REMOVAL_STRATEGIES[removal]
        mask = record.mask
        block_active = [int(mask[rows].count_nonzero()) for rows in record.groups]
        if target_density is None:
            counts = [topology.removal_count(n, prune_rate) for n in block_active]
        else:
            excess = max(0, sum(block_active) - topology.uniform_count(mask.numel(), target_density))
            counts = allocate_counts(excess, block_active, block_active)
        kept = mask.clone()
        for rows, n in zip(record.groups, counts):
            kept[rows] = remove(record.param[rows], mask[rows], n)
        return kept, counts

    def _layer_budgets(
        self,
        redistribution: str,
        old: Mapping[str, Tensor],
        kept: Mapping[str, Tensor],
        removed: Mapping[str, int],
        optimizers: list[torch.optim.Optimizer],
        gradients: Mapping[str, Tensor] | None,
    ) -> dict[str, int]:
        """The total removed, shared over tensors by an across-layer score, none above its free room."""
        if redistribution not in LAYER_SCORES:
            raise ValueError(f"redistribution must be one of {['none', *LAYER_SCORES]}, got {redistribution!r}")
        names = list(self.tensors)
        scores = []
        for name in names:
            record = self.tensors[name]
            signal = None
            if LAYER_SIGNALS[redistribution] == "momentum":
                gradient = self._gradient_of(record, gradients, None)
                signal = momentum_of(optimizers, record.param, gradient, name, "redistribution='momentum'")
            scores.append(LAYER_SCORES[redistribution](old[name], kept[name], signal))
        caps = [kept[name].numel() - int(kept[name].count_nonzero()) for name in names]
        return dict(zip(names, allocate_counts(sum(removed.values()), scores, caps)))

    def _block_budgets(
        self,
        record: SparseTensor,
        budget: int,
        removed: list[int],
        old: Tensor,
        kept: Tensor,
        gradients: Mapping[str, Tensor] | None,
    ) -> list[int]:
        """A tensor's regrowth split over its blocks (one block when gates are ranked jointly)."""
        if len(record.groups) == 1:
            return [budget]
        mode = self.gate_redistribution
        caps = [kept[rows].numel() - int(kept[rows].count_nonzero()) for rows in record.groups]
        if mode == "none":  # shared as the removals: each gate regrows its own count unless the tensor's changed
            return allocate_counts(budget, removed, caps)
        signal = None
        if GATE_SIGNALS[mode] == "gradient":
            signal = self._gradient_of(record, gradients, "gate_redistribution='gradient'")
        scores = [
            GATE_SCORES[mode](record.param[rows], old[rows], None if signal is None else signal[rows])
            for rows in record.groups
        ]
        return allocate_counts(budget, scores, caps)

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

    def _growth_input(
        self,
        record: SparseTensor,
        growth: str,
        generator: torch.Generator,
        optimizers: list[torch.optim.Optimizer],
        gradients: Mapping[str, Tensor] | None,
    ) -> Tensor | torch.Generator:
        source = topology.GROWTH_SOURCES[growth]
        if source == "generator":
            return generator
        if source == "gradient":
            return self._gradient_of(record, gradients, f"growth={growth!r}")
        return momentum_of(optimizers, record.param, self._gradient_of(record, gradients, None), record.name)

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
