"""The sparse engine: masks of named parameters and their enforcement at every step; topology updates in steps.

Plain PyTorch, no Lightning: :class:`SparseEngine` holds one live bool mask per sparsified parameter (in blocks: the
whole tensor, or each gate of a stacked recurrent tensor when gates are not ranked jointly), re-zeroes weights and
optimizer state after every optimizer step, and runs a method's topology update
(:func:`lightning_selfish.core.update.topology_update`: remove, budget, grow, apply). The Lightning callback only
decides *when* things happen.

Hot path (every optimizer step): one ``torch._foreach_mul_`` of the parameters, and of the optimizer state tensors
shaped like them, by masks kept in the parameters' dtype on their device. No host sync, no boolean indexing, and the
parameters are changed in place, so cuDNN's flat LSTM weight buffer stays valid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_selfish.core.gates import GateLayout
from lightning_selfish.core.masks import SparseTensor
from lightning_selfish.core.optim_state import dense_state_keys, reset_optimizer_state, state_items_like
from lightning_selfish.core.protocols import keeps_inactive_state_zero
from lightning_selfish.core.sharding import local_tensor, row_shard, whole_copy
from lightning_selfish.core.signals import UpdateContext
from lightning_selfish.core.types import MaskUpdate, UpdateStats
from lightning_selfish.core.update import topology_update
from lightning_selfish.method import catalogue, topology
from lightning_selfish.method.parts import (
    GateRedistribution,
    GrownState,
    Init,
    MethodConfig,
    Structure,
    UpdateAmount,
)

__all__ = ["SparseEngine", "SparseTensor", "UpdateContext", "UpdateStats", "update_summary"]

log = logging.getLogger(__name__)


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
        joint = catalogue.part("gate_redistribution", gate_redistribution).joint
        self.tensors: dict[str, SparseTensor] = {}
        for name, param in params.items():
            local, shard = local_tensor(param), row_shard(param)
            mask = masks[name].to(device=local.device, dtype=torch.bool)
            if mask.shape != local.shape:
                held = "" if local is param else f" (this rank's rows of the sharded {tuple(param.shape)})"
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(local.shape)}{held}"
                )
            gates = gate_layouts.get(name)
            groups = [rows for _, rows in gates] if gates and not joint else [slice(None)]
            self.tensors[name] = SparseTensor(name, local, mask, groups, gates, owner=param, shard=shard)
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
        structure: Structure | None = None,
    ) -> SparseEngine:
        """Random masks with exact counts (``init.budgets``), applied to the weights in place.

        Unless gates are ranked jointly every gate is a block of its own and starts at exactly the tensor's density
        (uniform init) or its share of the tensor's budget by size. A ``structure`` (N:M) draws its own masks.
        A parameter sharded by rows (FSDP2) gets its rows of the whole tensor's mask: every rank draws the whole
        mask from the same generator state (once, at the start of a run), so the masks do not depend on the number
        of ranks.
        """
        gate_layouts = gate_layouts or {}
        mode = catalogue.part("gate_redistribution", gate_redistribution)
        init = catalogue.part("init", init)
        density = 1.0 - sparsity
        if structure is not None and abs(density - structure.density) > 1e-9:
            raise ValueError(f"structure={structure.name!r} draws masks at density {structure.density}, not {density}")
        counts = init.budgets({name: p.shape for name, p in params.items()}, density)
        masks = {}
        for name, param in params.items():
            gates = gate_layouts.get(name)
            if structure is not None:
                masks[name] = structure.initial_mask(param.shape, generator)
                continue
            if not gates or mode.joint:
                masks[name] = topology.random_mask(param.shape, counts[name], generator)
                continue
            row_numel = math.prod(param.shape[1:])
            sizes = [(rows.stop - rows.start) * row_numel for _, rows in gates]
            if init.block_budgets is None:
                gate_counts = topology.split_count(counts[name], sizes)
            else:
                gate_counts = init.block_budgets(counts[name], sizes, density)
            masks[name] = torch.cat(
                [
                    topology.random_mask((rows.stop - rows.start, *param.shape[1:]), count, generator)
                    for (_, rows), count in zip(gates, gate_counts)
                ]
            )
        local = {}
        for name, param in params.items():
            shard = row_shard(param)
            local[name] = masks[name][shard.row_start : shard.row_start + shard.rows]
        engine = cls(params, local, gate_layouts, mode)
        engine.apply_masks_()
        return engine

    # ----------------------------------------------------------------------------------------------------------
    # enforcement (hot path)
    # ----------------------------------------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, Tensor]:
        """The live masks: of a sharded parameter, this rank's rows."""
        return {name: t.mask for name, t in self.tensors.items()}

    def whole_masks(self) -> dict[str, Tensor]:
        """Copies of the whole masks on the CPU, as a checkpoint holds them. Of a parameter sharded over ranks, the
        ranks' rows are gathered (one bool per weight: at checkpoint time only; every rank calls this)."""
        return {name: whole_copy(t.mask, t.owner) for name, t in self.tensors.items()}

    @property
    def sharded(self) -> bool:
        """Whether some tensor is split over ranks (its masks are each rank's rows; counts are summed over ranks)."""
        return any(t.split for t in self.tensors.values())

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero every inactive weight, in place."""
        tensors = list(self.tensors.values())
        torch._foreach_mul_([t.param for t in tensors], [t.mask_as_param for t in tensors])

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of inactive weights (the stricter order: before clipping and the step)."""
        pairs = [
            (local_tensor(t.owner.grad), t.mask_as_param) for t in self.tensors.values() if t.owner.grad is not None
        ]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    @torch.no_grad()
    def dense_gradients(self) -> dict[str, Tensor]:
        """A copy of the current (dense) gradients, for gradient growth at a later update."""
        return {
            name: local_tensor(t.owner.grad).detach().clone()
            for name, t in self.tensors.items()
            if t.owner.grad is not None
        }

    @torch.no_grad()
    def copy_dense_gradients_(self, into: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """Copy the current gradients into ``into`` (allocated at the first call), one ``_foreach_copy_``.

        The running copy for updates whose preceding step is not known in advance (epoch updates over a loader
        without a length): one pass over the sparsified weights' gradients per step, no allocation after the first.
        """
        pairs = [(name, local_tensor(t.owner.grad)) for name, t in self.tensors.items() if t.owner.grad is not None]
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
            for key, value in state_items_like(optimizer, record.owner):
                if key in dense_keys:
                    continue
                if value.dtype == record.mask_as_param.dtype:
                    tensors.append(value)
                    masks.append(record.mask_as_param)
                else:  # integer counters and the like: rare, not worth a second cached mask
                    value.mul_(record.mask)
        if tensors:
            torch._foreach_mul_(tensors, masks)

    def attach(
        self, optimizer: torch.optim.Optimizer, mask_state: bool = True, grown_state: GrownState | str = GrownState.ZERO
    ) -> None:
        """Re-zero after every real step of ``optimizer`` and tell it the masks (``on_mask_update``).

        A step post-hook fires once per actual ``optimizer.step()``: after clipping of the dense gradient and the
        update, never for a step that mixed precision skipped, and once per accumulated batch group.
        ``mask_state=False`` leaves the optimizer state dense between updates (momentum growth ranks inactive
        positions by their momentum, which must keep accumulating there); weights are re-zeroed either way.
        ``grown_state`` is the method's ``grown_optimizer_state`` (:mod:`lightning_selfish.core.optim_state`).
        """
        self._records.pop(id(optimizer), None)
        mask_state = mask_state and not keeps_inactive_state_zero(optimizer)
        dense_keys = dense_state_keys(grown_state)

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.enforce_after_step_(opt, mask_state, dense_keys)

        self._handles.append(optimizer.register_step_post_hook(after_step))
        for record in self._records_of(optimizer):
            reset_optimizer_state(
                [optimizer],
                record.owner,
                MaskUpdate(None, record.mask.clone(), record.mask),
                grown_state,
                span=record.span,
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
            records = [t for t in self.tensors.values() if id(t.owner) in held]
            self._records[id(optimizer)] = records
        return records

    # ----------------------------------------------------------------------------------------------------------
    # topology update (lightning_selfish.core.update: remove, budget, grow, apply, statistics)
    # ----------------------------------------------------------------------------------------------------------

    def update(self, amount: UpdateAmount, method: MethodConfig, context: UpdateContext) -> UpdateStats:
        """One topology update of these masks by ``method`` (:func:`lightning_selfish.core.update.topology_update`)."""
        joint = method.gate_redistribution.joint
        if any(t.gates and (len(t.groups) == 1) != joint for t in self.tensors.values()):
            ranks = "jointly over the gates" if joint else "per gate"
            raise ValueError(
                f"the method's gate_redistribution={method.gate_redistribution.name!r} ranks {ranks}, the engine's "
                "masks were built for the other: build the engine with the method's gate part"
            )
        return topology_update(self.tensors, amount, method, context)

    # ----------------------------------------------------------------------------------------------------------
    # monitoring
    # ----------------------------------------------------------------------------------------------------------

    def sparsity_report(self) -> dict[str, float]:
        """Sparsity per tensor (``name``), per gate (``name/gate``) and over all sparsified tensors (``overall``).

        Of the whole tensors: with parameters sharded over ranks, every rank calls this (the counts are summed).
        """
        report: dict[str, float] = {}
        active_total = numel_total = 0
        for name, record in self.tensors.items():
            assert record.shard is not None
            gates = record.gates or []
            blocks = [record.shard.block(rows) for _, rows in gates]
            parts = [record.mask.count_nonzero()] + [record.mask[rows].count_nonzero() for rows, _ in blocks]
            counts = record.span.sum_(torch.stack(parts)).tolist()
            active_total += counts[0]
            numel_total += record.numel
            report[name] = 1.0 - counts[0] / record.numel
            for (gate, _), (_, span), active in zip(gates, blocks, counts[1:]):
                report[f"{name}/{gate}"] = 1.0 - active / span.numel
        report["overall"] = 1.0 - active_total / numel_total if numel_total else 0.0
        return report

    def active_counts(self) -> dict[str, int]:
        return {name: record.active for name, record in self.tensors.items()}


def update_summary(engine: SparseEngine, stats: UpdateStats, number: int) -> str:
    """The per-tensor, per-gate text of update ``number`` (what ``verbose=True`` prints)."""
    report = engine.sparsity_report()
    lines = [
        f"topology update {number}: prune rate {stats.prune_rate:.4f}, "
        f"removed {stats.total_removed}, grown {stats.total_grown}, overall sparsity {report['overall']:.4f}"
    ]
    for name, record in engine.tensors.items():
        gates = ", ".join(f"{gate} {report[f'{name}/{gate}']:.3f}" for gate, _ in record.gates or [])
        lines.append(
            f"  {name}: sparsity {report[name]:.4f}, changed {stats.changed_fraction[name]:.3f}"
            + (f" | gates: {gates}" if gates else "")
        )
    return "\n".join(lines)
