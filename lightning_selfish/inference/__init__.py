"""Sparse inference: a trained sparse model's RNN and linear layers computing with sparse (CSR) kernels.

:func:`to_sparse` replaces the ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules, their cells and the ``nn.Linear``
modules of a model by inference-only modules that hold each weight either as a CSR matrix with 32-bit indices (on
the CPU measured 1.5 to 4 times faster than with torch's default 64-bit indices for 1 to 100 rows) or dense, **per
tensor**, by whichever is faster for that tensor's density and the number of rows each product multiplies (see
:data:`CPU_CROSSOVER`, or ``choose="measure"`` to time both on the machine at conversion). A module none of whose
tensors pays keeps its dense original. The outputs equal the dense model's within float tolerance (the same math;
only the summation order differs).

Sparsity pays only below some density: on one CPU thread a 6000 x 1500 matrix is faster as CSR at densities up to
about 0.3 for 1 to 20 rows at a time (generation; a recurrent step at batch 20), 0.2 for 100 rows and 0.1 for 700
rows (the input projection of a 35-step window at batch 20); docs/performance.md has the measurements.

Only inference: the converted modules have no parameters and raise in training mode; dropout is off. Convert a
copy (the default) of a model whose weights are final, e.g. the averaged weights of SNT-ASGD.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BUILTIN_CONVERTERS",
    "CPU_CROSSOVER",
    "MIN_CSR_ELEMENTS",
    "ConversionContext",
    "Converter",
    "apply_masks_",
    "choose_format",
    "measure_product",
    "qualified_name",
    "SparseLinear",
    "SparseRNN",
    "SparseRNNCell",
    "TensorChoice",
    "crossover_density",
    "csr_matrix",
    "sparse_inference_report",
    "to_sparse",
]

log = logging.getLogger(__name__)

Choose = Literal["crossover", "measure", "sparse"]

#: ``(rows, density)``: on one CPU thread, a CSR product with 32-bit indices beats the dense one for weights with at
#: most ``density`` of their entries non-zero when it multiplies ``rows`` rows at once (measured on a 6000 x 1500
#: matrix, benchmarks/bench_inference.py --crossover, docs/performance.md). Between two entries the next larger
#: ``rows`` applies (the smaller threshold: keep dense where unsure).
CPU_CROSSOVER: tuple[tuple[int, float], ...] = ((1, 0.30), (4, 0.30), (20, 0.30), (100, 0.20), (700, 0.10))

#: Below this many entries a weight stays dense under ``choose="crossover"``: a small matrix sits in the CPU's
#: caches, where the dense product wins at every density (an 800 x 200 LSTM weight: 0.5x to 0.8x as CSR at one
#: row, densities 0.05 to 0.5; a 1600 x 400 one already gains below a density of 0.3).
MIN_CSR_ELEMENTS = 500_000

_RNN_MODES = {nn.LSTM: "LSTM", nn.GRU: "GRU"}
_CELL_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}
_REPORT = "sparse_inference_choices"


def crossover_density(rows: int, table: Sequence[tuple[int, float]] = CPU_CROSSOVER) -> float:
    """The density at or below which CSR is faster than dense for a product with ``rows`` rows (from ``table``)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"crossover_density: rows must be a positive int, got {rows!r}")
    ordered = sorted(table)
    for limit, density in ordered:
        if rows <= limit:
            return density
    return ordered[-1][1]


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


@dataclass(frozen=True)
class TensorChoice:
    """What :func:`to_sparse` decided for one weight tensor, and why."""

    name: str
    shape: tuple[int, ...]
    density: float
    rows: int
    sparse: bool
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None


# ----------------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------------


class _InferenceOnly(nn.Module):
    def _check_eval(self) -> None:
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} is for inference only (lightning_selfish.inference.to_sparse): call "
                ".eval() on the model; train the dense model instead"
            )


