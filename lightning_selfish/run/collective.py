"""The collective seam of a run: how its ranks agree (:mod:`lightning_selfish.method.shards`, where the operations and
the exact selections over shards live, beside the method's selections that call them)."""

from lightning_selfish.method.shards import (
    Collective,
    ProcessGroup,
    SingleProcess,
    collective_for,
    kth_lowest,
    lowest_positions,
    random_positions,
)

__all__ = [
    "Collective",
    "ProcessGroup",
    "SingleProcess",
    "collective_for",
    "kth_lowest",
    "lowest_positions",
    "random_positions",
]
