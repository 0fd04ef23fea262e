"""Which cell of the paper's tables a run is: every setting the paper fixes for the cell must agree.

A row's settings are those of its command
(:meth:`~lightning_selfish_recipes.tools.paper_results.PaperRow.command_args`): the model config and overlays merged in
order, then its command-line arguments, with the classes' defaults for what they leave out. A run's settings are those
of its saved ``config.yaml``. Both go through :func:`run_settings`, the one function that knows the layout of a config,
and are compared setting by setting:

* the corpus and the data settings that change what is trained or measured (batch sizes, BPTT);
* the network class and every argument of it (sizes, dropouts, ...), except the vocabulary (linked from the data);
* the method and every part of it, with the preset's value for a part left unset (so ``--model.growth random``
  on Selfish-RNN is Selfish-RNN), the sparsity within the paper's printed precision (two decimals: RHN's 0.528
  is printed 0.53, and a run at 0.53 is that cell too);
* the optimizer and its settings (learning rate, weight decay, clipping, the trigger's interval, averaging
  restarts; momentum, Adam's and the plateau settings only for the optimizers that use them);
* the epochs planned and the trainer settings that change the training (step and batch limits, gradient
  accumulation and clipping, precision).

Not compared: seeds (repeats of a cell differ by them), where data and logs live, what is printed or monitored
(``flops``, ``verbose_sparsity``, ``topology_monitor``, ``mask_history``, ``checkpoint``), and
``small_batch_size`` (the same gradient in column groups, to fit the memory; AWD-LSTM-MoS's config sets it).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_selfish_recipes.old_names import with_current_class_paths
from lightning_selfish_recipes.tools.paper_results import CONFIGS, PaperRow

__all__ = [
    "Difference",
    "cell_settings",
    "differences",
    "paper_epochs",
    "row_config",
    "run_settings",
    "with_defaults",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: Arguments of the sparsity callback (the nested ``sparsity`` group) that do not change what a run trains.
_NOT_COMPARED_SPARSITY = {"seed", "growth_seed", "verbose"}
#: The flat LanguageModel arguments of the sparsity callback, by the callback's name for them.
_FLAT_SPARSITY = {
    "method": "method",
    "prune_rate": "prune_rate",
    "sparse_init": "init",
    "removal": "removal",
    "growth": "growth",
    "gate_redistribution": "gate_redistribution",
    "update_every": "update_every",
    "sparsity_exclude": "exclude",
    "total_steps": "total_steps",
    "sparsity_seed": "seed",
    "verbose_sparsity": "verbose",
}
_DATA = ("corpus", "batch_size", "eval_batch_size", "test_batch_size", "bptt", "variable_bptt", "max_seq_len_delta")
_TRAINER = (
    "max_epochs",
    "max_steps",
    "limit_train_batches",
    "limit_val_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
)
_AVERAGING = ("sntasgd", "ntasgd")


def run_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's cell, flat (``"network.nhid"``, ``"method.growth"``, ``"lr"``, ...).

    ``config`` is a ``selfish-rnn`` config as saved in ``config.yaml`` (sections ``model``, ``data``,
    ``trainer``). The model's sparsity arguments are read in either layout: flat LanguageModel arguments
    (``sparsity``, ``method``, ``sparse_init``, ``static``, ``sparsity_options``, ...) or one nested group of the
    callback's own arguments (``sparsity: {sparsity: 0.67, method: ..., init: ...}``, or null for dense).
    """
    model = dict(config.get("model") or {})
    data = dict(config.get("data") or {})
    trainer = dict(config.get("trainer") or {})
    settings: dict[str, Any] = {}

    network = model.pop("network", None) or {}
    if isinstance(network, Mapping):
        settings["network"] = str(network.get("class_path", "")).rsplit(".", 1)[-1] or None
        for key, value in (network.get("init_args") or {}).items():
            if key != "ntoken":  # linked from the corpus
                settings[f"network.{key}"] = _plain(value)

    level, group = _sparsity_group(model)
    settings["sparsity"] = None if level is None else float(level)
    if level is not None:
        settings.update({f"method.{key}": value for key, value in _method_parts(group).items()})

    optimizer = str(model.get("optimizer") or "sntasgd")
    settings["optimizer"] = optimizer
    for key in ("lr", "weight_decay", "clip"):
        settings[key] = _plain(model.get(key))
    if optimizer in _AVERAGING:
        settings["nonmono"] = model.get("nonmono")
        settings["restart_at_epochs"] = tuple(int(e) for e in model.get("restart_at_epochs") or ())
    if optimizer == "momentum":
        settings["momentum"] = _plain(model.get("momentum"))
    if optimizer == "adam":
        settings["adam_betas"] = _plain(model.get("adam_betas"))
        settings["adam_eps"] = _plain(model.get("adam_eps"))
    if optimizer in ("adam", "momentum"):
        from lightning_selfish_recipes.training.optimizers import PLATEAU_DEFAULTS

        factor, patience = PLATEAU_DEFAULTS[optimizer]
        given_factor, given_patience = model.get("plateau_factor"), model.get("plateau_patience")
        settings["plateau_factor"] = float(factor if given_factor is None else given_factor)
        settings["plateau_patience"] = int(patience if given_patience is None else given_patience)

    for key in _DATA:
        if key != "max_seq_len_delta" or data.get("variable_bptt"):
            settings[f"data.{key}"] = _plain(data.get(key))
    for key in _TRAINER:
        settings[f"trainer.{key}"] = _trainer_value(key, trainer.get(key))
    return settings


