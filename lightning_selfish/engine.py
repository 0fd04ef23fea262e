"""The sparse engine: masks of named parameters, their enforcement at every step, and topology updates.

Plain PyTorch, no Lightning: :class:`SparseEngine` holds one live bool mask per sparsified parameter and composes
the pure functions of :mod:`lightning_selfish.topology` per tensor (cell-gate redistribution: one ranking over the
whole stacked tensor) or per gate (the ablation). The Lightning callback only decides *when* things happen.

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

log = logging.getLogger(__name__)

#: Optimizer state entries that hold a momentum, for ``growth="momentum"``, in order of preference.
MOMENTUM_STATE_KEYS = ("momentum_buffer", "exp_avg")


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
        gate_redistribution: bool = True,
    ) -> None:
        gate_layouts = gate_layouts or {}
        self.gate_redistribution = gate_redistribution
        self.tensors: dict[str, SparseTensor] = {}
        for name, param in params.items():
            mask = masks[name].to(device=param.device, dtype=torch.bool)
            if mask.shape != param.shape:
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(param.shape)}"
                )
            gates = gate_layouts.get(name)
            groups = [rows for _, rows in gates] if gates and not gate_redistribution else [slice(None)]
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
        gate_redistribution: bool = True,
    ) -> SparseEngine:
        """Random masks with exact counts (uniform or Erdős–Rényi), applied to the weights in place.

        With ``gate_redistribution=False`` every gate is a block of its own: it starts at exactly the tensor's
        density and keeps its own count for the rest of training.
        """
        gate_layouts = gate_layouts or {}
        density = 1.0 - sparsity
        if init == "uniform":
            counts = {name: topology.uniform_count(p.numel(), density) for name, p in params.items()}
        elif init == "er":
            counts = topology.erdos_renyi_counts({name: p.shape for name, p in params.items()}, density)
        else:
            raise ValueError(f"init must be 'uniform' or 'er', got {init!r}")
        masks = {}
        for name, param in params.items():
            gates = gate_layouts.get(name)
            if not gates or gate_redistribution:
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
        engine = cls(params, masks, gate_layouts, gate_redistribution)
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
    ) -> UpdateStats:
        """Remove ``ceil(prune_rate * active)`` weights per block and regrow as many; counts stay exact.

        Grown weights start at zero, also one removed and regrown in the same update. ``synchronize`` (DDP) gets
        each tensor's outcome encoded as ``kept + 2 * new`` in a uint8 tensor and must overwrite it in place with
        rank 0's, so every rank ends with identical masks whatever its floating-point history. ``gradients``
        (from :meth:`dense_gradients`) are used by ``growth="gradient"`` instead of the parameters' ``.grad``.
        """
        if removal not in topology.REMOVAL_STRATEGIES:
            raise ValueError(f"removal must be one of {sorted(topology.REMOVAL_STRATEGIES)}, got {removal!r}")
        remove = topology.REMOVAL_STRATEGIES[removal]
        optimizers = list(optimizers)
        counts: dict[str, Tensor] = {}  # per tensor: removed, grown, newly active, active; read back once at the end
        for name, record in self.tensors.items():
            param, mask = record.param, record.mask
            growth_input = self._growth_input(record, growth, generator, optimizers, gradients)
            kept = mask.clone()
            new = mask.clone()
            for rows in record.groups:
                block = mask[rows]
                n = topology.removal_count(int(block.count_nonzero()), prune_rate)
                kept[rows] = remove(param[rows], block, n)
                source = growth_input if isinstance(growth_input, torch.Generator) else growth_input[rows]
                new[rows] = topology.GROWTH_STRATEGIES[growth](kept[rows], n, source)
            if synchronize is not None:
                code = kept.to(torch.uint8) + 2 * new.to(torch.uint8)
                synchronize(code)
                kept, new = (code & 1).bool(), (code >= 2)
            old = mask.clone()
            param.mul_(kept.to(param.dtype))
            mask.copy_(new)
            record.mask_as_param.copy_(new)
            reset_optimizer_state(optimizers, param, MaskUpdate(old, kept, mask))
            counts[name] = torch.stack(
                [
                    (old & ~kept).count_nonzero(),
                    (new & ~kept).count_nonzero(),
                    (new & ~old).count_nonzero(),
                    new.count_nonzero(),
                ]
            )
        table = dict(zip(counts, torch.stack(list(counts.values())).tolist())) if counts else {}
        removed, grown, newly_active, active = ({name: row[k] for name, row in table.items()} for k in range(4))
        return UpdateStats(prune_rate, removed, grown, newly_active, active)

    @staticmethod
    def _growth_input(
        record: SparseTensor,
        growth: str,
        generator: torch.Generator,
        optimizers: list[torch.optim.Optimizer],
        gradients: Mapping[str, Tensor] | None,
    ) -> Tensor | torch.Generator:
        if growth == "random":
            return generator
        if growth == "gradient":
            if gradients is not None and record.name in gradients:
                return gradients[record.name].to(record.param.device)
            if record.param.grad is None:
                raise ValueError(
                    f"growth='gradient' needs the dense gradient of {record.name!r}, but it has none at the "
                    "topology update (was the gradient freed by zero_grad(set_to_none=True)?)"
                )
            return record.param.grad
        if growth == "momentum":
            for optimizer in optimizers:
                state = optimizer.state.get(record.param, {})
                for key in MOMENTUM_STATE_KEYS:
                    if isinstance(state.get(key), Tensor):
                        return state[key]
            raise ValueError(
                f"growth='momentum' needs a momentum buffer for {record.name!r} ({' or '.join(MOMENTUM_STATE_KEYS)} "
                f"in the optimizer state), found none: use SGD with momentum or Adam, or another growth strategy"
            )
        raise ValueError(f"growth must be one of {sorted(topology.GROWTH_STRATEGIES)}, got {growth!r}")

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
