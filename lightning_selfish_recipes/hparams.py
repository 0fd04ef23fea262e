"""TensorBoard's *HParams* tab for ``selfish-rnn`` runs: the run's arguments against its perplexities.

Lightning's TensorBoard logger fills that tab only together with a placeholder metric, ``hp_metric`` (one point,
-1), unless it is given a metric value at fit start, which does not exist yet. The CLI switches the placeholder
off (``default_hp_metric: false``) and :class:`PerplexityHParams` writes the tab's summaries itself, declaring
``val_ppl`` and ``test_ppl`` as its metrics: TensorBoard reads their values from the scalars of the same names as
the run logs them, and the tab compares runs by perplexity.
"""

from __future__ import annotations

from typing import Any

from lightning_selfish_recipes.compat import module, pl, tensorboard_file_writer, tensorboard_hparams

TensorBoardLogger = module("loggers").TensorBoardLogger

__all__ = ["METRICS", "PerplexityHParams"]

METRICS = ("val_ppl", "test_ppl")


class PerplexityHParams(pl.Callback):
    """At fit start (rank zero), the *HParams* summaries of every TensorBoard logger, with :data:`METRICS`."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        from torch.utils.tensorboard.summary import hparams

        params = dict(pl_module.hparams_initial)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            params.update(datamodule.hparams_initial)
        params.pop("_instantiator", None)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                flat = tensorboard_hparams(logger, params)
                writer = tensorboard_file_writer(logger)
                for summary in hparams(flat, dict.fromkeys(METRICS, 0.0)):
                    writer.add_summary(summary)