def _sparsity_group(model: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """The sparsity level and the sparsity callback's arguments by its own names, from either model layout."""
    sparsity = model.get("sparsity")
    if isinstance(sparsity, Mapping):  # nested: the callback's own arguments, each left out at its default
        group = {**_callback_defaults(), **dict(sparsity)}
        return group.pop("sparsity", None), {k: v for k, v in group.items() if k not in _NOT_COMPARED_SPARSITY}
    group = {new: model.get(old) for old, new in _FLAT_SPARSITY.items()}
    group.update(model.get("sparsity_options") or {})
    if model.get("static"):
        group["method"] = "static"
    return sparsity, {k: v for k, v in group.items() if k not in _NOT_COMPARED_SPARSITY}


@functools.cache
def _callback_defaults() -> dict[str, Any]:
    from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback

    return {k: v for k, v in _defaults(SelfishSparsityCallback).items() if k != "sparsity"}


def _method_parts(group: Mapping[str, Any]) -> dict[str, Any]:
    """Every part of the method, the preset's value where ``group`` leaves it unset (None)."""
    from lightning_selfish.method.catalogue import METHODS

    method = str(group.get("method") or "selfish")
    parts: dict[str, Any] = {"name": method}
    preset = METHODS.get(method)
    preset_parts = preset.values() if preset is not None else {}
    for key in sorted(set(preset_parts) | {k for k in group if k != "method"}):
        value = group.get(key)
        parts[key] = _plain(preset_parts.get(key) if value is None else value)
    gates = parts.get("gate_redistribution")
    parts["gate_redistribution"] = {True: "joint", False: "none", None: "joint"}.get(gates, gates)
    if parts.get("exclude") is not None:
        parts["exclude"] = tuple(sorted(parts["exclude"]))
    schedule = parts.get("schedule")
    if schedule == "never":  # static: nothing changes after the initial masks
        parts = {k: v for k, v in parts.items() if k in ("name", "init", "schedule", "include", "exclude")}
    elif schedule == "gmp":  # pruning to a sparsity schedule: no prune rate
        parts = {k: v for k, v in parts.items() if k not in ("prune_rate", "min_prune_rate")}
    return parts


def _trainer_value(key: str, value: Any) -> Any:
    if key.startswith("limit_") and value is None:
        return 1.0
    if key == "max_steps" and value is None:
        return -1
    if key == "accumulate_grad_batches" and value is None:
        return 1
    if key == "precision":
        return "32-true" if value in (None, 32, "32") else str(value)
    return _plain(value)


def _plain(value: Any) -> Any:
    """Lists as tuples (hashable, and ``[0, 0.999]`` equal to ``(0.0, 0.999)``), ints as floats where mixed."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _plain(v)) for k, v in value.items()))
    return value


# ------------------------------------------------------------------------------------------------------------
# a row's settings: its command's config with the classes' defaults
# ------------------------------------------------------------------------------------------------------------


def row_config(row: PaperRow) -> dict[str, Any]:
    """The config the row's command composes: its ``--config`` files merged in order, then its arguments."""
    config: dict[str, Any] = {}
    args = row.command_args()
    for flag, value in zip(args[::2], args[1::2]):
        if flag == "--config":
            path = CONFIG_DIR / Path(value).relative_to(CONFIGS)
            _merge(config, yaml.safe_load(path.read_text()) or {})
        else:
            _merge(config, _nested(flag.removeprefix("--").split("."), yaml.safe_load(value)))
    return config


@functools.cache
def paper_epochs(row: PaperRow) -> int:
    """The epochs the row's command trains (the paper's): its configs' ``trainer.max_epochs``."""
    return int(row_config(row)["trainer"]["max_epochs"])


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge ``update`` into ``into`` as LightningCLI composes configs: mappings key by key, other values replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _nested(keys: Sequence[str], value: Any) -> dict[str, Any]:
    return {keys[0]: _nested(keys[1:], value) if len(keys) > 1 else value}


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every argument it leaves out at its class's default (model, network, data, trainer)."""
    from lightning_selfish_recipes.compat import pl
    from lightning_selfish_recipes.data import LanguageModelingDataModule
    from lightning_selfish_recipes.lm import LanguageModel

    config = with_current_class_paths(config)  # a run of an earlier version: recipes.models.X
    full = {key: dict(value) if isinstance(value, Mapping) else value for key, value in config.items()}
    for section, cls in (("model", LanguageModel), ("data", LanguageModelingDataModule), ("trainer", pl.Trainer)):
        full[section] = {**_defaults(cls), **(full.get(section) or {})}
    network = full["model"].get("network")
    if isinstance(network, Mapping) and network.get("class_path"):
        network = dict(network)
        network["init_args"] = {**_defaults(_import(network["class_path"])), **(network.get("init_args") or {})}
        full["model"]["network"] = network
    return full


@functools.cache
def _defaults(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    if not module:
        module = "lightning_selfish_recipes.models"
    return getattr(importlib.import_module(module), name)


@functools.cache
def cell_settings(row: PaperRow) -> dict[str, Any]:
    """:func:`run_settings` of the row's command, every argument it leaves out at its default."""
    return run_settings(with_defaults(row_config(row)))


# ------------------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One setting in which a run differs from a cell: its value in the run and in the cell's command."""

    setting: str
    run: Any
    cell: Any

    def __str__(self) -> str:
        return f"{self.setting} {_show(self.run)} (cell: {_show(self.cell)})"


def differences(row: PaperRow, settings: Mapping[str, Any]) -> list[Difference]:
    """The settings of a run (:func:`run_settings`) that differ from those of ``row``'s command."""
    cell = cell_settings(row)
    found = []
    for key in sorted(set(cell) | set(settings)):
        ours, theirs = settings.get(key), cell.get(key)
        if key == "sparsity":
            same = (ours is None) == (theirs is None) and (
                ours is None or round(float(ours), 2) == row.printed_sparsity
            )
        else:
            same = _same(ours, theirs)
        if not same:
            found.append(Difference(key, ours, theirs))
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-12)
    return a == b


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
