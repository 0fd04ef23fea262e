"""Truncated BPTT: the hidden state carried from window to window (detached, moved, kept in checkpoints per rank),
the learning rate of a variable-length window, and the run length that variable BPTT gives the prune-rate cosine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def detach_hidden(hidden: Any) -> Any:
    """Detach a hidden state made of tensors nested in tuples and lists (truncated BPTT)."""
    if isinstance(hidden, Tensor):
        return hidden.detach()
    if isinstance(hidden, tuple):
        return tuple(detach_hidden(h) for h in hidden)
    if isinstance(hidden, list):
        return [detach_hidden(h) for h in hidden]
    return hidden


def to_device(hidden: Any, device: Any) -> Any:
    """A carried hidden state (tensors nested in tuples and lists, with ints beside them) on ``device``."""
    if isinstance(hidden, Tensor):
        return hidden.to(device)
    if isinstance(hidden, (tuple, list)):
        return type(hidden)(to_device(h, device) for h in hidden)
    return hidden


def carried_states_of_every_rank(hidden: Any, trainer: Any) -> list[Any]:
    """The carried state of every process, on the CPU, in rank order (what a checkpoint keeps): every rank carries
    its own columns' states."""
    hidden = to_device(hidden, "cpu")
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        ranks: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, hidden)
        return ranks
    return [hidden]


def carried_state_of_this_rank(ranks: Any, trainer: Any, warn: Any) -> Any:
    """This process's carried state from a checkpoint's :func:`carried_states_of_every_rank`; None (a zero state)
    when the checkpoint has none (older checkpoints) or was written by another number of processes (said by
    ``warn``)."""
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    if isinstance(ranks, list) and len(ranks) == world_size:
        return ranks[rank]
    if isinstance(ranks, list):
        warn(
            f"the checkpoint holds the carried hidden states of {len(ranks)} process(es), this run has "
            f"{world_size}: a resume in the middle of an epoch starts the hidden state at zero"
        )
    return None


def window_lr_scale(batch: Any, bptt: int) -> float:
    """Variable BPTT: a window of ``seq_len`` steps trains at ``lr * seq_len / bptt``."""
    seq_len = batch[2] if len(batch) > 2 else batch[0].size(0)
    return float(seq_len) / bptt


@contextlib.contextmanager
def scaled_lr(optimizer: Any, scale: float) -> Iterator[None]:
    """Every parameter group's learning rate times ``scale`` inside the block, the configured one restored after."""
    groups = optimizer.param_groups
    saved = [group["lr"] for group in groups]
    for group, lr in zip(groups, saved):
        group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in zip(groups, saved):
            group["lr"] = lr


def schedule_length(trainer: Any) -> int | None:
    """The prune-rate cosine's length in optimizer steps (the sparsity callback's ``total_steps``).

    With fixed windows None: the trainer's ``estimated_stepping_batches`` is exact. Variable BPTT has no length
    Lightning can know; the authors use ``max_epochs * train_rows // bptt`` for every model, which is returned
    (capped by ``max_steps``).
    """
    datamodule = getattr(trainer, "datamodule", None)
    if not getattr(datamodule, "variable_bptt", False):
        return None  # the trainer's estimated_stepping_batches is exact
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return None
    steps = trainer.max_epochs * datamodule.split_rows("train") // datamodule.bptt
    if trainer.max_steps and trainer.max_steps > 0:
        steps = min(steps, trainer.max_steps)
    return max(1, int(steps))
