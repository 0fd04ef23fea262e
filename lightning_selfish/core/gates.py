"""Gate layouts: which rows of a stacked recurrent weight belong to which gate.

A recurrent layer stores the weights of all its gates in one tensor, stacked along dim 0 (PyTorch ``nn.LSTM``:
``[i | f | g | o]``). Cell-gate redistribution needs to know that structure only to *not* use it (ranking is joint
over the whole tensor); the ablation without redistribution and the per-gate monitoring need the row blocks.

Layouts are found in three places, later ones overriding earlier ones:

1. PyTorch's recurrent modules (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells) are detected.
2. Any module may declare ``gate_layouts = {local_param_name: [(gate, rows), ...]}`` as a plain attribute, with
   ``local_param_name`` as in that module's own ``named_parameters()`` (e.g. ``"weight"`` or ``"hh.weight"``).
3. The callback's ``gate_layouts={full_param_name: ...}`` argument.

``rows`` is a ``slice`` or a ``(start, stop)`` pair; a layout may also be a plain list of gate names, meaning equal
blocks. A layout must tile dim 0 exactly (contiguous, no gaps or overlaps) or it is rejected.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

GateLayout = list[tuple[str, slice]]
#: What a user may write for one tensor: gate names (equal blocks) or (gate, slice | (start, stop)) pairs.
GateLayoutSpec = Sequence[str] | Sequence[tuple[str, slice | Sequence[int]]]

#: The gates of PyTorch's recurrent modules, in the order their stacked weights hold them.
RNN_GATES: dict[type, tuple[str, ...]] = {
    nn.LSTM: ("i", "f", "g", "o"),
    nn.LSTMCell: ("i", "f", "g", "o"),
    nn.GRU: ("r", "z", "n"),
    nn.GRUCell: ("r", "z", "n"),
    nn.RNN: ("h",),
    nn.RNNCell: ("h",),
}
_STACKED = re.compile(r"^weight_(ih|hh)(_l\d+(_reverse)?)?$")


def rnn_gate_names(module: nn.Module) -> tuple[str, ...] | None:
    """The gate names of a PyTorch recurrent module (``nn.LSTM``: i, f, g, o), ``None`` for any other module."""
    return next((gates for cls, gates in RNN_GATES.items() if isinstance(module, cls)), None)


def normalize_layout(spec: GateLayoutSpec, rows: int, name: str) -> GateLayout:
    """Turn a user-written layout into ``[(gate, slice(start, stop)), ...]`` sorted by row, checking it tiles.

    An entry of the wrong type (not a list, a pair that is not ``(str, rows)``, rows that are not a slice or a pair
    of ints) is a ``TypeError``; a layout of the right types that does not tile the tensor is a ``ValueError``.
    """
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise TypeError(
            f"gate_layouts[{name!r}] must be a non-empty list of gate names or (gate, rows) pairs, got {spec!r}"
        )
    if len(spec) == 0:
        raise ValueError(
            f"gate_layouts[{name!r}] must be a non-empty list of gate names or (gate, rows) pairs, got {spec!r}"
        )
    if all(isinstance(item, str) for item in spec):
        if rows % len(spec):
            raise ValueError(
                f"gate_layouts[{name!r}] names {len(spec)} equal gates but the tensor has {rows} rows, "
                f"which {len(spec)} does not divide"
            )
        size = rows // len(spec)
        layout = [(str(gate), slice(k * size, (k + 1) * size)) for k, gate in enumerate(spec)]
    else:
        layout = []
        for item in spec:
            pair = isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
            if not (pair and isinstance(item[0], str)):
                raise TypeError(
                    f"gate_layouts[{name!r}] entries must be (gate, slice) or (gate, (start, stop)), got {item!r}"
                )
            gate, rows_spec = item
            if isinstance(rows_spec, slice):
                if rows_spec.step not in (None, 1):
                    raise ValueError(f"gate_layouts[{name!r}] gate {gate!r}: row slices must have step 1")
                start, stop = 0 if rows_spec.start is None else rows_spec.start, rows_spec.stop
            elif isinstance(rows_spec, Sequence) and not isinstance(rows_spec, str) and len(rows_spec) == 2:
                start, stop = rows_spec
            else:
                raise TypeError(
                    f"gate_layouts[{name!r}] gate {gate!r}: rows must be a slice or (start, stop), got {rows_spec!r}"
                )
            if not (_is_row(start) and _is_row(stop)):
                raise TypeError(f"gate_layouts[{name!r}] gate {gate!r}: row bounds must be ints, got {rows_spec!r}")
            layout.append((gate, slice(operator.index(start), operator.index(stop))))
    layout.sort(key=lambda entry: entry[1].start)
    gates = [gate for gate, _ in layout]
    if len(set(gates)) != len(gates):
        raise ValueError(f"gate_layouts[{name!r}] names a gate twice: {gates}")
    cursor = 0
    for gate, rows_slice in layout:
        if rows_slice.start != cursor or rows_slice.stop <= rows_slice.start:
            raise ValueError(
                f"gate_layouts[{name!r}] does not tile the tensor's {rows} rows: gate {gate!r} covers rows "
                f"[{rows_slice.start}, {rows_slice.stop}) but the next gate must start at row {cursor}"
            )
        cursor = rows_slice.stop
    if cursor != rows:
        raise ValueError(
            f"gate_layouts[{name!r}] does not tile the tensor's {rows} rows: the gates cover rows [0, {cursor})"
        )
    return layout


def _is_row(value: Any) -> bool:
    """An int row number (also a NumPy or one-element tensor int; never a bool, a float or a str)."""
    return not isinstance(value, bool) and hasattr(type(value), "__index__")


def parameter_aliases(module: nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter, keyed by its name in ``named_parameters()`` (which comes first).

    A tied weight (a decoder sharing its encoder's embedding) or a module registered twice is one tensor under
    several names; ``named_parameters()`` yields it once, under the first.
    """
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {aliases[0]: aliases for aliases in names.values()}


