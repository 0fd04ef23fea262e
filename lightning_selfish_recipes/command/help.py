"""The ``selfish-rnn`` help: plain text (no reStructuredText of the docstrings it shows), the project's options
first and a few of the Trainer's."""

from __future__ import annotations

import argparse
import re
from typing import Any

from jsonargparse import DefaultHelpFormatter

from lightning_selfish_recipes.compat import argument_groups, group_actions, help_formatter, set_argument_groups

__all__ = ["BRIEF_TRAINER_OPTIONS", "PlainTextHelpFormatter", "arrange_subcommand_help", "plain_text"]

_ROLES = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup: ````x```` -> ``x``, ``:class:`~a.B``` -> ``B``."""
    text = _ROLES.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"(?<![\w`])`([^`]+)`(?!`)", r"\1", text)


_KNOWN_SUBCLASSES = re.compile(r"known subclasses: ([^)]*)\)")
_MAX_SUBCLASSES = 8


def _fewer_subclasses(text: str) -> str:
    """A long list of known subclasses (every torch.nn.Module for the network) cut to this project's own."""

    def cut(match: re.Match[str]) -> str:
        names = [name.strip() for name in match.group(1).split(",") if name.strip()]
        if len(names) <= _MAX_SUBCLASSES:
            return match.group(0)
        ours = [name for name in names if name.startswith(("lightning_selfish_recipes.", "lightning_selfish."))]
        return f"known subclasses: {', '.join(ours)} and {len(names) - len(ours)} others)"

    return _KNOWN_SUBCLASSES.sub(cut, text)


PlainTextHelpFormatter = help_formatter(
    DefaultHelpFormatter,
    help_text=lambda text: _fewer_subclasses(plain_text(text)),
    other_text=plain_text,
    name="PlainTextHelpFormatter",
)
"""jsonargparse's help, with the reStructuredText of the docstrings it shows turned into plain text, and long
lists of known subclasses cut to this project's classes."""


#: The Trainer options ``selfish-rnn fit --help`` shows; ``--help-all`` shows them all.
BRIEF_TRAINER_OPTIONS = (
    "max_epochs",
    "accelerator",
    "devices",
    "precision",
    "limit_train_batches",
    "limit_val_batches",
    "logger",
    "callbacks",
)


def arrange_subcommand_help(parser: Any, subcommand: str, help_all: bool) -> None:
    """A subcommand's help: its usage line, the project's options first (model, data, checkpoint), then the
    Trainer's: a few of them (:data:`BRIEF_TRAINER_OPTIONS`), or all with ``help_all``."""
    parser.usage = f"selfish-rnn {subcommand} --config CONFIG [--ARGUMENT VALUE ...] [--help | --help-all]"
    groups = argument_groups(parser)
    trainer = [g for g in groups if any(a.dest.startswith("trainer.") for a in group_actions(g))]
    set_argument_groups(parser, [g for g in groups if g not in trainer] + trainer)
    if not help_all:
        for group in trainer:
            group.title = f"Trainer (a few options; all of them: selfish-rnn {subcommand} --help-all)"
            group.description = None
            for action in group_actions(group):
                if action.dest.removeprefix("trainer.").split(".")[0] not in BRIEF_TRAINER_OPTIONS:
                    action.help = argparse.SUPPRESS
