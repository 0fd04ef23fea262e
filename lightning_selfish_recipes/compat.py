"""Which Lightning package the recipes and the ``selfish-rnn`` command build on.

Lightning ships as two packages with the same code under two names: ``pytorch_lightning`` (a dependency of this
project) and the unified ``lightning`` package (``import lightning.pytorch as pl``). Their classes are distinct: a
``lightning.pytorch.Trainer`` refuses a ``pytorch_lightning.LightningModule`` and the other way round. The library
(``lightning_selfish``) works with both Trainers as it is; the recipes' ``LanguageModel`` and
``LanguageModelingDataModule`` must subclass the package of the Trainer that runs them, so they are built on the
package chosen here, once per process, when :mod:`lightning_selfish_recipes` is first imported:

* ``SELFISH_RNN_LIGHTNING=pytorch_lightning`` (the default): ``pytorch_lightning``;
* ``SELFISH_RNN_LIGHTNING=lightning``: ``lightning.pytorch`` (needs ``pip install lightning``).

Any other value is an error, never a silent fallback. Use :data:`pl` (the selected package) and :func:`module`
(its submodules, e.g. ``module("cli")``) instead of importing either package by name.

The private attributes of other libraries the recipes need, where no public API gives the same, are read here only,
one function each; ``tests/recipes/test_compat.py`` fails when a library changes one of them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

ENV_VAR = "SELFISH_RNN_LIGHTNING"
"""Environment variable that selects the Lightning package of the lightning_selfish_recipes."""

PACKAGES: dict[str, str] = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}
"""Accepted values of :data:`ENV_VAR` and the module each one selects."""

DEFAULT = "pytorch_lightning"


def selected() -> str:
    """The value of :data:`ENV_VAR`, checked (default ``"pytorch_lightning"``)."""
    value = os.environ.get(ENV_VAR, "").strip() or DEFAULT
    if value not in PACKAGES:
        raise ValueError(f"{ENV_VAR} must be one of {list(PACKAGES)}, got {value!r}")
    return value


PACKAGE: str = PACKAGES[selected()]
"""Import name of the selected package: ``"pytorch_lightning"`` or ``"lightning.pytorch"``."""

try:
    pl: ModuleType = importlib.import_module(PACKAGE)
except ImportError as error:  # only possible for the optional unified package
    raise ImportError(
        f"{ENV_VAR}={selected()} selects {PACKAGE}, which is not installed: pip install lightning"
    ) from error


def module(name: str) -> ModuleType:
    """The submodule ``name`` (e.g. ``"cli"``, ``"loggers"``) of the selected package."""
    return importlib.import_module(f"{PACKAGE}.{name}")


# --------------------------------------------------------------------------------------------------------------
# private attributes of other libraries, one function each
# --------------------------------------------------------------------------------------------------------------


def given_hyperparameters() -> Any:
    """The arguments ``LightningCLI`` instantiates the module with (Lightning's ``_given_hyperparameters`` context
    variable; ``None`` outside the CLI): the parsed config, where ``network`` is a class path, not a module."""
    return module("core.mixins.hparams_mixin")._given_hyperparameters.get()


def logs_this_step(trainer: Any) -> bool:
    """Lightning's own rule for the steps whose metrics reach the loggers (``log_every_n_steps``; private,
    ``trainer._logger_connector.should_update_logs``)."""
    return bool(trainer._logger_connector.should_update_logs)


def tensorboard_hparams(logger: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as ``TensorBoardLogger.log_hyperparams`` writes them (Lightning's private conversion, flattening
    and sanitising), for an *HParams* summary written beside Lightning's."""
    from lightning_fabric.utilities.logger import _convert_params, _flatten_dict

    return logger._sanitize_params(_flatten_dict(dict(_convert_params(dict(params)))))


def tensorboard_file_writer(logger: Any) -> Any:
    """The event-file writer of a ``TensorBoardLogger``'s ``SummaryWriter`` (``_get_file_writer``: the public
    ``file_writer`` is ``None`` after the writer was flushed and closed; this one reopens it)."""
    return logger.experiment._get_file_writer()


def argument_groups(parser: Any) -> list[Any]:
    """An argparse (jsonargparse) parser's argument groups, in ``--help`` order (argparse's ``_action_groups``)."""
    return parser._action_groups


def set_argument_groups(parser: Any, groups: list[Any]) -> None:
    """Reorder the groups ``--help`` prints (argparse's ``_action_groups``)."""
    parser._action_groups = groups


def group_actions(group: Any) -> list[Any]:
    """The arguments of one argparse argument group (argparse's ``_group_actions``)."""
    return group._group_actions


def forget_rnn_weights(rnn: Any, names: Sequence[str]) -> None:
    """Make an ``nn.RNNBase`` forget the tensors it caches for its weights ``names`` (``_flat_weights`` and their
    weak references ``_flat_weight_refs``), which a weight moved out of it (``WeightDrop``) or swapped in for one call
    (``torch.func.functional_call``) leaves behind. Its other weights stay as they are; no public API forgets one
    weight (``_init_flat_weights`` re-reads them all, and is private too)."""
    for name in names:
        index = rnn._flat_weights_names.index(name)
        rnn._flat_weights[index] = None
        rnn._flat_weight_refs[index] = None


def help_formatter(base: type, *, help_text: Callable[[str], str], other_text: Callable[[str], str], name: str) -> type:
    """A subclass of the argparse help formatter ``base`` that passes each argument's help through ``help_text`` and
    every other text it prints (descriptions of the parser and of the groups) through ``other_text``, before its
    wrapping (argparse's ``_expand_help`` and ``_format_text``: argparse has no public hook for either)."""

    def _expand_help(self: Any, action: Any) -> str:
        return help_text(base._expand_help(self, action))

    def _format_text(self: Any, text: str) -> str:
        return base._format_text(self, other_text(text))

    return type(name, (base,), {"_expand_help": _expand_help, "_format_text": _format_text, "__module__": __name__})


def subcommand_parsers(cli: Any) -> dict[str, Any]:
    """The parser of each subcommand of a ``LightningCLI`` (``fit``, ``validate``, ...), once its ``setup_parser`` has
    run with subcommands (LightningCLI's ``_subcommand_parsers``: neither it nor jsonargparse has a public accessor)."""
    return cli._subcommand_parsers


__all__ = [
    "DEFAULT",
    "ENV_VAR",
    "PACKAGE",
    "PACKAGES",
    "argument_groups",
    "forget_rnn_weights",
    "given_hyperparameters",
    "group_actions",
    "help_formatter",
    "logs_this_step",
    "module",
    "pl",
    "selected",
    "set_argument_groups",
    "subcommand_parsers",
    "tensorboard_file_writer",
    "tensorboard_hparams",
]