def detect_gate_layouts(
    module: nn.Module, overrides: Mapping[str, GateLayoutSpec] | None = None
) -> dict[str, GateLayout]:
    """Gate layouts of every stacked weight of ``module``, keyed by full parameter name.

    ``overrides`` (the callback's ``gate_layouts`` argument) take precedence over declarations and detection.
    """
    params: dict[str, Tensor] = dict(module.named_parameters())
    # A tied weight or a shared module is one parameter under several names: a layout keyed by any of them is its.
    owner = {alias: name for name, names in parameter_aliases(module).items() for alias in names}
    specs: dict[str, GateLayoutSpec] = {}
    for prefix, child in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        gates = rnn_gate_names(child)
        if gates is not None:
            for local, _ in child.named_parameters(recurse=False):
                if _STACKED.match(local):
                    specs[dot + local] = list(gates)
        declared: Any = getattr(child, "gate_layouts", None)
        if isinstance(declared, Mapping):
            for local, spec in declared.items():
                specs[owner.get(dot + local, dot + local)] = spec
    given: dict[str, str] = {}  # parameter -> the name the overrides gave it
    for name, spec in (overrides or {}).items():
        if name not in owner:
            raise ValueError(
                f"gate_layouts names parameter {name!r}, which the model does not have; "
                f"parameters with 2 or more dimensions: {[n for n, p in params.items() if p.dim() >= 2]}"
            )
        if owner[name] in given:
            raise ValueError(
                f"gate_layouts names one tensor twice: {given[owner[name]]!r} and {name!r} are tied (one "
                "parameter); give one layout"
            )
        given[owner[name]] = name
        specs[owner[name]] = spec
    layouts: dict[str, GateLayout] = {}
    for name, spec in specs.items():
        if name not in params:  # a declaration for a name the module does not have
            continue
        layouts[name] = normalize_layout(spec, params[name].shape[0], name)
    return layouts
