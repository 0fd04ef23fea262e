"""The ``argparse`` types of the tools' options (``selfish-rnn analyze``, ``generate``)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An ``argparse`` type for the tools' options: a whole number >= 1, or a clear error naming what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value
