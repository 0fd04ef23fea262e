"""The interfaces a Lightning callback takes part through, declared once (the optimizers' are in
:mod:`lightning_selfish.core.protocols`). Checks are ``isinstance(callback, Protocol)``: the names exist."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.types import UpdateStats

__all__ = ["SkipsTopologyUpdates", "TopologyListener"]


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
