"""What the ``selfish-rnn`` command says of a mistake: one ``error:`` line for a user error, the traceback for a bug.

A mistake in arguments, a config or the data ends in one ``error: <message>`` line on stderr and exit status 2,
without a traceback; everything else is a bug and keeps its traceback (``--debug`` shows the traceback of user errors
too). These are user errors:

* a command-line or config parsing error (``argparse.ArgumentError``, which jsonargparse raises), said in the
  command's terms by :mod:`lightning_selfish_recipes.command.parse_errors` (the mistakes inside an argument group
  such as ``--model.sparsity``: :data:`GROUPS`);
* ``FileNotFoundError``, wherever it is raised (a corpus, a config, a checkpoint that is not there), and the
  corpus errors of :mod:`lightning_selfish_recipes.data` (a file whose checksum does not match);
* Lightning's ``MisconfigurationException`` (e.g. an accelerator that is not available);
* ``ValueError`` and ``TypeError`` raised *deliberately*, by a ``raise`` statement, in the argument checks of this
  project (``lightning_selfish_recipes``, ``lightning_selfish``), of Lightning or of jsonargparse. The same types raised
  anywhere else (inside torch, or by an operation that failed in our own code, such as an unpacking) are treated as
  bugs.

The command's plain-text help is :mod:`lightning_selfish_recipes.command.help`, its filter of dependency noise
:mod:`lightning_selfish_recipes.command.noise`; their public names are also importable from here.
"""

from __future__ import annotations

import argparse
import importlib.util
import linecache
import re
from collections.abc import Sequence
from pathlib import Path

from lightning_selfish_recipes.command.help import PlainTextHelpFormatter, plain_text
from lightning_selfish_recipes.command.noise import (
    NOISE_LOG_MESSAGES,
    NOISE_WARNINGS,
    expect_checkpoints_in_log_dir,
    quiet_dependency_noise,
)
from lightning_selfish_recipes.command.parse_errors import GROUPS, Group, group_error_message, plain_type_error
from lightning_selfish_recipes.tools.options import positive_int

__all__ = [
    "GROUPS",
    "NOISE_LOG_MESSAGES",
    "NOISE_WARNINGS",
    "Group",
    "PlainTextHelpFormatter",
    "expect_checkpoints_in_log_dir",
    "plain_text",
    "positive_int",
    "quiet_dependency_noise",
    "user_error_message",
]

_PACKAGES = (
    "lightning_selfish_recipes",
    "lightning_selfish",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "jsonargparse",
)
_MAX_MESSAGE = 600

# ------------------------------------------------------------------------------------------------- user errors


def user_error_message(
    error: BaseException,
    argv: Sequence[str] = (),
    commands: Sequence[str] | None = None,
    example_config: str | None = None,
) -> str | None:
    """One line that states the user error ``error``, or None when ``error`` is a bug (see the module docstring).

    A parsing error ends with the help command of the subcommand in ``argv`` when it is one of ``commands``;
    required arguments missing from an ``argv`` without ``--config`` say to start from ``example_config``.
    """
    kind = {cls.__name__ for cls in type(error).__mro__}
    if isinstance(error, argparse.ArgumentError):  # what jsonargparse raises (exit_on_error=False)
        group_message = group_error_message(str(error))
        if group_message is not None:
            return _shorten(group_message)
        message = _one_line(str(error))
        message = re.sub(r'^Parser key "([^"]+)":', r"--\1:", message)
        message = plain_type_error(message)
        subcommand = next((a for a in argv if not a.startswith("-")), None)
        known = subcommand is not None and (commands is None or subcommand in commands)
        required = _REQUIRED.match(message)
        if required is not None:
            keys = [key.strip() for key in required["keys"].split(",")]
            keys = [f"--{key.removeprefix(f'{subcommand}.') if subcommand else key}" for key in keys]
            message = f"{required['start']}{', '.join(keys)}"
            if known and example_config is not None and not _gives_config(argv):
                return _shorten(
                    f"{message}; no --config was given: start from a recipe, e.g. selfish-rnn {subcommand} --config "
                    f"{example_config} (selfish-rnn list shows them all; selfish-rnn {subcommand} --help lists the "
                    "arguments)"
                )
        hint = f" (selfish-rnn {subcommand} --help lists the arguments)" if known else ""
        return _shorten(message) + hint
    if isinstance(error, FileNotFoundError) or "CorpusError" in kind or "MisconfigurationException" in kind:
        return _shorten(_one_line(str(error)))
    if isinstance(error, (ValueError, TypeError)) and _raised_deliberately(error):
        return _shorten(_one_line(str(error)))
    return None


_REQUIRED = re.compile(r"^(?P<start>the following arguments are required: )(?P<keys>.*)$")


def _gives_config(argv: Sequence[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)


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
