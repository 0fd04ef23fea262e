"""``selfish-rnn``'s progress bar redraws every PROGRESS_BAR_REFRESH_RATE batches, unless the config decides."""

from __future__ import annotations

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from lightning_selfish_recipes.cli import PROGRESS_BAR_REFRESH_RATE, build_cli

QUICKSTART = ["--config", "lightning_selfish_recipes/configs/quickstart.yaml", "--trainer.logger", "false"]


def bars(trainer) -> list[ProgressBar]:
    return [c for c in trainer.callbacks if isinstance(c, ProgressBar)]


def test_default_bar_redraws_every_few_batches() -> None:
    trainer = build_cli(QUICKSTART, run=False).trainer
    assert len(bars(trainer)) == 1 and trainer.progress_bar_callback.refresh_rate == PROGRESS_BAR_REFRESH_RATE > 1


def test_a_configured_bar_is_kept_and_a_disabled_bar_stays_off() -> None:
    own = ["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=3"]
    trainer = build_cli([*QUICKSTART, *own], run=False).trainer
    assert len(bars(trainer)) == 1 and isinstance(trainer.progress_bar_callback, TQDMProgressBar)
    assert trainer.progress_bar_callback.refresh_rate == 3
    trainer = build_cli([*QUICKSTART, "--trainer.enable_progress_bar", "false"], run=False).trainer
    assert trainer.progress_bar_callback is None and not bars(trainer)
