"""One sparsified parameter and its live masks: what the engine enforces and a topology update changes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from lightning_selfish.core.gates import GateLayout

__all__ = ["SparseTensor"]


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
