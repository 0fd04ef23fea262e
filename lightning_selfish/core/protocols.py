"""The small interfaces the library's pieces talk through, declared once.

A callback, an optimizer or a monitor takes part by having these methods or attributes; nothing checks for a
particular class. Every check in the library is ``isinstance(obj, Protocol)`` against one of these (they are
``runtime_checkable``: the check is that the names exist), plus the attribute's value for the capability flags.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_selfish.core.engine import SparseEngine, UpdateStats
    from lightning_selfish.core.optim_state import MaskUpdate

__all__ = [
    "AveragingOptimizer",
    "GradientAsMomentum",
    "KeepsInactiveStateZero",
    "MaskAwareOptimizer",
    "SkipsTopologyUpdates",
    "TopologyListener",
    "keeps_inactive_state_zero",
    "momentum_is_gradient",
]


# --------------------------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------------------------


@runtime_checkable
class TopologyListener(Protocol):
    """A callback that hears about the masks (``TopologyMonitor``, ``MaskHistory``, ``FlopsCallback``).

    The sparsity callback calls it at fit start (``stats=None``: the initial or restored masks) and after every
    topology update, on every callback of the trainer that has it.
    """

    def on_topology_update(
        self, trainer: Any, pl_module: Any, engine: SparseEngine, stats: UpdateStats | None
    ) -> None: ...


@runtime_checkable
class SkipsTopologyUpdates(Protocol):
    """A callback whose next scheduled topology update can be skipped (``SelfishSparsityCallback``).

    ``NonMonotonicTrigger`` calls it when averaging starts: the authors' code does not update the topology in the
    epoch where NT-ASGD switches to averaging.
    """

    def skip_next_update(self) -> None: ...


# --------------------------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------------------------


@runtime_checkable
class MaskAwareOptimizer(Protocol):
    """An optimizer that wants to be told about topology changes (see :mod:`lightning_selfish.core.optim_state`)."""

    def on_mask_update(self, param: Tensor, update: MaskUpdate) -> None: ...


@runtime_checkable
class AveragingOptimizer(Protocol):
    """An optimizer that keeps averaged weights beside the raw ones (``SNTASGD``): what ``NonMonotonicTrigger``
    switches on, validates with and writes into checkpoints."""

    @property
    def averaging(self) -> bool: ...

    def start_averaging(self) -> None: ...

    def restart_averaging(self) -> None: ...

    def swap_averaged(self) -> AbstractContextManager[None]: ...

    def averaged_and_raw(self, param: Tensor) -> tuple[Tensor, Tensor] | None: ...


@runtime_checkable
class KeepsInactiveStateZero(Protocol):
    """Capability flag: the optimizer's own step leaves its state zero at inactive positions (``SNTASGD``), so the
    engine need not re-zero the state after every step (weights are re-zeroed either way)."""

    keeps_inactive_state_zero: bool


@runtime_checkable
class GradientAsMomentum(Protocol):
    """Capability flag: the optimizer has no momentum, and SNFS's "momentum" under it is the dense gradient of the
    step before the update (``SNTASGD``: the paper's "SNFS (SNT-ASGD)" rows)."""

    momentum_is_gradient: bool


def keeps_inactive_state_zero(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, KeepsInactiveStateZero) and bool(optimizer.keeps_inactive_state_zero)


def momentum_is_gradient(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, GradientAsMomentum) and bool(optimizer.momentum_is_gradient)
