"""Dependency noise the ``selfish-rnn`` process drops: lines a user of the command cannot act on, filtered by
message *and* emitting module or logger, never by category alone, so anything else Lightning says still shows."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

__all__ = ["NOISE_LOG_MESSAGES", "NOISE_WARNINGS", "expect_checkpoints_in_log_dir", "quiet_dependency_noise"]

NOISE_LOG_MESSAGES: tuple[str, ...] = (
    "💡 Tip: For seamless cloud",  # advertising for litlogger / litmodels, on every run
    # The command's own model summary (lightning_selfish_recipes.model_summary) replaces Lightning's default,
    # which Lightning says.
    "Trainer already configured with model summary callbacks",
)
"""Start of the INFO lines of Lightning's rank-zero logger that are dropped."""

_RANK_ZERO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
_LIGHTNING_MODULE = r"(pytorch_lightning|lightning\.pytorch)\."

#: (message regex, category, emitting module regex) of the warnings that are ignored.
NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning's own pytree helper still builds torch's deprecated LeafSpec (torch >= 2.10); nothing to act on.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, _LIGHTNING_MODULE + r"utilities\._pytree"),
    # The recipes' loaders use no worker processes on purpose: the data is an in-memory tensor (docs/data.md).
    (r"The '\w+' does not have many workers", Warning, _LIGHTNING_MODULE),
)


def expect_checkpoints_in_log_dir() -> None:
    """A run that continues its own log version finds its checkpoints there: Lightning's warning that the
    checkpoint directory is not empty says nothing then (installed only for such runs)."""
    warnings.filterwarnings(
        "ignore", message=r"Checkpoint directory .* exists and is not empty", module=_LIGHTNING_MODULE
    )


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependency_noise() -> None:
    """Drop the dependency messages listed in :data:`NOISE_LOG_MESSAGES` and :data:`NOISE_WARNINGS`.

    For the ``selfish-rnn`` process only (the library never changes warning filters or logging).
    """
    for message, category, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(NOISE_LOG_MESSAGES))
