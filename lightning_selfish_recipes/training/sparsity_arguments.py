"""``LanguageModel(sparsity=...)``: the arguments of ``SelfishSparsityCallback`` as one group, and its checks."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from typing import Any

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback


def _keyword_arguments_of(cls: type, name: str) -> type:
    """A frozen dataclass whose fields are the arguments of ``cls.__init__``: same names, types and defaults.

    Typed with it, a parameter is one nested group on the command line and in YAML (jsonargparse reads the fields,
    their types and the ``Args:`` of ``cls``'s docstring for the help), validated field by field, and never out of
    step with ``cls``: there is no second list of its arguments to keep.
    """
    hints = typing.get_type_hints(cls.__init__)
    fields = []
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            field = dataclasses.field()
        elif isinstance(parameter.default, (list, dict, set)):
            field = dataclasses.field(default_factory=lambda default=parameter.default: type(default)(default))
        else:
            field = dataclasses.field(default=parameter.default)
        fields.append((parameter.name, hints[parameter.name], field))
    made = dataclasses.make_dataclass(name, fields, kw_only=True, frozen=True)
    made.__module__ = __name__
    summary, _, details = (inspect.getdoc(cls) or "").partition("\n\n")
    made.__doc__ = f"The arguments of {cls.__name__} (its names, types and defaults).\n\n{details}"
    return made


SparsityArguments = _keyword_arguments_of(SelfishSparsityCallback, "SparsityArguments")
"""``LanguageModel(sparsity=...)``: the arguments of :class:`~lightning_selfish.SelfishSparsityCallback`, as a
frozen dataclass made from its signature (``SparsityArguments(sparsity=0.67, method="rigl")``). On the command line
they are ``--model.sparsity.<argument>``, in YAML ``model: {sparsity: {sparsity: 0.67, method: rigl}}``."""

SPARSITY_ARGUMENTS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(SparsityArguments))
"""The names of :data:`SparsityArguments`' fields (the callback's arguments)."""


def as_sparsity_arguments(sparsity: Any) -> SparsityArguments | None:
    """``LanguageModel(sparsity=...)`` as :data:`SparsityArguments` (a mapping of the same names is accepted)."""
    if sparsity is None:
        return None
    if isinstance(sparsity, SparsityArguments):
        _refuse_zero_sparsity(sparsity)
        return sparsity
    if isinstance(sparsity, (bool, int, float)):
        raise TypeError(
            f"sparsity must be the SelfishSparsityCallback arguments (e.g. {{'sparsity': {sparsity!r}}}) or None "
            f"(dense), got {sparsity!r}"
        )
    if not isinstance(sparsity, Mapping):
        raise TypeError(
            f"sparsity must be a SparsityArguments, a mapping of SelfishSparsityCallback arguments or None (dense), "
            f"got {type(sparsity).__name__}"
        )
    unknown = [str(name) for name in sparsity if name not in SPARSITY_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"sparsity has no argument {', '.join(map(repr, unknown))}: the arguments of SelfishSparsityCallback "
            f"are {', '.join(SPARSITY_ARGUMENTS)}"
        )
    if "sparsity" not in sparsity:
        raise TypeError("sparsity.sparsity is required: the fraction of the sparsified weights that is zero")
    arguments = SparsityArguments(**sparsity)
    _refuse_zero_sparsity(arguments)
    return arguments


def _refuse_zero_sparsity(arguments: Any) -> None:
    """A sweep's dense point written as sparsity 0: the recipes' dense run is the one without the callback (the
    callback refuses 0 too, but can only name itself)."""
    value = arguments.sparsity
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0:
        raise ValueError(
            f"sparsity.sparsity must be in (0, 1), got {value!r}: a dense run has no sparsity callback: "
            "--model.sparsity null on the command line, `sparsity: null` in YAML "
            "(lightning_selfish_recipes/configs/methods/dense.yaml), "
            "LanguageModel(sparsity=None) in Python"
        )


def callback_arguments(sparsity: Any, network: Any, schedule_length: Any) -> dict[str, Any]:
    """The keyword arguments of the run's ``SelfishSparsityCallback``: the ``sparsity`` group in the module's terms.

    The parameter names of ``include``, ``exclude`` and ``gate_layouts`` get the ``network.`` prefix (the network is
    the module's ``network`` attribute), ``exclude`` defaults to the network's ``sparsity_exclude``, and
    ``total_steps=None`` becomes ``schedule_length``, which the callback asks at fit start.
    """
    arguments = {name: getattr(sparsity, name) for name in SPARSITY_ARGUMENTS}
    exclude = arguments["exclude"]
    if exclude is None:
        exclude = getattr(network, "sparsity_exclude", None) or []
    arguments["exclude"] = [f"network.{pattern}" for pattern in exclude]
    if arguments["include"] is not None:
        arguments["include"] = [f"network.{pattern}" for pattern in arguments["include"]]
    if arguments["gate_layouts"] is not None:
        arguments["gate_layouts"] = {f"network.{name}": spec for name, spec in arguments["gate_layouts"].items()}
    if arguments["total_steps"] is None:
        arguments["total_steps"] = schedule_length
    return arguments


def sparsity_callback(arguments: dict[str, Any]) -> SelfishSparsityCallback:
    """The callback, whose own checks name an argument as ``sparsity.<argument>`` (``--model.sparsity.*``)."""
    try:
        return SelfishSparsityCallback(**arguments)
    except (TypeError, ValueError) as error:
        message = str(error)
        named = message.split(" ", 1)[0] in SPARSITY_ARGUMENTS
        raise type(error)(f"sparsity.{message}" if named else f"sparsity: {message}") from error
