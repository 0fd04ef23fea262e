"""The formats a weight can compute in: dense, torch CSR (32-bit indices), CSR with 16-bit column indices and the
bit mask plus packed values of the compressed export (the last two through the compiled kernels of ``kernels.c``).

Every format multiplies ``rows`` ``(N, in)`` by the weight ``(out, in)``: one row as a matrix-vector product, more
as a matrix product. :func:`weight_bytes` gives what each reads from memory per product.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor

from lightning_selfish.inference.kernels import KernelLibrary, load_kernels

__all__ = [
    "CSR16_PANEL",
    "FORMATS",
    "KERNEL_FORMATS",
    "BitmaskMatrix",
    "Csr16Matrix",
    "PackedMatrix",
    "csr_matrix",
    "hold",
    "kernel_formats_available",
    "multiply",
    "weight_bytes",
]

#: Every format, and those of the compiled kernels (float32 on the CPU, a little-endian machine, a C compiler).
FORMATS = ("dense", "csr", "csr16", "bitmask")
KERNEL_FORMATS = ("csr16", "bitmask")
#: Columns per panel of the CSR16 many-row product: a panel of a 64-row input tile (128 x 64 floats, 32 KB) stays
#: in the L1 cache while the weight's rows go through it (``kernels.c``, SPMM).
CSR16_PANEL = 128


def csr_matrix(weight: Tensor) -> Tensor:
    """``weight`` (2-D, dense) as a CSR matrix of its non-zero entries, with 32-bit indices where they fit."""
    if weight.dim() != 2:
        raise ValueError(f"csr_matrix: weight must be 2-D, got shape {tuple(weight.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.detach().to_sparse_csr()
    if csr.values().numel() >= 2**31 or max(weight.shape) >= 2**31:
        return csr
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32),
        csr.col_indices().to(torch.int32),
        csr.values(),
        size=tuple(weight.shape),
        check_invariants=False,  # built by to_sparse_csr: valid by construction
    )


def kernel_formats_available(weight: Tensor, kernels: KernelLibrary | None) -> tuple[str, ...]:
    """The kernel formats that can hold ``weight``: none without kernels, off the CPU or for a dtype but float32."""
    if kernels is None or weight.device.type != "cpu" or weight.dtype != torch.float32 or sys.byteorder != "little":
        return ()
    return KERNEL_FORMATS if weight.shape[1] <= 2**16 else ("bitmask",)


class PackedMatrix:
    """A weight held for a compiled kernel: ``mv(x)`` is ``W x``, ``mm(rows)`` is ``rows W^T``."""

    shape: tuple[int, int]
    nnz: int
    isa: str

    def __init__(self, kernels: KernelLibrary, isa: str | None) -> None:
        self._kernels = kernels
        self.isa = kernels.isa(isa)
        self._bind()

    def _bind(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return state

    def __setstate__(self, state: dict) -> None:  # (copies and pickles: the library is loaded again, not copied)
        self.__dict__.update(state)
        kernels = load_kernels()
        if kernels is None:
            raise RuntimeError(f"{type(self).__name__}: the compiled kernels are unavailable on this machine")
        self._kernels = kernels
        self._bind()

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        raise NotImplementedError

    def _check(self, x: Tensor, dims: int) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != dims or x.shape[-1] != self.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: input must be float32 on the CPU with {self.shape[1]} columns, got "
                f"{x.dtype} on {x.device} with shape {tuple(x.shape)}"
            )
        return x.contiguous()


class BitmaskMatrix(PackedMatrix):
    """The compressed export's layout: one bit per position (rows padded to 64-bit words, LSB first, as
    :func:`lightning_selfish.analysis.pack_mask` within a byte) and the non-zero values in row-major order."""

    def __init__(self, weight: Tensor, kernels: KernelLibrary, isa: str | None = None) -> None:
        weight = weight.detach()
        rows, cols = (int(s) for s in weight.shape)
        words = max(1, -(-cols // 64))
        mask = weight != 0
        padded = torch.zeros(rows, words * 64, dtype=torch.uint8)
        padded[:, :cols] = mask
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        packed = (padded.view(rows, words * 8, 8) * weights).sum(dim=2, dtype=torch.uint8)
        self.shape = (rows, cols)
        self.words = words
        self.bits = packed.view(torch.int64).contiguous()  # (rows, words): little-endian bytes of each uint64
        values = weight[mask].to(torch.float32)
        self.nnz = int(values.numel())
        # the AVX-512 matrix-vector product loads 16 values per 16 columns whatever their count: up to 15 past a
        # row's end (multiplied by zeros, exact while they are finite: else it masks each load to the count)
        self.values = torch.cat([values, values.new_zeros(16)])
        self.all_finite = bool(torch.isfinite(values).all())
        self.row_start = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(dim=1).cumsum(0)])
        super().__init__(kernels, isa)

    def _bind(self) -> None:
        self._mv = self._kernels.function("bitmask_mv", self.isa)
        self._mm = self._kernels.function("bitmask_mm", self.isa)

    @property
    def nbytes(self) -> int:
        return 4 * self.nnz + self.bits.numel() * 8 + self.row_start.numel() * 8

    def mv(self, x: Tensor) -> Tensor:
        x = self._check(x, 1)
        y = torch.empty(self.shape[0], dtype=torch.float32)
        rows, words = self.shape[0], self.words
        self._mv(rows, words, self.bits.data_ptr(), self.values.data_ptr(), self.row_start.data_ptr(),
                 x.data_ptr(), y.data_ptr(), torch.get_num_threads(), int(self.all_finite))  # fmt: skip
        return y

    def mm(self, rows: Tensor) -> Tensor:
        xt = self._check(rows, 2).t().contiguous()
        n = xt.shape[1]
        yt = torch.empty(self.shape[0], n, dtype=torch.float32)
        self._mm(self.shape[0], self.words, self.bits.data_ptr(), self.values.data_ptr(), self.row_start.data_ptr(),
                 xt.data_ptr(), n, yt.data_ptr(), torch.get_num_threads())  # fmt: skip
        return yt.t()  # (the kernel writes the product transposed)

    def to_dense(self) -> Tensor:
        rows, cols = self.shape
        bytes_ = self.bits.view(torch.uint8).view(rows, self.words * 8, 1)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        mask = (bytes_ & weights).ne(0).view(rows, -1)[:, :cols]
        return torch.zeros(rows, cols).masked_scatter_(mask, self.values[: self.nnz])


class Csr16Matrix(PackedMatrix):
    """CSR with 16-bit column indices (``in_features <= 65536``) and 64-bit row offsets; for the many-row product
    also where each row's non-zeros cross into each panel of :data:`CSR16_PANEL` columns (``panel_start``)."""

    def __init__(self, weight: Tensor, kernels: KernelLibrary, isa: str | None = None) -> None:
        weight = weight.detach()
        rows, cols = (int(s) for s in weight.shape)
        if cols > 2**16:
            raise ValueError(f"Csr16Matrix: at most 65536 columns fit 16-bit indices, got {cols}")
        mask = weight != 0
        self.shape = (rows, cols)
        positions = mask.nonzero()
        self.cols = positions[:, 1].to(torch.int32).to(torch.int16).contiguous()  # (the uint16 bits)
        self.values = weight[mask].to(torch.float32).contiguous()
        self.nnz = int(self.values.numel())
        self.row_start = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(dim=1).cumsum(0)])
        self.panels = max(1, -(-cols // CSR16_PANEL))
        per_panel = torch.bincount(positions[:, 0] * self.panels + positions[:, 1] // CSR16_PANEL,
                                   minlength=rows * self.panels).view(rows, self.panels)  # fmt: skip
        self.panel_start = torch.cat(
            [self.row_start[:-1, None], self.row_start[:-1, None] + per_panel.cumsum(dim=1)], dim=1
        ).contiguous()  # (rows, panels + 1)
        super().__init__(kernels, isa)

    def _bind(self) -> None:
        self._mv = self._kernels.function("csr16_mv", self.isa)
        self._mm = self._kernels.function("csr16_mm", self.isa)

    @property
    def nbytes(self) -> int:
        """What one row's product (``mv``) reads; the many-row product also reads ``panel_start``."""
        return 6 * self.nnz + self.row_start.numel() * 8

    def mv(self, x: Tensor) -> Tensor:
        x = self._check(x, 1)
        y = torch.empty(self.shape[0], dtype=torch.float32)
        self._mv(self.shape[0], self.cols.data_ptr(), self.values.data_ptr(), self.row_start.data_ptr(),
                 x.data_ptr(), y.data_ptr(), torch.get_num_threads())  # fmt: skip
        return y

    def mm(self, rows: Tensor, bias: Tensor | None = None) -> Tensor:
        """``rows W^T`` (``+ bias``, added as the kernel stores the product: no second pass over it)."""
        x = self._check(rows, 2)
        n = x.shape[0]
        if bias is not None:
            bias = bias.detach().to(torch.float32).contiguous()
            if bias.shape != (self.shape[0],) or bias.device.type != "cpu":
                raise ValueError(f"Csr16Matrix.mm: bias must be ({self.shape[0]},) on the CPU, got {tuple(bias.shape)}")
        y = torch.empty(n, self.shape[0], dtype=torch.float32)
        status = self._mm(self.shape[0], self.shape[1], self.cols.data_ptr(), self.values.data_ptr(),
                          self.panel_start.data_ptr(), self.panels, x.data_ptr(), n,
                          None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())  # fmt: skip
        if status != 0:
            raise MemoryError(f"Csr16Matrix.mm: could not allocate the work space for {n} rows")
        return y

    def to_dense(self) -> Tensor:
        rows, cols = self.shape
        counts = self.row_start.diff()
        row = torch.repeat_interleave(torch.arange(rows), counts)
        col = self.cols.to(torch.int32) & 0xFFFF
        dense = torch.zeros(rows, cols)
        dense[row, col.long()] = self.values
        return dense


def weight_bytes(weight: Tensor | PackedMatrix) -> int:
    """Bytes a product reads of the weight as held: dense ``4·out·in``; CSR values, column and row indices;
    CSR16 ``6·nnz`` plus row offsets; bit mask ``4·nnz`` plus the padded bits and row offsets."""
    if isinstance(weight, PackedMatrix):
        return weight.nbytes
    if weight.layout == torch.sparse_csr:
        parts = (weight.values(), weight.col_indices(), weight.crow_indices())
        return sum(p.numel() * p.element_size() for p in parts)
    return weight.numel() * weight.element_size()


def hold(weight: Tensor, format: str, kernels: KernelLibrary | None = None, isa: str | None = None):
    """``weight`` (2-D, dense) held in ``format`` (one of :data:`FORMATS`); kernel formats need ``kernels``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    weight = weight.detach()
    if format == "dense":
        return weight.clone()
    if format == "csr":
        return csr_matrix(weight)
    if format not in kernel_formats_available(weight, kernels):
        why = "no compiled kernels (no C compiler?)" if kernels is None else "they take float32 CPU weights"
        raise RuntimeError(
            f"format {format!r} needs the compiled kernels, which cannot hold this {weight.dtype} weight on "
            f"{weight.device}: {why}"
        )
    return BitmaskMatrix(weight, kernels, isa) if format == "bitmask" else Csr16Matrix(weight, kernels, isa)


def multiply(held, rows: Tensor) -> Tensor:
    """``rows W^T`` (``rows`` ``(N, in)``) for a weight as :func:`hold` returns it; ``(N, out)``, maybe a
    transposed view."""
    if isinstance(held, PackedMatrix):
        return held.mv(rows[0]).unsqueeze(0) if rows.size(0) == 1 else held.mm(rows)
    if held.layout == torch.sparse_csr:
        return torch.mv(held, rows[0]).unsqueeze(0) if rows.size(0) == 1 else (held @ rows.t()).t()
    return rows @ held.t()
