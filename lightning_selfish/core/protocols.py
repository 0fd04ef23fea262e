"""The small interfaces an optimizer takes part through, declared once (the callbacks' are in
:mod:`lightning_selfish.callbacks.protocols`).

An optimizer takes part by having these methods or attributes; nothing checks for a
particular class. Every check in the library is ``isinstance(obj, Protocol)`` against one of these (they are
``runtime_checkable``: the check is that the names exist), plus the attribute's value for the capability flags.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_selfish.core.types import MaskUpdate

__all__ = [
    "AveragingOptimizer",
    "GradientAsMomentum",
    "KeepsInactiveStateZero",
    "MaskAwareOptimizer",
    "keeps_inactive_state_zero",
    "momentum_is_gradient",
]


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
