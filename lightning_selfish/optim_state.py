"""How a topology change reaches an optimizer.

After every topology update (and once when masks are first attached) the sparsity engine

1. multiplies every optimizer state tensor shaped like a sparsified parameter (momentum buffers, Adam moments,
   averages, counters) by ``update.kept``: removed positions are zeroed and grown positions start from a fresh
   (zero) state, whatever the optimizer;
2. then, if the optimizer defines ``on_mask_update(param, update)``, calls it with a :class:`MaskUpdate`, so an
   optimizer that needs the topology itself (``SNTASGD`` averages each weight over its own lifetime) can react.

That method is the whole protocol; it is optional and any ``torch.optim.Optimizer`` works without it. An optimizer
whose own step already leaves its state zero at inactive positions (``SNTASGD``) may also set the class attribute
``keeps_inactive_state_zero = True``: the engine then skips re-zeroing its state after every step (weights are
still re-zeroed), which saves two passes over each sparse tensor per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskUpdate:
    """One parameter's topology change; all three are bool tensors shaped like the parameter (True = active).

    ``old`` is ``None`` when masks are attached for the first time (start of fit, or after loading a checkpoint).
    ``new`` is the engine's live mask tensor: it is updated in place at every later update, so an optimizer may keep
    a reference to it instead of copying. ``kept`` is the mask after removal and before growth, which is what tells
    a weight removed and regrown in the same update (it restarts from zero) from one that simply stayed.
    """

    old: Tensor | None
    kept: Tensor
    new: Tensor

    @property
    def grown(self) -> Tensor:
        """Positions that start a new life at this update (all start at zero)."""
        return self.new & ~self.kept

    @property
    def removed(self) -> Tensor:
        """Positions active before the update and dropped by its removal step (some may be regrown)."""
        if self.old is None:
            return torch.zeros_like(self.kept)
        return self.old & ~self.kept


@runtime_checkable
class MaskAwareOptimizer(Protocol):
    """An optimizer that wants to be told about topology changes (see the module docstring)."""

    def on_mask_update(self, param: Tensor, update: MaskUpdate) -> None: ...


def state_tensors_like(optimizer: torch.optim.Optimizer, param: Tensor) -> Iterator[Tensor]:
    """Every tensor in ``optimizer.state[param]`` that has the parameter's shape (momentum, moments, averages)."""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            yield value


def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], param: Tensor, update: MaskUpdate) -> None:
    """Zero state at removed and grown positions, then notify mask-aware optimizers that hold ``param``."""
    for optimizer in optimizers:
        if not any(p is param for group in optimizer.param_groups for p in group["params"]):
            continue
        for state in state_tensors_like(optimizer, param):
            state.mul_(update.kept)
        if isinstance(optimizer, MaskAwareOptimizer):
            optimizer.on_mask_update(param, update)
