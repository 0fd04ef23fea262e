"""The checks of ``LanguageModel``'s arguments: each error names the argument, what was given and what is allowed."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lightning_selfish_recipes.training.optimizers import OPTIMIZERS


def check_network(network: Any) -> None:
    """A ``torch.nn.Module`` with ``init_hidden`` and ``forward`` (lightning_selfish_recipes.models.LMOutput)."""
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
    for required in ("init_hidden", "forward"):
        if not callable(getattr(network, required, None)):
            raise TypeError(
                f"network {type(network).__name__} has no {required}(): see lightning_selfish_recipes.models.LMOutput"
            )


def check_training_arguments(
    *, optimizer: Any, lr: Any, clip: Any, bptt: Any, nonmono: Any, plateau_factor: Any
) -> None:
    """The optimizer's name, the learning rate, the clip, the mean window length, NT-ASGD's interval and the
    plateau factor (in this order: the first wrong one is reported)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    check_positive_number("lr", lr)
    if clip is not None:
        check_positive_number("clip", clip)
    if not isinstance(bptt, int) or isinstance(bptt, bool) or bptt < 1:
        raise ValueError(f"bptt must be a positive int, got {bptt!r}")
    if not isinstance(nonmono, int) or isinstance(nonmono, bool) or nonmono < 1:
        raise ValueError(f"nonmono must be an int >= 1, got {nonmono!r}")
    if plateau_factor is not None and not 0.0 < plateau_factor < 1.0:
        raise ValueError(f"plateau_factor must be in (0, 1), got {plateau_factor!r}")


def check_small_batch_size(small_batch_size: Any) -> None:
    if small_batch_size is not None and (
        isinstance(small_batch_size, bool) or not isinstance(small_batch_size, int) or small_batch_size < 1
    ):
        raise ValueError(f"small_batch_size must be a positive int or None, got {small_batch_size!r}")


def check_training_seed(training_seed: Any) -> None:
    if training_seed is not None and (isinstance(training_seed, bool) or not isinstance(training_seed, int)):
        raise TypeError(f"training_seed must be an int or None, got {training_seed!r}")


def check_single_device_for_column_groups(small_batch_size: int | None, world_size: int) -> None:
    """``small_batch_size`` runs a backward per column group inside one step: one process only."""
    if small_batch_size is not None and world_size > 1:
        raise ValueError(
            f"small_batch_size={small_batch_size} runs a backward per column group inside one training step, "
            f"which is only supported on a single device, not with {world_size} processes: give "
            "each process a smaller data.batch_size instead, or small_batch_size=None"
        )


def check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
