"""NonMonotonicTrigger: the NT part of (S)NT-ASGD as a Lightning callback, and evaluation with the averaged weights.

Order of events at the end of a training epoch in Lightning (validation runs before ``on_train_epoch_end``):

1. ``on_validation_start``: once averaging, the averages are swapped into the model, so the logged validation
   loss, and everything that monitors it, sees the averaged model;
2. ``on_validation_end``: the raw weights are swapped back; then, while not yet averaging, the non-monotone test
   on the monitored value (AWD-LSTM's rule), which may start averaging and skip the next topology update;
3. ``ModelCheckpoint.on_validation_end`` (Lightning runs checkpoint callbacks last): :meth:`on_save_checkpoint`
   writes the averages as the checkpoint's ``state_dict`` and the raw weights under ``"raw_state_dict"``;
4. ``on_train_epoch_start`` of the next epoch (the same point in training, but one that a resumed run replays):
   ON-LSTM's restarts of the averaging.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lightning_selfish.callbacks.protocols import SkipsTopologyUpdates
from lightning_selfish.core.protocols import AveragingOptimizer

__all__ = ["NonMonotonicTrigger"]

RAW_STATE_DICT_KEY = "raw_state_dict"


class NonMonotonicTrigger(Callback):
    r"""Start SNT-ASGD's averaging when the validation loss stops improving; validate and checkpoint the averages.

    At the end of each validation while the optimizer still runs plain SGD, with ``h`` the history of the
    monitored value ``v``: if ``len(h) > nonmono`` and ``v > min(h[:-nonmono])`` the optimizer starts averaging;
    then ``v`` is appended (AWD-LSTM's rule: the earliest switch is at the end of epoch ``nonmono + 2``, counting
    from 1). The sanity check does not enter the history. When it fires, every callback with a
    ``skip_next_update()`` method (``SelfishSparsityCallback``) is told to skip its next topology update, as the
    authors' code does in the switching epoch.

    Once averaging, every validation runs on the averaged weights, and checkpoints store them as the model's
    ``state_dict`` (what ``trainer.test(ckpt_path="best")`` and ``load_from_checkpoint`` load), with the raw weights
    under ``"raw_state_dict"`` and the optimizer state beside them, so ``fit(ckpt_path=...)`` resumes exactly.
    Training always continues from the raw weights; after ``fit`` the model holds the raw weights.

    Args:
        monitor: the validation metric to watch (logged in ``validation_step`` or ``on_validation_epoch_end``).
        nonmono: how many of the latest values the comparison leaves out (AWD-LSTM: 5); at least 1.
        restart_at_epochs: after these many completed epochs, if already averaging, restart the averages from the
            current weights and clear the history (ON-LSTM's fine-tuning restarts: ``[500, 1000]``).
    """

    def __init__(self, monitor: str = "val_loss", nonmono: int = 5, restart_at_epochs: Sequence[int] = ()) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"NonMonotonicTrigger: monitor must be a metric name (non-empty str), got {monitor!r}")
        if not monitor:
            raise ValueError(f"NonMonotonicTrigger: monitor must be a metric name (non-empty str), got {monitor!r}")
        if isinstance(nonmono, bool) or not isinstance(nonmono, int):
            raise TypeError(f"NonMonotonicTrigger: nonmono must be an int >= 1, got {nonmono!r}")
        if nonmono < 1:
            raise ValueError(f"NonMonotonicTrigger: nonmono must be an int >= 1, got {nonmono!r}")
        if isinstance(restart_at_epochs, (str, bytes)) or not isinstance(restart_at_epochs, Sequence):
            raise TypeError(
                "NonMonotonicTrigger: restart_at_epochs must be a list of epoch numbers >= 1 (completed epochs), "
                f"got {restart_at_epochs!r}"
            )
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in restart_at_epochs):
            raise TypeError(
                "NonMonotonicTrigger: restart_at_epochs must be a list of epoch numbers >= 1 (completed epochs), "
                f"got {restart_at_epochs!r}"
            )
        if not all(e >= 1 for e in restart_at_epochs):
            raise ValueError(
                "NonMonotonicTrigger: restart_at_epochs must be a list of epoch numbers >= 1 (completed epochs), "
                f"got {restart_at_epochs!r}"
            )
        self.monitor = monitor
        self.nonmono = nonmono
        self.restart_at_epochs = sorted(set(restart_at_epochs))
        self.history: list[float] = []
        self.averaging_started_epoch: int | None = None
        self.restarted_at_epochs: list[int] = []
        self._optimizers: list[AveragingOptimizer] = []
        self._swap: contextlib.ExitStack | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, nonmono=self.nonmono)

    @property
    def averaging(self) -> bool:
        """Whether the optimizer has started averaging."""
        return any(opt.averaging for opt in self._optimizers)

    # ------------------------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = [opt for opt in trainer.optimizers if isinstance(opt, AveragingOptimizer)]
        if not self._optimizers:
            found = ", ".join(type(opt).__name__ for opt in trainer.optimizers)  # (Lightning always gives one)
            raise TypeError(
                "NonMonotonicTrigger needs an SNTASGD optimizer (return lightning_selfish.SNTASGD from "
                f"configure_optimizers), found: {found}"
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or self._swap is not None or not self.averaging:
            return
        stack = contextlib.ExitStack()
        for opt in self._optimizers:
            stack.enter_context(opt.swap_averaged())
        self._swap = stack

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()
        if trainer.state.fn != TrainerFn.FITTING or not self._optimizers:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(
                f"NonMonotonicTrigger(monitor={self.monitor!r}): the metric {self.monitor!r} was not logged in "
                f"validation; logged metrics: {sorted(metrics)}. Log it with self.log({self.monitor!r}, ...) in "
                "validation_step or on_validation_epoch_end, or pass the right name as monitor"
            )
        if trainer.sanity_checking or self.averaging:
            return
        value = trainer.strategy.broadcast(float(metrics[self.monitor]), src=0)  # one decision on every rank
        if not math.isfinite(value):
            value = math.inf
        h = self.history
        if len(h) > self.nonmono and value > min(h[: -self.nonmono]):
            self._start(trainer)
        h.append(value)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        completed = trainer.current_epoch
        if completed not in self.restart_at_epochs or completed in self.restarted_at_epochs or not self.averaging:
            return
        for opt in self._optimizers:
            opt.restart_averaging()
        self.history.clear()
        self.restarted_at_epochs.append(completed)
        rank_zero_info(f"NonMonotonicTrigger: averaging restarted after epoch {completed}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_back()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Averaged weights as the model's ``state_dict``; the raw ones under ``"raw_state_dict"``."""
        if not self._optimizers or "state_dict" not in checkpoint:
            return
        state_dict = checkpoint["state_dict"]
        averaged, raw = dict(state_dict), dict(state_dict)
        found = False
        for name, param in pl_module.named_parameters(remove_duplicate=False):
            if name not in state_dict:
                continue
            for opt in self._optimizers:
                pair = opt.averaged_and_raw(param)
                if pair is not None:
                    averaged[name], raw[name] = pair
                    found = True
                    break
        if found:
            checkpoint["state_dict"] = averaged
            checkpoint[RAW_STATE_DICT_KEY] = raw

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming a fit: training continues from the raw weights. Testing and inference keep the averages."""
        if RAW_STATE_DICT_KEY in checkpoint and trainer.state.fn == TrainerFn.FITTING:
            pl_module.load_state_dict(checkpoint[RAW_STATE_DICT_KEY], strict=pl_module.strict_loading)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "averaging_started_epoch": self.averaging_started_epoch,
            "restarted_at_epochs": list(self.restarted_at_epochs),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [float(v) for v in state_dict["history"]]
        self.averaging_started_epoch = state_dict["averaging_started_epoch"]
        self.restarted_at_epochs = list(state_dict.get("restarted_at_epochs", []))

    # ------------------------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------------------------

    def _start(self, trainer: pl.Trainer) -> None:
        for opt in self._optimizers:
            opt.start_averaging()
        for callback in trainer.callbacks:
            if isinstance(callback, SkipsTopologyUpdates):
                callback.skip_next_update()
        epoch = trainer.current_epoch
        self.averaging_started_epoch = epoch
        for logger in trainer.loggers:
            logger.log_metrics({"nt_asgd/averaging_started_epoch": float(epoch)}, step=trainer.global_step)
        rank_zero_info(
            f"NonMonotonicTrigger: {self.monitor} stopped improving at the end of epoch {epoch} (counting from 0): "
            "averaging starts now"
        )

    def _swap_back(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()
