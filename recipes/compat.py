"""Which Lightning package the recipes and the ``selfish-rnn`` command build on.

Lightning ships as two packages with the same code under two names: ``pytorch_lightning`` (a dependency of this
project) and the unified ``lightning`` package (``import lightning.pytorch as pl``). Their classes are distinct: a
``lightning.pytorch.Trainer`` refuses a ``pytorch_lightning.LightningModule`` and the other way round. The library
(``lightning_selfish``) works with both Trainers as it is; the recipes' ``LanguageModel`` and
``LanguageModelingDataModule`` must subclass the package of the Trainer that runs them, so they are built on the
package chosen here, once per process, when :mod:`recipes` is first imported:

* ``SELFISH_RNN_LIGHTNING=pytorch_lightning`` (the default): ``pytorch_lightning``;
* ``SELFISH_RNN_LIGHTNING=lightning``: ``lightning.pytorch`` (needs ``pip install lightning``).

Any other value is an error, never a silent fallback. Use :data:`pl` (the selected package) and :func:`module`
(its submodules, e.g. ``module("cli")``) instead of importing either package by name.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ENV_VAR = "SELFISH_RNN_LIGHTNING"
"""Environment variable that selects the Lightning package of the recipes."""

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


__all__ = ["DEFAULT", "ENV_VAR", "PACKAGE", "PACKAGES", "module", "pl", "selected"]