class SparseLinear(_InferenceOnly):
    """``y = x W^T + b`` with ``W`` held as a 32-bit-index CSR matrix (``sparse=True``) or dense.

    A product with one row runs as a matrix-vector product (``addmv``), several rows as one sparse-dense product
    (``addmm``). ``choice`` records why the format was chosen (:func:`sparse_inference_report`).
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, sparse: bool = True, choice: TensorChoice | None = None
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.sparse = bool(sparse)
        self.choice = choice
        weight = weight.detach()
        self.register_buffer("weight", csr_matrix(weight) if self.sparse else weight.clone(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparse: bool = True, choice: TensorChoice | None = None) -> SparseLinear:
        return cls(linear.weight, linear.bias, sparse=sparse, choice=choice)

    def forward(self, input: Tensor) -> Tensor:
        self._check_eval()
        if not self.sparse:
            return F.linear(input, self.weight, self.bias)
        rows = input.reshape(-1, self.in_features)
        if rows.size(0) == 1:
            flat = rows[0]
            out = torch.mv(self.weight, flat) if self.bias is None else torch.addmv(self.bias, self.weight, flat)
            return out.reshape(*input.shape[:-1], self.out_features)
        if self.bias is None:
            out = self.weight @ rows.t()
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, rows.t())
        return out.t().contiguous().view(*input.shape[:-1], self.out_features)  # contiguous, as F.linear's

    def addmm(self, base: Tensor, rows: Tensor) -> Tensor:
        """``base + rows W^T`` (``base`` ``(N, out)``, ``rows`` ``(N, in)``; the bias is not added)."""
        if not self.sparse:
            return torch.addmm(base, rows, self.weight.t())
        if rows.size(0) == 1:
            return torch.addmv(base[0], self.weight, rows[0]).unsqueeze(0)
        return base + (self.weight @ rows.t()).t()

    def extra_repr(self) -> str:
        layout = "csr" if self.sparse else "dense"
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, {layout}"


def _cell_step(mode: str, gi: Tensor, h: Tensor, c: Tensor | None, hh: SparseLinear) -> tuple[Tensor, Tensor | None]:
    """One time step from the input part ``gi`` (with every bias that can be folded into it) and the state."""
    if mode == "LSTM":
        gates = hh.addmm(gi, h)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        gh = hh(h)  # its bias is b_hn only (inside the reset gate's product)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None
    pre = hh.addmm(gi, h)
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _split_biases(
    mode: str, b_ih: Tensor | None, b_hh: Tensor | None, hidden_size: int
) -> tuple[Tensor | None, Tensor | None]:
    """The bias of the input product and of the recurrent product: ``b_hh`` folds into the input side, except GRU's
    ``b_hn``, which sits inside the reset gate's product."""
    if b_ih is None:
        return None, None
    b_ih, b_hh = b_ih.detach(), b_hh.detach()
    if mode != "GRU":
        return b_ih + b_hh, None
    H = hidden_size
    folded = b_ih.clone()
    folded[: 2 * H] += b_hh[: 2 * H]
    recurrent = torch.zeros_like(b_hh)
    recurrent[2 * H :] = b_hh[2 * H :]
    return folded, recurrent


def _rnn_mode(module: nn.Module) -> str:
    if type(module) in _RNN_MODES:
        return _RNN_MODES[type(module)]
    if type(module) in _CELL_MODES:
        return _CELL_MODES[type(module)]
    return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"


