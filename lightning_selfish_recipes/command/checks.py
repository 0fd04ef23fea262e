"""The checks ``selfish-rnn`` makes right after parsing, before the corpus is read: the model's arguments with the
real constructor and callbacks, and a ``fit`` that would train nothing."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from lightning_selfish_recipes.lm import LanguageModel

__all__ = ["check_model_arguments", "check_trains_something"]


def check_model_arguments(model_config: Any) -> None:
    """Validate ``--model.*`` with the real constructor and callbacks, on a stand-in network (no corpus needed).

    ``LanguageModel`` names an argument as its constructor does (``lr``, ``sparsity.sparsity``); the error says the
    option the command takes (``--model.lr``, ``--model.sparsity.sparsity``).
    """
    arguments = model_config.as_dict() if hasattr(model_config, "as_dict") else dict(model_config)
    arguments = {key: value for key, value in arguments.items() if key != "network" and not key.startswith("__")}
    try:
        LanguageModel(_StandInNetwork(), **arguments).configure_callbacks()
    except (TypeError, ValueError) as error:
        message = str(error)
        if re.split(r"[ .:=]", message, maxsplit=1)[0] not in arguments:
            raise
        raise type(error)(f"--model.{message}") from error


#: Trainer arguments whose 0 leaves a fit nothing to train, with what they count.
_RUN_LENGTH_ARGUMENTS = (
    ("max_epochs", "epochs"),
    ("max_steps", "optimizer steps"),
    ("limit_train_batches", "training batches per epoch"),
)


def check_trains_something(trainer_config: Any) -> None:
    """Refuse a ``fit`` that cannot train a single step, before anything is created.

    Lightning ends such a fit at once and reports success (``selfish-rnn fit: done``, exit status 0, an empty log
    folder): ``--trainer.max_epochs 0``, ``--trainer.max_steps 0`` or ``--trainer.limit_train_batches 0``.
    """
    for key, counted in _RUN_LENGTH_ARGUMENTS:
        value = trainer_config.get(key)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ValueError(
                f"--trainer.{key} {value} trains nothing (0 {counted}): selfish-rnn fit needs at least one training "
                f"step; give a positive --trainer.{key} (or leave it out)"
            )


class _StandInNetwork(nn.Module):
    """The smallest network with the interface ``LanguageModel`` checks, to validate its other arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))

    def init_hidden(self, batch_size: int) -> None:
        return None

    def forward(self, input: Tensor, hidden: Any) -> Any:  # never called
        raise NotImplementedError
