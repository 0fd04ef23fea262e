"""The conversion: :func:`to_sparse` and its converters, one per module type, sharing :class:`ConversionContext`."""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_selfish.inference.crossover import (
    CPU_CROSSOVER,
    FORCED,
    MIN_CSR_ELEMENTS,
    Choose,
    CrossoverTable,
    TensorChoice,
    choose_format,
    cpu_name,
    density_of,
    machine_crossover,
)
from lightning_selfish.inference.kernels import KernelLibrary, load_kernels
from lightning_selfish.inference.modules import SparseLinear, SparseRNN, SparseRNNCell

__all__ = [
    "BUILTIN_CONVERTERS",
    "ConversionContext",
    "Converter",
    "apply_masks_",
    "qualified_name",
    "sparse_inference_basis",
    "sparse_inference_report",
    "to_sparse",
]

log = logging.getLogger("lightning_selfish.inference")

_REPORT = "sparse_inference_choices"
_BASIS = "sparse_inference_basis"
Crossover = CrossoverTable | Sequence[tuple[int, float]] | str | os.PathLike | None


@dataclass
class ConversionContext:
    """What a converter needs: the workload, and :meth:`choose`, which decides a tensor's format and records it."""

    batch_size: int
    steps: int
    choose_mode: Choose
    crossover: CrossoverTable | Sequence[tuple[int, float]]
    min_elements: int = MIN_CSR_ELEMENTS
    decisions: list[TensorChoice] = field(default_factory=list)
    kernels: KernelLibrary | None = None

    def choose(self, name: str, weight: Tensor, rows: int) -> TensorChoice:
        """The format of ``weight`` (named ``name`` in the report) multiplying ``rows`` rows at a time."""
        choice = choose_format(
            name, weight, rows, self.choose_mode, self.crossover, self.min_elements, kernels=self.kernels
        )
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
    crossover: Crossover = None,
    remeasure: bool = False,
    min_elements: int = MIN_CSR_ELEMENTS,
    exclude: Sequence[str] = (),
    converters: Mapping[type, Converter] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """``model`` with its RNN, RNN-cell and ``nn.Linear`` modules computing in the fastest format per weight.

    Args:
        model: a trained model (its weights are final: for SNT-ASGD, the averaged ones).
        masks: ``{parameter name: bool mask}`` (``SelfishSparsityCallback.masks``, or a checkpoint's); multiplied
            into the weights first. None: the weights' own zeros are the sparsity.
        batch_size: sequences per call (1 for generation).
        steps: time steps per call of an RNN (1 for generation; the window length for evaluation): an RNN's input
            product and an ``nn.Linear`` multiply ``batch_size * steps`` rows, a recurrent product ``batch_size``.
        choose: ``"crossover"``: the format the crossover table predicts fastest for the tensor's density and rows;
            ``"measure"``: time every format on the tensor itself on this machine (current thread count) and keep
            the fastest; ``"sparse"`` / ``"csr"``, ``"csr16"``, ``"bitmask"``: that format for every weight of a
            supported module (``"sparse"`` is torch CSR).
        crossover: None: this machine's table (:func:`~lightning_selfish.inference.machine_crossover`: measured on
            first use, cached); a :class:`~lightning_selfish.inference.CrossoverTable` or the path of one saved;
            or a ``(rows, density)`` sequence (torch CSR at most that dense, e.g. the assumed
            :data:`~lightning_selfish.inference.CPU_CROSSOVER`).
        remeasure: measure this machine's table again (``crossover=None``) instead of reading the cached one.
        min_elements: under ``"crossover"``, weights with fewer entries stay dense (:data:`MIN_CSR_ELEMENTS`).
        exclude: module names (``fnmatch`` patterns, as in ``model.named_modules()``) to leave unchanged, e.g.
            layers whose weights the model reads directly instead of calling the module.
        converters: ``{module type: converter}`` for other module types (exact types; tried before the built-in
            ones), e.g. a model's own recurrent cell; see :class:`ConversionContext`.
        inplace: convert ``model`` itself instead of a deep copy.

    Returns the converted model, in eval mode; :func:`sparse_inference_report` lists every decision and
    :func:`sparse_inference_basis` what it rested on (the CPU; the table measured, cached or given). Only exact
    ``nn.Linear`` / ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` / cell types convert (a subclass may compute
    differently); bidirectional RNNs and LSTMs with ``proj_size`` keep their dense module (reported).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"to_sparse: {name} must be a positive int, got {value!r}")
    if choose not in ("crossover", "measure", *FORCED):
        raise ValueError(
            f"to_sparse: choose must be 'crossover', 'measure', 'sparse', 'csr', 'csr16' or 'bitmask', got {choose!r}"
        )
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
    kernels = load_kernels() if devices <= {"cpu"} else None
    table, basis = _crossover_basis(choose, crossover, remeasure, kernels)
    context = ConversionContext(batch_size, steps, choose, table, min_elements, kernels=kernels)
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
    object.__setattr__(model, _REPORT, tuple(context.decisions))  # plain attributes, never submodules or buffers
    object.__setattr__(model, _BASIS, basis)
    formats = Counter(d.format for d in context.decisions)
    log.info(
        "to_sparse: %s of %d weight tensors (batch_size=%d, steps=%d, choose=%s; %s)",
        ", ".join(f"{n} {f}" for f, n in sorted(formats.items())) or "none",
        len(context.decisions),
        batch_size,
        steps,
        choose,
        basis,
    )
    return model


def _crossover_basis(
    choose: str, crossover: Crossover, remeasure: bool, kernels: KernelLibrary | None
) -> tuple[CrossoverTable | Sequence[tuple[int, float]], str]:
    """The table ``choose="crossover"`` uses, and a line that says what the choice rests on (CPU, source)."""
    cpu = cpu_name()
    threads = torch.get_num_threads()
    where = f"{cpu}, {threads} thread{'s' if threads > 1 else ''}"
    if choose in FORCED:
        return CPU_CROSSOVER, f"format forced (choose={choose!r}) on {where}"
    if choose == "measure":
        return CPU_CROSSOVER, f"each tensor's formats measured now on {where}"
    if crossover is None:
        table = machine_crossover(remeasure=remeasure, kernels=kernels)
        return table, table.describe()
    if isinstance(crossover, (str, os.PathLike)):
        table = CrossoverTable.load(crossover)
        return table, table.describe()
    if isinstance(crossover, CrossoverTable):
        return crossover, crossover.describe()
    if tuple(tuple(entry) for entry in crossover) == CPU_CROSSOVER:
        measured_on = "torch CSR, measured on the project's Intel Xeon"
        return crossover, f"crossover assumed: CPU_CROSSOVER ({measured_on}), not measured on {where}"
    return crossover, f"crossover given as (rows, density) pairs (torch CSR), not measured on {where}"


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
        for w, weight in module.named_parameters(recurse=False):
            if w.startswith("weight"):
                name = qualified_name(prefix, w)
                context.decisions.append(TensorChoice(name, tuple(weight.shape), density_of(weight), 1, False, why))
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


def sparse_inference_report(model: nn.Module) -> list[TensorChoice]:
    """Every decision of :func:`to_sparse` on ``model`` (the model it returned): CSR or dense, per weight tensor."""
    choices = getattr(model, _REPORT, None)
    if choices is None:
        raise ValueError(
            f"sparse_inference_report: this {type(model).__name__} was not converted by "
            "lightning_selfish.inference.to_sparse (pass the model it returned)"
        )
    return list(choices)


def sparse_inference_basis(model: nn.Module) -> str:
    """What :func:`to_sparse`'s choices for ``model`` rest on: the CPU, thread count, and whether the crossover
    table was measured now, cached from an earlier measurement, given, or assumed."""
    sparse_inference_report(model)  # (the same check and message)
    return getattr(model, _BASIS)


def _set_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)
