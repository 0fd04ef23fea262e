"""How the ranks of a run agree, without Lightning: the few collective operations a sparse run needs.

DDP uses :meth:`Collective.broadcast_` today (every rank takes rank 0's masks and generator after an update). The
other two are the seam sharded training builds on (docs/architecture.md): a sharded update sums its counts and
scores over ranks (:meth:`~Collective.all_reduce_`) and picks the globally smallest or largest values of a tensor
whose shards live on different ranks (:meth:`~Collective.kth_value`), sending values and counts, never tensors.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Collective", "ProcessGroup", "SingleProcess", "collective_for"]


@runtime_checkable
class Collective(Protocol):
    """The operations, in place on tensors on the parameters' device."""

    @property
    def world_size(self) -> int: ...

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None: ...

    def all_reduce_(self, tensor: Tensor) -> None: ...

    def kth_value(self, values: Tensor, k: int) -> Tensor: ...


class SingleProcess:
    """One process: nothing to agree on."""

    world_size = 1

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """(every rank already holds rank 0's tensor)"""

    def all_reduce_(self, tensor: Tensor) -> None:
        """(the sum over one rank is its own value)"""

    def kth_value(self, values: Tensor, k: int) -> Tensor:
        """The ``k``-th smallest (1-based, as :func:`torch.kthvalue`) of ``values``."""
        return torch.kthvalue(values.flatten(), k).values


class ProcessGroup:
    """The ranks of a ``torch.distributed`` process group (the default one unless given)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` with rank ``src``'s, in place."""
        dist.broadcast(tensor, src=src, group=self.group)

    def all_reduce_(self, tensor: Tensor) -> None:
        """Replace ``tensor`` by its sum over the ranks, in place."""
        dist.all_reduce(tensor, group=self.group)

    def kth_value(self, values: Tensor, k: int) -> Tensor:
        """The ``k``-th smallest (1-based) of the values of every rank together (each rank its own shard; shards
        may differ in size). Sends the values once: a caller sends candidates, not whole tensors."""
        flat = values.flatten()
        sizes = [torch.zeros(1, dtype=torch.int64, device=flat.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device), group=self.group)
        counts = [int(size) for size in sizes]
        padded = torch.full((max(counts),), torch.inf, dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()] = flat
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        every = torch.cat([shard[:count] for shard, count in zip(gathered, counts)])
        return torch.kthvalue(every, k).values


def collective_for(world_size: int) -> Collective:
    """The collective of a run of ``world_size`` processes: the default process group when there is one to use."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        return ProcessGroup()
    return SingleProcess()
