"""Run names: one TensorBoard directory per configuration, so composed configs never share (or resume) a run.

Composed configs (``--config <model>.yaml --config methods/rigl.yaml --config optimizers/adam.yaml``) keep the model
config's logger name. ``selfish-rnn`` therefore logs a run under ``<save_dir>/<name>/<label>/version_N``, where the
label spells out what distinguishes it: the method (or ``dense``), the optimizer, the sparsity and prune rate, every
other argument of the ``sparsity`` group given a value other than the callback's default (the method parts; the
masks' ``seed`` and ``verbose`` excepted), the averaging restarts and the seed, e.g.
``rigl-adam-s0.67-p0.7-every_epoch-seed1111``.
The number of epochs is not part of it: a shortened run and the ``test`` of its checkpoint need not repeat it. Then
``--ckpt_path best``/``last`` find the run of the same composition, and ``selfish-rnn results`` can group runs.
A logger name that already contains ``/`` is left as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback

__all__ = ["label_run_logger", "run_label"]

#: Sparsity arguments (``model.sparsity.*``) that override a method's parts, with the short prefix they get in a label.
_OVERRIDES = (
    ("init", "init_"),
    ("removal", "removal_"),
    ("growth", "growth_"),
    ("update_every", "every_"),
)
#: Sparsity arguments that do not change what is trained (the masks' seed is not part of a label either).
_NOT_IN_LABEL = ("verbose", "seed")


def run_label(model: Mapping[str, Any] | Any, seed: int | None = None) -> str:
    """The label of a run from its ``model`` config section (a mapping or a jsonargparse Namespace)."""
    get = _getter(model)
    parts: list[str] = []
    group = get("sparsity")  # SelfishSparsityCallback's arguments, or None (dense)
    sparse = _getter(group) if group is not None else None
    parts.append("dense" if sparse is None else str(sparse("method") or "selfish"))
    parts.append(str(get("optimizer") or "sntasgd"))
    if sparse is not None:
        parts.append(f"s{_number(sparse('sparsity'))}")
        if sparse("prune_rate") is not None:
            parts.append(f"p{_number(sparse('prune_rate'))}")
        for key, prefix in _OVERRIDES:
            value = sparse(key)
            if value is not None:
                parts.append(f"{prefix}{value}")
        gates = sparse("gate_redistribution")
        if gates is False or gates == "none":
            parts.append("no_redistribution")
        elif isinstance(gates, str) and gates != "joint":
            parts.append(f"gates_{gates}")
        named = {"sparsity", "method", "prune_rate", "gate_redistribution", *_NOT_IN_LABEL, *dict(_OVERRIDES)}
        for key in sorted(set(_CALLBACK_DEFAULTS) - named):
            value = sparse(key)
            if value is not None and value != _CALLBACK_DEFAULTS[key]:
                parts.append(f"{key}{_number(value)}")
    restarts = get("restart_at_epochs") or []
    if restarts:
        parts.append("restart" + "_".join(str(epoch) for epoch in restarts))
    if seed is not None and not isinstance(seed, bool):
        parts.append(f"seed{seed}")
    return "-".join(parts).replace("/", "_").replace(" ", "")


def label_run_logger(config: Any) -> str | None:
    """Append :func:`run_label` to the logger name of a parsed ``selfish-rnn`` config, in place; returns the name.

    Only a single logger given as ``class_path``/``init_args`` with a ``name`` argument is renamed, and only once.
    """
    trainer = getattr(config, "trainer", None)
    logger = getattr(trainer, "logger", None) if trainer is not None else None
    init_args = getattr(logger, "init_args", None)
    name = getattr(init_args, "name", None) if init_args is not None else None
    if not isinstance(name, str) or not name or "/" in name:
        return None
    seed = getattr(config, "seed_everything", None)
    init_args.name = f"{name}/{run_label(config.model, seed)}"
    return init_args.name


_CALLBACK_DEFAULTS = {
    name: parameter.default
    for name, parameter in list(inspect.signature(SelfishSparsityCallback.__init__).parameters.items())[1:]
    if parameter.default is not parameter.empty
}


def _getter(section: Mapping[str, Any] | Any):
    if isinstance(section, Mapping):
        return section.get
    return lambda key: getattr(section, key, None)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
