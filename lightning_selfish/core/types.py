"""The small value types the core's pieces hand each other and their listeners: one parameter's topology change
(:class:`MaskUpdate`, what an optimizer is told) and what one topology update did (:class:`UpdateStats`, what monitors
and logs read). The bottom of the core: imports only torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MaskUpdate", "UpdateStats"]


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

    def metrics(self) -> dict[str, float]:
        """The update's ``topology/*`` scalars."""
        metrics = {
            "topology/prune_rate": self.prune_rate,
            "topology/removed": float(self.total_removed),
            "topology/grown": float(self.total_grown),
            "topology/changed_fraction": self.total_changed_fraction,
        }
        for name, fraction in self.changed_fraction.items():
            metrics[f"topology/changed_fraction/{name}"] = fraction
        return metrics

    @property
    def total_changed_fraction(self) -> float:
        active = sum(self.active.values())
        return sum(self.newly_active.values()) / active if active else 0.0
