"""``FlopsCallback``: the running training FLOPs and the current inference FLOPs, relative to dense, in the logs.

The counting rules are :mod:`lightning_selfish.analysis.flops`'. The per-step cost only changes when the masks change
(a topology update, a GMP pruning step), so the callback keeps the cost per token of the masks in force and, per
batch, only adds the batch's token count on the host (no device work, no sync). It is a
:class:`~lightning_selfish.callbacks.protocols.TopologyListener`: the sparsity callback tells it when the masks are
set (fit start) and changed (every update); it then books the tokens counted so far at the old cost and recomputes
the cost from the new masks (one reduction per tensor, at update time only).

Logged to every logger of the trainer, at the end of each training epoch (and of the fit):

* ``flops/train_vs_dense``: training FLOPs so far / FLOPs of dense training over the same tokens;
* ``flops/inference_vs_dense``: forward FLOPs of the current masks / dense forward FLOPs;
* ``flops/train_total``: training FLOPs so far, summed over all ranks;
* ``flops/inference_per_token``: forward FLOPs per token of the current masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from lightning_selfish.analysis.flops import (
    WeightCost,
    collect_weight_costs,
    inference_flops_per_token,
    training_flops_per_token,
)
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.types import UpdateStats

log = logging.getLogger(__name__)


def tokens_in_batch(batch: Any) -> int:
    """Tokens of a language-model batch: the number of elements of its first tensor (``(T, B)`` inputs)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)) and batch:
        return tokens_in_batch(batch[0])
    if isinstance(batch, dict) and batch:
        return tokens_in_batch(next(iter(batch.values())))
    raise TypeError(f"cannot count the tokens of a batch of type {type(batch).__name__}: give tokens_per_batch")


class FlopsCallback(Callback):
    """Count the training FLOPs of the run and the inference FLOPs of the current masks, relative to dense.

    Works with or without a :class:`~lightning_selfish.SelfishSparsityCallback` in the trainer (without one the
    model is dense and both ratios are 1). The sparsity callback's ``dense_gradient_every`` decides the
    dense-gradient cost: ``1`` (SNFS's momentum) computes the weight gradient densely on every step, an update
    cadence (RigL's gradient growth) on the step before each update, ``None`` never.

    Args:
        tokens_per_batch: the number of tokens (samples) in a batch; default :func:`tokens_in_batch`. Only the
            absolute totals depend on it when all batches have the same size.
    """

    def __init__(self, tokens_per_batch: Callable[[Any], int] | None = None) -> None:
        if tokens_per_batch is not None and not callable(tokens_per_batch):
            raise TypeError(f"tokens_per_batch must be callable or None, got {tokens_per_batch!r}")
        self.tokens_per_batch = tokens_per_batch or tokens_in_batch
        self.costs: dict[str, WeightCost] = {}
        self._sparsity: Any = None
        self._engine: SparseEngine | None = None  # the masks behind the cached costs
        self._active: dict[str, int] | None = None
        self._step_cost = self._dense_step_cost = 0.0
        self._pending_tokens = 0  # tokens trained at _step_cost, not yet booked
        self._last_tokens = 0
        self._world_size = 1
        self.train_flops = 0.0  # booked, this rank
        self.dense_train_flops = 0.0

    # ----------------------------------------------------------------------------------------------------------
    # public surface
    # ----------------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The values this callback logs, as of now."""
        sparse = self.train_flops + self._pending_tokens * self._step_cost
        dense = self.dense_train_flops + self._pending_tokens * self._dense_step_cost
        inference = inference_flops_per_token(self.costs, self._active)
        dense_inference = inference_flops_per_token(self.costs)
        return {
            "flops/train_vs_dense": sparse / dense if dense else 1.0,
            "flops/inference_vs_dense": inference / dense_inference if dense_inference else 1.0,
            "flops/train_total": sparse * self._world_size,
            "flops/inference_per_token": inference,
        }

    # ----------------------------------------------------------------------------------------------------------
    # hooks: only delegate
    # ----------------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.costs = collect_weight_costs(pl_module)
        self._dense_step_cost = training_flops_per_token(self.costs)
        self._sparsity = _find_sparsity_callback(trainer)
        self._world_size = trainer.world_size
        # (the sparsity callback may have set this fit's masks already, if it comes first; else it will tell us)
        self._engine = getattr(self._sparsity, "engine", None)
        self._recompute()

    def on_topology_update(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: SparseEngine, stats: UpdateStats | None
    ) -> None:
        """The masks were set (``stats=None``) or changed by an update: book the tokens so far, recompute the cost."""
        self._engine = engine
        self._recompute(updated=stats is not None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._last_tokens = int(self.tokens_per_batch(batch))
        self._pending_tokens += self._last_tokens

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self._book()
        return {"train_flops": self.train_flops, "dense_train_flops": self.dense_train_flops}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"train_flops", "dense_train_flops"} - set(state_dict)
        if missing:
            raise ValueError(f"not a FlopsCallback state: missing {sorted(missing)} in {sorted(state_dict)}")
        self.train_flops = float(state_dict["train_flops"])
        self.dense_train_flops = float(state_dict["dense_train_flops"])
        self._pending_tokens = 0

    # ----------------------------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------------------------

    def _book(self) -> None:
        self.train_flops += self._pending_tokens * self._step_cost
        self.dense_train_flops += self._pending_tokens * self._dense_step_cost
        self._pending_tokens = 0

    def _recompute(self, updated: bool = False) -> None:
        """Book the tokens counted so far at the old cost, then take the cost of the masks in force."""
        self._book()
        every = _dense_gradient_every(self._sparsity)
        if updated and every not in (None, 1):
            # RigL: the step before each update computed the dense weight gradient (Table 10's extra f_D - f_S).
            extra = training_flops_per_token(self.costs, self._active, dense_gradient=True) - self._step_cost
            self.train_flops += self._last_tokens * extra
        self._active = self._engine.active_counts() if self._engine is not None else None
        self._step_cost = training_flops_per_token(self.costs, self._active, dense_gradient=every == 1)

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _find_sparsity_callback(trainer: pl.Trainer) -> Any:
    found = [cb for cb in trainer.callbacks if isinstance(cb, SelfishSparsityCallback)]
    return found[0] if found else None


def _dense_gradient_every(sparsity: Any) -> int | str | None:
    """1: a dense weight gradient every step (SNFS); a cadence: on update steps (RigL); None: never."""
    return None if sparsity is None else sparsity.dense_gradient_every
