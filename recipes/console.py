"""What the ``selfish-rnn`` command prints: one-line user errors, plain-text help, no dependency noise.

**User errors.** A mistake in arguments, a config or the data ends in one ``error: <message>`` line on stderr and
exit status 2, without a traceback; everything else is a bug and keeps its traceback (``--debug`` shows the
traceback of user errors too). These are user errors:

* a command-line or config parsing error (``argparse.ArgumentError``, which jsonargparse raises);
* ``FileNotFoundError``, wherever it is raised (a corpus, a config, a checkpoint that is not there), and the
  corpus errors of :mod:`recipes.data` (a file whose checksum does not match);
* Lightning's ``MisconfigurationException`` (e.g. an accelerator that is not available);
* ``ValueError`` and ``TypeError`` raised *deliberately*, by a ``raise`` statement, in the argument checks of this
  project (``recipes``, ``lightning_selfish``), of Lightning or of jsonargparse. The same types raised anywhere
  else (inside torch, or by an operation that failed in our own code, such as an unpacking) are treated as bugs.

**Noise.** Lightning prints lines a user of this command cannot act on; they are filtered by message *and*
emitting module or logger, never by category alone, so anything else Lightning says still shows.
"""

from __future__ import annotations

import argparse
import importlib.util
import linecache
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import DefaultHelpFormatter

__all__ = [
    "NOISE_LOG_MESSAGES",
    "NOISE_WARNINGS",
    "PlainTextHelpFormatter",
    "expect_checkpoints_in_log_dir",
    "plain_text",
    "quiet_dependency_noise",
    "user_error_message",
]

_PACKAGES = ("recipes", "lightning_selfish", "pytorch_lightning", "lightning", "lightning_fabric", "jsonargparse")
_MAX_MESSAGE = 600

# ------------------------------------------------------------------------------------------------- user errors


def user_error_message(error: BaseException, argv: Sequence[str] = ()) -> str | None:
    """One line that states the user error ``error``, or None when ``error`` is a bug (see the module docstring)."""
    kind = {cls.__name__ for cls in type(error).__mro__}
    if isinstance(error, argparse.ArgumentError):  # what jsonargparse raises (exit_on_error=False)
        message = _one_line(str(error))
        message = re.sub(r'^Parser key "([^"]+)":', r"--\1:", message)
        subcommand = next((a for a in argv if not a.startswith("-")), None)
        hint = f" (selfish-rnn {subcommand} --help lists the arguments)" if subcommand else ""
        return _shorten(message) + hint
    if isinstance(error, FileNotFoundError) or "CorpusError" in kind or "MisconfigurationException" in kind:
        return _shorten(_one_line(str(error)))
    if isinstance(error, (ValueError, TypeError)) and _raised_deliberately(error):
        return _shorten(_one_line(str(error)))
    return None


def _raised_deliberately(error: BaseException) -> bool:
    """Whether the innermost frame of ``error`` is a ``raise`` statement in one of the trusted packages."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not any(Path(filename).is_relative_to(root) for root in _package_dirs(_PACKAGES)):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def _package_dirs(packages: Sequence[str]) -> list[Path]:
    """The directories of the installed ``packages`` (found without importing them)."""
    dirs = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(location) for location in spec.submodule_search_locations)
    return dirs


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


# --------------------------------------------------------------------------------------------------------- help


_ROLES = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup: ````x```` -> ``x``, ``:class:`~a.B``` -> ``B``."""
    text = _ROLES.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"(?<![\w`])`([^`]+)`(?!`)", r"\1", text)


class PlainTextHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the reStructuredText of the docstrings it shows turned into plain text."""

    def _expand_help(self, action):  # type: ignore[no-untyped-def]
        return plain_text(super()._expand_help(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


# -------------------------------------------------------------------------------------------------------- noise

NOISE_LOG_MESSAGES: tuple[str, ...] = (
    "💡 Tip: For seamless cloud",  # advertising for litlogger / litmodels, on every run
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
