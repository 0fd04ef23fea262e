"""Parameters split by rows over ranks (FSDP2's ``fully_shard``): what a rank holds of a parameter, and where it lies.

FSDP2 turns each parameter into a ``torch.distributed.tensor.DTensor`` sharded on dim 0 (``Shard(0)``): rank ``r``
of ``W`` holds rows ``[r * c, min(R, (r + 1) * c))`` with ``c = ceil(R / W)`` (``torch.chunk``'s split; the last
ranks may hold fewer rows, or none). The engine keeps each mask as the same rows and works on the local tensors,
so enforcement after every step is one local multiply and an update's selections exchange counts only
(:mod:`lightning_selfish.method.shards`). A plain tensor is its own local part, on one "rank".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_selfish.method.shards import SINGLE_PROCESS, Collective, ProcessGroup, Span

__all__ = ["RowShard", "as_sharded_like", "is_sharded", "local_tensor", "row_shard", "rows_for", "whole", "whole_copy"]


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # (torch built without distributed: nothing is ever sharded)
    _DTensor = None


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter of a module ``fully_shard`` wrapped)."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: a view of a ``DTensor``'s local shard (in-place changes reach the parameter),
    or ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class RowShard:
    """Which rows of a whole tensor of ``shape`` this rank holds (from ``row_start``, as many as its local part
    has), and the ranks that hold the others."""

    shape: torch.Size
    row_start: int
    rows: int
    collective: Collective = SINGLE_PROCESS

    @property
    def row_numel(self) -> int:
        return int(torch.Size(self.shape[1:]).numel())

    @property
    def span(self) -> Span:
        """Where the local rows lie in the whole tensor."""
        return self.block(slice(None))[1]

    def block(self, rows: slice) -> tuple[slice, Span]:
        """The local rows of the whole tensor's row block ``rows``, and where they lie in it (:class:`Span`)."""
        first, stop, _ = rows.indices(self.shape[0])
        low = min(max(first, self.row_start), stop)
        high = max(min(stop, self.row_start + self.rows), low)
        local = slice(low - self.row_start, high - self.row_start) if high > low else slice(0, 0)
        return local, Span(low * self.row_numel, (stop - first) * self.row_numel, self.collective)


def whole(tensor: Tensor) -> RowShard:
    """A tensor held whole by one process."""
    return RowShard(tensor.shape, 0, tensor.shape[0] if tensor.dim() else 1)


def row_shard(tensor: Tensor) -> RowShard:
    """Where this rank's part of ``tensor`` lies: the whole tensor for a plain tensor; for a ``DTensor``, its rows
    on a one-dimensional mesh sharded ``Shard(0)`` (FSDP2's placement), the ranks being the mesh's process group.

    Any other placement (tensor parallelism's ``Shard(1)``, replication, HSDP's two-dimensional mesh) is refused:
    its rows would not be one contiguous block per rank.
    """
    if not is_sharded(tensor):
        return whole(tensor)
    from torch.distributed.tensor import Shard

    placements = tuple(tensor.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(
            f"a sharded parameter of shape {tuple(tensor.shape)} has placements {placements}: the sparsity engine "
            "supports parameters sharded by rows on a one-dimensional mesh (FSDP2's fully_shard: (Shard(dim=0),)); "
            "tensor parallelism and HSDP meshes are not supported"
        )
    mesh = tensor.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-tensor.shape[0] // world)
    start = min(rank * chunk, tensor.shape[0])
    rows = tensor.to_local().shape[0]
    expected = max(0, min(chunk, tensor.shape[0] - start))
    if rows != expected:
        raise ValueError(
            f"a sharded parameter of shape {tuple(tensor.shape)} holds {rows} rows on rank {rank} of {world}, not "
            f"torch.chunk's {expected}: its rows cannot be placed in the whole tensor"
        )
    return RowShard(tensor.shape, start, rows, ProcessGroup(mesh.get_group()))


def as_sharded_like(local: Tensor, param: Tensor) -> Tensor:
    """This rank's rows ``local`` as a ``DTensor`` placed like the sharded ``param`` (what a distributed checkpoint
    saves shard by shard, and reshards on load into another number of ranks); ``local`` itself for a plain
    ``param``. No data moves."""
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    stride = torch.empty(param.shape, device="meta").stride()
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=stride
    )


def rows_for(saved: Tensor, param: Tensor) -> Tensor:
    """The part of a saved mask (or gradient) that this rank holds of ``param``: a ``DTensor``'s local rows (placed
    as ``param`` first when they are not), a whole tensor's rows of this rank (the whole tensor for a plain
    ``param``). Refuses a tensor of another shape than the whole ``param``."""
    if tuple(saved.shape) != tuple(param.shape):
        raise ValueError(f"a saved tensor of shape {tuple(saved.shape)} for a parameter of shape {tuple(param.shape)}")
    if is_sharded(saved):
        if not is_sharded(param):
            return saved.full_tensor()
        if tuple(saved.placements) != tuple(param.placements) or saved.device_mesh != param.device_mesh:
            saved = saved.redistribute(param.device_mesh, param.placements)
        return saved.to_local()
    shard = row_shard(param)
    return saved[shard.row_start : shard.row_start + shard.rows]


def whole_copy(local: Tensor, param: Tensor) -> Tensor:
    """A CPU copy of the whole tensor whose rows ``local`` are of ``param``: gathered from every rank when ``param``
    is sharded (bool as uint8, which every backend gathers), else a copy of ``local``."""
    if not is_sharded(param):
        return local.detach().cpu().clone()
    gathered = as_sharded_like(local.detach().to(torch.uint8) if local.dtype == torch.bool else local.detach(), param)
    whole = gathered.full_tensor().cpu()
    return whole.bool() if local.dtype == torch.bool else whole
