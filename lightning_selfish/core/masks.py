"""One sparsified parameter and its live masks: what the engine enforces and a topology update changes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_selfish.core.gates import GateLayout
from lightning_selfish.core.sharding import RowShard, whole
from lightning_selfish.method.shards import Span

__all__ = ["SparseTensor"]


@dataclass
class SparseTensor:
    """One sparsified parameter: its live masks and the row blocks that removal and growth work on.

    ``param`` and ``mask`` are what this rank holds: the whole tensor, or (a parameter sharded by FSDP2) its rows
    ``shard.row_start ...`` of the whole tensor of ``shard.shape``, a view of the parameter's local shard.
    ``owner`` is the parameter object optimizers hold (the ``DTensor``), ``param`` itself when not sharded.
    ``groups`` are row blocks of the whole tensor: one slice over all rows (joint ranking) or one per gate.
    """

    name: str
    param: Tensor
    mask: Tensor  # bool, live: updated in place
    groups: list[slice]
    gates: GateLayout | None = None
    owner: Tensor | None = None
    shard: RowShard | None = None
    mask_as_param: Tensor = field(init=False)  # the mask in the parameter's dtype, for fast multiplies

    def __post_init__(self) -> None:
        self.mask_as_param = self.mask.to(self.param.dtype)
        if self.owner is None:
            self.owner = self.param
        if self.shard is None:
            self.shard = whole(self.param)

    @property
    def shape(self) -> torch.Size:
        """The whole tensor's shape."""
        assert self.shard is not None
        return self.shard.shape

    @property
    def numel(self) -> int:
        return int(self.shape.numel())

    @property
    def split(self) -> bool:
        """Whether other ranks hold other rows of this tensor."""
        assert self.shard is not None
        return self.shard.collective.world_size > 1

    @property
    def span(self) -> Span:
        """Where the local rows lie in the whole tensor."""
        assert self.shard is not None
        return self.shard.span

    def blocks(self) -> list[tuple[slice, Span]]:
        """Per row block (``groups``): its local rows and where they lie in the whole block."""
        assert self.shard is not None
        return [self.shard.block(rows) for rows in self.groups]

    @property
    def active(self) -> int:
        """Active weights of the whole tensor (summed over the ranks holding it)."""
        return self.span.count(self.mask)
