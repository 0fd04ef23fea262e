"""Sparse inference: a trained sparse model's RNN and linear layers computing with sparse kernels, per tensor in
the format that is fastest on the machine that runs it.

:func:`to_sparse` replaces the ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules, their cells and the ``nn.Linear``
modules of a model by inference-only modules that hold each weight in one of four formats (:mod:`.formats`):
dense; torch CSR with 32-bit indices; CSR with 16-bit column indices; or the compressed export's bit mask plus
packed values. The last two run compiled C kernels (:mod:`.kernels`: built on first use with the system C compiler,
skipped with one log line where there is none). The format is chosen **per tensor** by its density and the rows each
product multiplies, from a crossover table measured on this machine on first use and cached (:mod:`.crossover`), or
by timing the formats on the tensor itself (``choose="measure"``). A module none of whose tensors pays keeps its
dense original. The outputs equal the dense model's within float tolerance (the same math; only the summation order
differs).

Only inference: the converted modules have no parameters and raise in training mode; dropout is off. Convert a
copy (the default) of a model whose weights are final, e.g. the averaged weights of SNT-ASGD.
"""

from lightning_selfish.inference.convert import (
    BUILTIN_CONVERTERS,
    ConversionContext,
    Converter,
    apply_masks_,
    qualified_name,
    sparse_inference_basis,
    sparse_inference_report,
    to_sparse,
)
from lightning_selfish.inference.crossover import (
    CPU_CROSSOVER,
    CROSSOVER_ENV,
    DENSE_MARGIN,
    MIN_CSR_ELEMENTS,
    Choose,
    CrossoverTable,
    MachineKey,
    TensorChoice,
    choose_format,
    cpu_name,
    crossover_density,
    machine_crossover,
    measure_crossover,
    measure_formats,
    measure_product,
)
from lightning_selfish.inference.formats import (
    FORMATS,
    KERNEL_FORMATS,
    BitmaskMatrix,
    Csr16Matrix,
    csr_matrix,
    weight_bytes,
)
from lightning_selfish.inference.kernels import KERNEL_ISA_ENV, cache_dir, load_kernels
from lightning_selfish.inference.modules import SparseLinear, SparseRNN, SparseRNNCell

__all__ = [
    "BUILTIN_CONVERTERS",
    "CPU_CROSSOVER",
    "CROSSOVER_ENV",
    "DENSE_MARGIN",
    "FORMATS",
    "KERNEL_FORMATS",
    "KERNEL_ISA_ENV",
    "MIN_CSR_ELEMENTS",
    "BitmaskMatrix",
    "Choose",
    "ConversionContext",
    "Converter",
    "CrossoverTable",
    "Csr16Matrix",
    "MachineKey",
    "SparseLinear",
    "SparseRNN",
    "SparseRNNCell",
    "TensorChoice",
    "apply_masks_",
    "cache_dir",
    "choose_format",
    "cpu_name",
    "crossover_density",
    "csr_matrix",
    "load_kernels",
    "machine_crossover",
    "measure_crossover",
    "measure_formats",
    "measure_product",
    "qualified_name",
    "sparse_inference_basis",
    "sparse_inference_report",
    "to_sparse",
    "weight_bytes",
]
