"""Run names: one TensorBoard directory per configuration, so composed configs never share (or resume) a run.

Composed configs (``--config <model>.yaml --config methods/rigl.yaml --config optimizers/adam.yaml``) keep the model
config's logger name. ``selfish-rnn`` therefore logs a run under ``<save_dir>/<name>/<label>/version_N``, where the
label spells out what distinguishes it: the method (or ``dense``), the optimizer, the sparsity and prune rate, every
method part given explicitly, the averaging restarts and the seed, e.g. ``rigl-adam-s0.67-p0.7-every_epoch-seed1111``.
The number of epochs is not part of it: a shortened run and the ``test`` of its checkpoint need not repeat it. Then
``--ckpt_path best``/``last`` find the run of the same composition, and ``selfish-rnn results`` can group runs.
A logger name that already contains ``/`` is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["label_run_logger", "run_label"]

#: LanguageModel arguments that override a method's parts, with the short prefix they get in a label.
_OVERRIDES = (
    ("sparse_init", "init_"),
    ("removal", "removal_"),
    ("growth", "growth_"),
    ("update_every", "every_"),
)


def run_label(model: Mapping[str, Any] | Any, seed: int | None = None) -> str:
    """The label of a run from its ``model`` config section (a mapping or a jsonargparse Namespace)."""
    get = _getter(model)
    parts: list[str] = []
    sparsity = get("sparsity")
    parts.append("dense" if sparsity is None else str(get("method") or "selfish"))
    parts.append(str(get("optimizer") or "sntasgd"))
    if sparsity is not None:
        parts.append(f"s{_number(sparsity)}")
        if get("static"):
            parts.append("static")
        elif get("prune_rate") is not None:
            parts.append(f"p{_number(get('prune_rate'))}")
        for key, prefix in _OVERRIDES:
            value = get(key)
            if value is not None:
                parts.append(f"{prefix}{value}")
        gates = get("gate_redistribution")
        if gates is False or gates == "none":
            parts.append("no_redistribution")
        elif isinstance(gates, str) and gates != "joint":
            parts.append(f"gates_{gates}")
        options = get("sparsity_options") or {}
        for key in sorted(options):
            parts.append(f"{key}{_number(options[key])}")
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


def _getter(section: Mapping[str, Any] | Any):
    if isinstance(section, Mapping):
        return section.get
    return lambda key: getattr(section, key, None)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
