"""Class paths saved by earlier versions, whose recipes were the top-level package ``recipes``.

Runs of those versions saved ``class_path: recipes.models.StackedLSTM`` in their ``config.yaml``, ``hparams.yaml``
and checkpoints; the package is now :mod:`lightning_selfish_recipes` (``recipes`` is another project's name on the
package index). What only reads a finished run (``selfish-rnn results``, ``export``, ``generate``, ``analyze``) maps
such a path to the current one with :func:`with_current_class_paths`. A config given to ``selfish-rnn fit`` or
``test`` is refused by :func:`check_config_files`, in one line naming the new path, before any work: a run never
writes the old name into a new config. docs/recipes.md ("Runs of earlier versions").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["OLD_PACKAGE", "PACKAGE", "check_config_files", "current_class_path", "with_current_class_paths"]

OLD_PACKAGE = "recipes"
"""The recipes' top-level package in earlier versions."""

PACKAGE = __name__.rpartition(".")[0]
"""The recipes' package now: ``lightning_selfish_recipes``."""

_CLASS_PATH_KEYS = ("class_path", "_class_path")  # jsonargparse's key; Lightning's in a saved module's hparams


def current_class_path(class_path: str) -> str:
    """``class_path`` as this version names it: ``recipes.models.RHN`` -> ``lightning_selfish_recipes.models.RHN``.

    Any other path (a class of your own, Lightning's logger) is returned unchanged.
    """
    head, dot, rest = class_path.partition(".")
    return f"{PACKAGE}.{rest}" if head == OLD_PACKAGE and dot and rest else class_path


def with_current_class_paths(config: Any) -> Any:
    """A copy of a saved config or of a checkpoint's hyperparameters (nested mappings and lists) in which every
    ``class_path`` under the old package name is the current one; everything else is kept as it is."""
    if isinstance(config, Mapping):
        return {
            key: current_class_path(value)
            if key in _CLASS_PATH_KEYS and isinstance(value, str)
            else with_current_class_paths(value)
            for key, value in config.items()
        }
    if isinstance(config, list | tuple):
        return type(config)(with_current_class_paths(value) for value in config)
    return config


def _old_class_paths(config: Any) -> list[str]:
    """Every ``class_path`` of ``config`` under the old package name, in the order met."""
    if isinstance(config, Mapping):
        found = []
        for key, value in config.items():
            if key in _CLASS_PATH_KEYS and isinstance(value, str) and current_class_path(value) != value:
                found.append(value)
            else:
                found.extend(_old_class_paths(value))
        return found
    if isinstance(config, list | tuple):
        return [path for value in config for path in _old_class_paths(value)]
    return []


def check_config_files(args: Sequence[Any]) -> None:
    """Refuse a ``--config`` file (``--config FILE`` or ``--config=FILE``) that names a class by its old path.

    Raises ``ValueError`` with one line naming the file, the old path and the new one. Arguments that are not
    files (a config given as a YAML string, other options) are left to the parser.
    """
    for position, argument in enumerate(args):
        if not isinstance(argument, str):
            continue
        if argument == "--config" and position + 1 < len(args):
            given = args[position + 1]
        elif argument.startswith("--config="):
            given = argument.removeprefix("--config=")
        else:
            continue
        path = Path(str(given))
        if not path.is_file():
            continue
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue  # the parser reports an unreadable config in its own words
        old = _old_class_paths(config)
        if old:
            raise ValueError(
                f"{path} names class_path {old[0]}, now {current_class_path(old[0])} (the recipes' package was "
                f"renamed from {OLD_PACKAGE} to {PACKAGE}): replace 'class_path: {OLD_PACKAGE}.' by "
                f"'class_path: {PACKAGE}.' in that file"
            )
