"""The callbacks a recipe run brings (``LanguageModel.configure_callbacks``) and the run's two checkpoints."""

from __future__ import annotations

from typing import Any

from lightning_selfish.callbacks.flops import FlopsCallback
from lightning_selfish.callbacks.history import MaskHistory
from lightning_selfish.callbacks.monitor import TopologyMonitor
from lightning_selfish.callbacks.random_state import RandomStateCheckpoint
from lightning_selfish.callbacks.trigger import NonMonotonicTrigger
from lightning_selfish_recipes.compat import pl
from lightning_selfish_recipes.training.optimizers import AVERAGING_OPTIMIZERS

Callback = pl.Callback
ModelCheckpoint = pl.callbacks.ModelCheckpoint


def run_callbacks(
    trainer: Any,
    *,
    sparsity_callback: Callback | None,
    topology_monitor: bool,
    mask_history: bool,
    flops: bool,
    optimizer_name: str,
    nonmono: int,
    restart_at_epochs: list[int],
    checkpoint: bool,
) -> list[Callback]:
    """The run's callbacks, in order: the sparsity callback (when sparse) with its monitor and mask history, the
    FLOPs, the random-state checkpoint, NT-ASGD's trigger (averaging optimizers) and :func:`run_checkpoints` (unless
    ``trainer``, the module's trainer or None, already has a ``ModelCheckpoint`` with a monitor)."""
    callbacks: list[Callback] = []
    if sparsity_callback is not None:
        callbacks.append(sparsity_callback)
        if topology_monitor:
            callbacks.append(TopologyMonitor())
        if mask_history and (trainer is None or bool(trainer.loggers)):  # the masks go beside the run's logs
            callbacks.append(MaskHistory())
    if flops:
        callbacks.append(FlopsCallback())
    callbacks.append(RandomStateCheckpoint())  # resumes draw the dropout masks the saved run would have
    if optimizer_name in AVERAGING_OPTIMIZERS:
        callbacks.append(NonMonotonicTrigger(monitor="val_loss", nonmono=nonmono, restart_at_epochs=restart_at_epochs))
    if checkpoint and not _has_monitored_checkpoint(trainer):
        _drop_default_checkpoint(trainer)
        callbacks.extend(run_checkpoints())
    return callbacks


def run_checkpoints() -> list[Callback]:
    """The run's checkpoints: the best ``val_loss`` epoch (``epoch<N>-val_ppl<ppl>.ckpt``) and the latest epoch
    (``last.ckpt``, rewritten after every epoch's validation), in that order.

    The latest one is a checkpoint of its own: Lightning 2.6's ``save_last=True`` beside a monitor writes
    ``last.ckpt`` only when the monitored checkpoint is saved, i.e. at the last epoch whose validation improved, and
    a resume from it would train the later epochs again. Both write at the same point (after validation, before the
    next epoch's topology update), the best one first, so ``last.ckpt`` records which checkpoint is best.
    """
    best = ModelCheckpoint(
        monitor="val_loss",
        mode="min",
        filename="epoch{epoch:04d}-val_ppl{val_ppl:.2f}",
        auto_insert_metric_name=False,
    )
    # No monitor, top 1: every epoch replaces the file; one name, so Lightning's own ckpt_path="last" finds it.
    latest = ModelCheckpoint(filename=ModelCheckpoint.CHECKPOINT_NAME_LAST, enable_version_counter=False)
    return [best, latest]


def _drop_default_checkpoint(trainer: Any) -> None:
    # Lightning replaces a trainer's callbacks by the module's callbacks of the same type, and says so on every
    # run; the ones without a monitor (the default one) would be replaced anyway, and are removed here instead.
    if trainer is not None:
        trainer.callbacks = [
            cb for cb in trainer.callbacks if not (isinstance(cb, ModelCheckpoint) and cb.monitor is None)
        ]


def _has_monitored_checkpoint(trainer: Any) -> bool:
    if trainer is None:
        return False
    return any(isinstance(cb, ModelCheckpoint) and cb.monitor is not None for cb in trainer.callbacks)
