"""Class paths saved by earlier versions, whose recipes were the top-level package ``recipes``.

Runs of those versions saved ``class_path: recipes.models.StackedLSTM`` in their ``config.yaml``, ``hparams.yaml``
and checkpoints; the package is now :mod:`lightning_selfish_recipes` (``recipes`` is another project's name on the
package index). What only reads a finished run (``selfish-rnn results``, ``export``, ``generate``, ``analyze``) maps
such a path to the current one (:func:`with_current_class_paths`). ``selfish-rnn fit``/``test`` refuse a config
(:func:`check_config_files`) or a ``--ckpt_path`` file (:func:`check_checkpoint`) that names one, before any work, in
one line naming the new path and ``python -m lightning_selfish_recipes.old_names RUN``, which updates a run's files
once (:func:`update_files`); a new run never writes the old name. docs/recipes.md ("Runs of earlier versions").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "OLD_PACKAGE",
    "PACKAGE",
    "check_checkpoint",
    "check_config_files",
    "current_class_path",
    "main",
    "update_files",
    "with_current_class_paths",
]

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

    Raises ``ValueError`` with one line naming the file, the old path, the new one and the command that updates the
    file. Arguments that are not files (a config given as a YAML string, other options) are left to the parser.
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
            in_a_run = path.name in _RUN_FILES and (path.parent / "checkpoints").is_dir()
            raise ValueError(_refusal(path, old[0], path.parent if in_a_run else path))


def check_checkpoint(ckpt_path: Any) -> None:
    """Refuse a checkpoint file whose hyperparameters name a class by its old path.

    LightningCLI reads the model's arguments from the ``--ckpt_path`` file into the config, where the old path cannot
    be imported. Raises ``ValueError`` with one line naming the new path and the command that updates the run.
    """
    if not isinstance(ckpt_path, str | Path) or not Path(ckpt_path).is_file():
        return
    path = Path(ckpt_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    old = _old_class_paths(checkpoint.get("hyper_parameters")) if isinstance(checkpoint, Mapping) else []
    if old:
        run = path.parent.parent if path.parent.name == "checkpoints" else path
        raise ValueError(_refusal(path, old[0], run))


def _refusal(path: Path, old: str, update: Path) -> str:
    return (
        f"{path} names class_path {old}, now {current_class_path(old)} (the recipes' package was renamed from "
        f"{OLD_PACKAGE} to {PACKAGE}): update it once with python -m {__name__} {update}"
    )


# ------------------------------------------------------------------------------------------ updating old runs

_YAML_CLASS_PATH = re.compile(rf"(\b_?class_path:\s*[\"']?){OLD_PACKAGE}\.")
_RUN_FILES = ("config.yaml", "hparams.yaml")


def update_files(path: Path) -> list[Path]:
    """Give the current class paths to the files of a run of an earlier version, in place; returns those changed.

    ``path`` is a run's directory (every ``config.yaml``, ``hparams.yaml`` and ``*.ckpt`` below it), or one such
    file or any YAML config. Only the class paths change: the YAML text is edited line by line (comments kept), a
    checkpoint keeps everything but its hyperparameters' class paths. Each file is replaced whole, never half written.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.name in _RUN_FILES or p.suffix == ".ckpt"))
    elif path.is_file() and path.suffix in (".ckpt", ".yaml", ".yml"):
        files = [path]
    elif path.is_file():
        raise ValueError(f"{path}: not a checkpoint (.ckpt) or a YAML config (.yaml, .yml)")
    else:
        raise FileNotFoundError(f"{path}: no such run directory or file")
    changed = []
    for file in files:
        if file.suffix == ".ckpt":
            checkpoint = torch.load(file, map_location="cpu", weights_only=False)
            if not _old_class_paths(checkpoint.get("hyper_parameters")):
                continue
            checkpoint["hyper_parameters"] = with_current_class_paths(checkpoint["hyper_parameters"])
            _replace(file, lambda target, checkpoint=checkpoint: torch.save(checkpoint, target))
        else:
            text = file.read_text()
            updated = _YAML_CLASS_PATH.sub(rf"\g<1>{PACKAGE}.", text)
            if updated == text:
                continue
            _replace(file, lambda target, updated=updated: target.write_text(updated))
        changed.append(file)
    return changed


def _replace(file: Path, write: Callable[[Path], None]) -> None:
    temporary = file.with_name(f".{file.name}.updating")
    write(temporary)
    os.replace(temporary, file)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_selfish_recipes.old_names PATH...``: update runs (or configs) of earlier versions."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}",
        description=f"Rename the class paths of the package {OLD_PACKAGE} to {PACKAGE} in the config.yaml, "
        "hparams.yaml and checkpoints of runs of earlier versions (or in YAML configs), in place.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run's directory or a file")
    arguments = parser.parse_args(argv)
    for path in arguments.paths:
        try:
            changed = update_files(path)
        except (FileNotFoundError, ValueError) as error:
            sys.stderr.write(f"error: {error}\n")
            return 2
        for file in changed:
            sys.stdout.write(f"updated {file}\n")
        if not changed:
            sys.stdout.write(f"{path}: nothing names {OLD_PACKAGE}.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