class SparseRNN(_InferenceOnly):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (unidirectional, no projection) with each weight CSR or dense.

    Same call and return as the original: ``(input, hx)`` with ``input`` ``(T, B, F)`` (``(B, T, F)`` when
    ``batch_first``, ``(T, F)`` unbatched) -> ``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM. Per layer,
    the input product runs once over all ``T·B`` rows, then the recurrent product once per step over ``B`` rows;
    gate order and formulas are PyTorch's (LSTM ``i, f, g, o``; GRU ``r, z, n``). No dropout (inference).
    """

    def __init__(
        self, rnn: nn.RNNBase, sparse: Mapping[str, bool], choices: Mapping[str, TensorChoice] | None = None
    ) -> None:
        super().__init__()
        if type(rnn) not in (nn.LSTM, nn.GRU, nn.RNN):
            raise TypeError(f"SparseRNN: rnn must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}")
        if rnn.bidirectional or getattr(rnn, "proj_size", 0):
            raise ValueError("SparseRNN: bidirectional RNNs and LSTMs with proj_size are not supported")
        choices = choices or {}
        self.mode = _rnn_mode(rnn)
        self.input_size, self.hidden_size, self.num_layers = rnn.input_size, rnn.hidden_size, rnn.num_layers
        self.batch_first = rnn.batch_first
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()
        for k in range(self.num_layers):
            b_ih, b_hh = (getattr(rnn, f"bias_{w}_l{k}") if rnn.bias else None for w in ("ih", "hh"))
            bias_in, bias_rec = _split_biases(self.mode, b_ih, b_hh, self.hidden_size)
            w_ih, w_hh = f"weight_ih_l{k}", f"weight_hh_l{k}"
            self.ih.append(SparseLinear(getattr(rnn, w_ih), bias_in, sparse[w_ih], choices.get(w_ih)))
            self.hh.append(SparseLinear(getattr(rnn, w_hh), bias_rec, sparse[w_hh], choices.get(w_hh)))

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        self._check_eval()
        lstm = self.mode == "LSTM"
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)
            if hx is not None:
                hx = tuple(s.unsqueeze(1) for s in hx) if lstm else hx.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        steps, batch = input.size(0), input.size(1)
        if hx is None:
            zeros = input.new_zeros(self.num_layers, batch, self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h0, c0 = hx if lstm else (hx, None)
        x = input
        last_h, last_c = [], []
        for k in range(self.num_layers):
            gi = self.ih[k](x.reshape(steps * batch, -1)).reshape(steps, batch, -1)
            h, c = h0[k], c0[k] if lstm else None
            outputs = []
            for t in range(steps):
                h, c = _cell_step(self.mode, gi[t], h, c, self.hh[k])
                outputs.append(h)
            x = torch.stack(outputs)
            last_h.append(h)
            last_c.append(c)
        h_n = torch.stack(last_h)
        state = (h_n, torch.stack(last_c)) if lstm else h_n
        if unbatched:
            return x.squeeze(1), (tuple(s.squeeze(1) for s in state) if lstm else state.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), state

    def extra_repr(self) -> str:
        layouts = ", ".join(
            f"l{k}: ih {'csr' if ih.sparse else 'dense'}, hh {'csr' if hh.sparse else 'dense'}"
            for k, (ih, hh) in enumerate(zip(self.ih, self.hh))
        )
        return f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers} ({layouts})"


class SparseRNNCell(_InferenceOnly):
    """An ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` with each weight CSR or dense; same call and return."""

    def __init__(
        self, cell: nn.RNNCellBase, sparse: Mapping[str, bool], choices: Mapping[str, TensorChoice] | None = None
    ) -> None:
        super().__init__()
        if type(cell) not in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
            raise TypeError(
                f"SparseRNNCell: cell must be an nn.LSTMCell, nn.GRUCell or nn.RNNCell, got {type(cell).__name__}"
            )
        choices = choices or {}
        self.mode = _rnn_mode(cell)
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        bias_in, bias_rec = _split_biases(self.mode, cell.bias_ih, cell.bias_hh, self.hidden_size)
        self.ih = SparseLinear(cell.weight_ih, bias_in, sparse["weight_ih"], choices.get("weight_ih"))
        self.hh = SparseLinear(cell.weight_hh, bias_rec, sparse["weight_hh"], choices.get("weight_hh"))

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        self._check_eval()
        lstm = self.mode == "LSTM"
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = tuple(s.unsqueeze(0) for s in hx) if lstm else hx.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h, c = hx if lstm else (hx, None)
        h, c = _cell_step(self.mode, self.ih(input), h, c, self.hh)
        if unbatched:
            h, c = h.squeeze(0), (c.squeeze(0) if lstm else None)
        return (h, c) if lstm else h


# ----------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ConversionContext:
    """What a converter needs: the workload, and :meth:`choose`, which decides a tensor's format and records it."""

    batch_size: int
    steps: int
    choose_mode: Choose
    crossover: Sequence[tuple[int, float]]
    min_elements: int = MIN_CSR_ELEMENTS
    decisions: list[TensorChoice] = field(default_factory=list)

    def choose(self, name: str, weight: Tensor, rows: int) -> TensorChoice:
        """CSR or dense for ``weight`` (named ``name`` in the report) multiplying ``rows`` rows at a time."""
        choice = choose_format(name, weight, rows, self.choose_mode, self.crossover, self.min_elements)
        self.decisions.append(choice)
        return choice


Converter = Callable[[nn.Module, str, ConversionContext], "nn.Module | None"]
"""``converter(module, name, context)``: the module's replacement; the module itself to keep it and leave its
submodules alone; or None to keep it and convert its submodules (``name`` is the module's name in the model, ``""``
for the model itself; see :func:`qualified_name`)."""


def qualified_name(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is the model itself (``""``)."""
    return f"{prefix}.{name}" if prefix else name


def to_sparse(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    batch_size: int = 1,
    steps: int = 1,
    choose: Choose = "crossover",
    crossover: Sequence[tuple[int, float]] = CPU_CROSSOVER,
    min_elements: int = MIN_CSR_ELEMENTS,
    exclude: Sequence[str] = (),
    converters: Mapping[type, Converter] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """``model`` with its RNN, RNN-cell and ``nn.Linear`` modules computing with CSR weights where that is faster.

    Args:
        model: a trained model (its weights are final: for SNT-ASGD, the averaged ones).
        masks: ``{parameter name: bool mask}`` (``SelfishSparsityCallback.masks``, or a checkpoint's); multiplied
            into the weights first. None: the weights' own zeros are the sparsity.
        batch_size: sequences per call (1 for generation).
        steps: time steps per call of an RNN (1 for generation; the window length for evaluation): an RNN's input
            product and an ``nn.Linear`` multiply ``batch_size * steps`` rows, a recurrent product ``batch_size``.
        choose: ``"crossover"``: CSR when the tensor's density is at most :func:`crossover_density` of its rows;
            ``"measure"``: time the tensor's dense and CSR products on this machine (current thread count) and
            keep the faster; ``"sparse"``: CSR for every weight of a supported module.
        crossover: the ``(rows, density)`` table of ``"crossover"``.
        min_elements: under ``"crossover"``, weights with fewer entries stay dense (:data:`MIN_CSR_ELEMENTS`).
        exclude: module names (``fnmatch`` patterns, as in ``model.named_modules()``) to leave unchanged, e.g.
            layers whose weights the model reads directly instead of calling the module.
        converters: ``{module type: converter}`` for other module types (exact types; tried before the built-in
            ones), e.g. a model's own recurrent cell; see :class:`ConversionContext`.
        inplace: convert ``model`` itself instead of a deep copy.

    Returns the converted model, in eval mode; :func:`sparse_inference_report` lists every decision. Only exact
    ``nn.Linear`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` / cell types convert (a subclass may compute
    differently); bidirectional RNNs and LSTMs with ``proj_size`` keep their dense module (reported).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"to_sparse: {name} must be a positive int, got {value!r}")
    if choose not in ("crossover", "measure", "sparse"):
        raise ValueError(f"to_sparse: choose must be 'crossover', 'measure' or 'sparse', got {choose!r}")
    if isinstance(exclude, str):
        raise TypeError(f"to_sparse: exclude must be a list of module-name patterns, got the string {exclude!r}")
    devices = {p.device.type for p in model.parameters()}
    if choose == "crossover" and devices - {"cpu"}:
        raise ValueError(
            f"to_sparse: choose='crossover' uses a crossover measured on the CPU, but the model is on "
            f"{sorted(devices - {'cpu'})}: use choose='measure' (time both formats on the device) or 'sparse'"
        )
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if masks is not None:
        apply_masks_(model, masks)
    context = ConversionContext(batch_size, steps, choose, crossover, min_elements)
    table = {**BUILTIN_CONVERTERS, **dict(converters or {})}
    replaced: list[str] = []
    for module_name, module in list(model.named_modules()):
        if any(module_name.startswith(f"{done}.") or not done for done in replaced):
            continue  # inside a module already replaced
        if any(fnmatch.fnmatchcase(module_name, pattern) for pattern in exclude):
            continue
        converter = table.get(type(module))
        replacement = None if converter is None else converter(module, module_name, context)
        if replacement is None:
            continue
        replaced.append(module_name)  # its submodules are its converter's business
        if replacement is module:
            continue
        if module_name:
            _set_submodule(model, module_name, replacement)
        else:  # the model itself is an RNN, a cell or a linear layer
            model = replacement
    model.eval()  # the new modules too
    object.__setattr__(model, _REPORT, tuple(context.decisions))  # a plain attribute, never a submodule or buffer
    sparse = [d for d in context.decisions if d.sparse]
    log.info(
        "to_sparse: %d of %d weight tensors as CSR (batch_size=%d, steps=%d, choose=%s)",
        len(sparse),
        len(context.decisions),
        batch_size,
        steps,
        choose,
    )
    return model


def apply_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Multiply every masked parameter of ``model`` by its mask, in place (names as in ``named_parameters``)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model; parameters: {sorted(params)}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)}, the parameter has {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device))


def _convert_linear(module: nn.Linear, prefix: str, context: ConversionContext) -> nn.Module | None:
    rows = context.batch_size * context.steps
    choice = context.choose(qualified_name(prefix, "weight"), module.weight, rows)
    return SparseLinear.from_linear(module, choice=choice) if choice.sparse else None


def _convert_rnn(module: nn.RNNBase, prefix: str, context: ConversionContext) -> nn.Module | None:
    if module.bidirectional or getattr(module, "proj_size", 0):
        reason = "bidirectional" if module.bidirectional else "proj_size"
        why = f"kept dense: {reason} {type(module).__name__} is not supported"
        for w in module._flat_weights_names:
            if w.startswith("weight"):
                weight = getattr(module, w)
                name = qualified_name(prefix, w)
                context.decisions.append(TensorChoice(name, tuple(weight.shape), _density(weight), 1, False, why))
        return None
    rows = {}
    for k in range(module.num_layers):
        rows[f"weight_ih_l{k}"] = context.batch_size * context.steps
        rows[f"weight_hh_l{k}"] = context.batch_size
    return _convert_recurrent(module, prefix, context, rows, SparseRNN)


def _convert_cell(module: nn.RNNCellBase, prefix: str, context: ConversionContext) -> nn.Module | None:
    rows = {"weight_ih": context.batch_size, "weight_hh": context.batch_size}
    return _convert_recurrent(module, prefix, context, rows, SparseRNNCell)


def _convert_recurrent(module, prefix, context, rows, cls) -> nn.Module | None:
    choices = {w: context.choose(qualified_name(prefix, w), getattr(module, w), n) for w, n in rows.items()}
    if not any(c.sparse for c in choices.values()):
        return None
    return cls(module, {w: c.sparse for w, c in choices.items()}, choices)


BUILTIN_CONVERTERS: dict[type, Converter] = {
    nn.Linear: _convert_linear,
    nn.LSTM: _convert_rnn,
    nn.GRU: _convert_rnn,
    nn.RNN: _convert_rnn,
    nn.LSTMCell: _convert_cell,
    nn.GRUCell: _convert_cell,
    nn.RNNCell: _convert_cell,
}
"""The module types :func:`to_sparse` converts by itself (exact types)."""


def _density(weight: Tensor) -> float:
    return float(torch.count_nonzero(weight.detach())) / max(1, weight.numel())


def choose_format(
    name: str,
    weight: Tensor,
    rows: int,
    choose: Choose = "crossover",
    crossover: Sequence[tuple[int, float]] = CPU_CROSSOVER,
    min_elements: int = MIN_CSR_ELEMENTS,
) -> TensorChoice:
    """CSR or dense for ``weight`` multiplying ``rows`` rows at a time, and why (see :func:`to_sparse`'s ``choose``)."""
    density = _density(weight)
    shape = tuple(weight.shape)
    if choose == "sparse":
        return TensorChoice(name, shape, density, rows, True, "CSR requested (choose='sparse')")
    if choose == "crossover":
        if weight.numel() < min_elements:
            reason = f"{weight.numel()} entries < {min_elements}: a small matrix is faster dense"
            return TensorChoice(name, shape, density, rows, False, reason)
        limit = crossover_density(rows, crossover)
        sparse = density <= limit
        reason = f"density {density:.3f} {'<=' if sparse else '>'} {limit:g} at {rows} rows"
        return TensorChoice(name, shape, density, rows, sparse, reason)
    dense_ms, sparse_ms = measure_product(weight.detach(), rows)
    sparse = sparse_ms < dense_ms
    reason = f"measured dense {dense_ms:.3f} ms, CSR {sparse_ms:.3f} ms at {rows} rows"
    return TensorChoice(name, shape, density, rows, sparse, reason, round(dense_ms, 4), round(sparse_ms, 4))


def measure_product(weight: Tensor, rows: int, rounds: int = 7, min_seconds: float = 0.002) -> tuple[float, float]:
    """Median ms of ``x W^T`` for ``x`` ``(rows, in)``: dense, then CSR, alternated round by round."""
    dense = SparseLinear(weight, sparse=False).eval()
    sparse = SparseLinear(weight, sparse=True).eval()
    generator = torch.Generator(device=weight.device).manual_seed(0)  # (the global RNG is left alone)
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device, generator=generator)
    synchronize = torch.cuda.synchronize if weight.device.type == "cuda" else (lambda: None)

    def once(module: nn.Module, repeats: int) -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            module(x)
        synchronize()
        return (time.perf_counter() - start) / repeats

    with torch.no_grad():
        warm = max(once(dense, 1), once(sparse, 1), 1e-7)
        repeats = max(1, math.ceil(min_seconds / warm))
        timings: dict[str, list[float]] = {"dense": [], "sparse": []}
        for _ in range(rounds):
            timings["dense"].append(once(dense, repeats))
            timings["sparse"].append(once(sparse, repeats))
    return statistics.median(timings["dense"]) * 1e3, statistics.median(timings["sparse"]) * 1e3


def sparse_inference_report(model: nn.Module) -> list[TensorChoice]:
    """Every decision of :func:`to_sparse` on ``model`` (the model it returned): CSR or dense, per weight tensor."""
    choices = getattr(model, _REPORT, None)
    if choices is None:
        raise ValueError(
            f"sparse_inference_report: this {type(model).__name__} was not converted by "
            "lightning_selfish.inference.to_sparse (pass the model it returned)"
        )
    return list(choices)


def _set_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)
