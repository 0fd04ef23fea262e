"""The recipes keep the run's latest epoch in ``last.ckpt`` beside the best one, so ``--ckpt_path last`` resumes
where the run stopped.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only beside a top-k save: with
the recipes' former single checkpoint callback, ``last.ckpt`` was the last epoch whose validation *improved*, and a
resume silently trained the later epochs again. Here validation is scripted to get worse in the last epoch.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from lightning_selfish_recipes.cli import CONFIG_DIR, build_cli, resolve_checkpoint_in
from lightning_selfish_recipes.compat import module, pl
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.models import StackedLSTM
from lightning_selfish_recipes.summary import fit_summary
from lightning_selfish_recipes.tools.export import find_checkpoint
from tests.conftest import write_random_corpus

Callback, ModelCheckpoint = module("callbacks").Callback, module("callbacks").ModelCheckpoint  # the recipes' package
BATCHES = 3  # training batches per epoch


class ScriptedValLoss(Callback):
    """Scripts the module's validation loss: better, better, then worse in the last epoch (3 epochs), so the best
    epoch is 1 and the last one 2.

    Lightning calls the callbacks' ``on_validation_epoch_end`` before the module's, which logs ``val_loss`` (and
    ``val_ppl``) from its token-weighted cross-entropy metric: the script replaces what that metric accumulated, so
    the module logs the scripted loss and every reader of ``val_loss`` (checkpoints, the NT-ASGD trigger) sees it.
    Assigning ``trainer.callback_metrics["val_loss"]`` instead does not last: Lightning refills that dict from the
    logged results whenever it is read during validation."""

    LOSSES = (3.0, 2.0, 2.5, 2.75)

    def __init__(self) -> None:
        self.started_at: tuple[int, int] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started_at = (trainer.current_epoch, trainer.global_step)  # where a resumed run goes on

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.val_ce.reset()
        pl_module.val_ce.update(torch.tensor(self.LOSSES[trainer.current_epoch], device=pl_module.device), tokens=1)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_corpus(tmp_path_factory.mktemp("corpus"), seed=1, vocab=15)


def recipe_run(
    corpus_dir: Path,
    root: Path,
    max_epochs: int = 3,
    ckpt_path: str | None = None,
    extra: tuple = (),
    checkpoint: bool = True,
) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    dm = LanguageModelingDataModule("tiny", data_dir=str(corpus_dir), batch_size=4, eval_batch_size=3, bptt=6)
    lm = LanguageModel(
        StackedLSTM(ntoken=dm.vocab_size, ninp=8, nhid=8, nlayers=2, dropout=0.0),
        lr=1.0,
        bptt=6,
        optimizer="sgd",
        sparsity={"sparsity": 0.5, "seed": 1},
        topology_monitor=False,
        flops=False,
        checkpoint=checkpoint,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=BATCHES,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[ScriptedValLoss(), *extra],
        enable_checkpointing=checkpoint or bool(extra),
    )
    trainer.fit(lm, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def started_at(trainer: pl.Trainer) -> tuple[int, int] | None:
    """Epoch and step at which the fit started training (the CLI imports ScriptedValLoss by name: found by name)."""
    return next(cb for cb in trainer.callbacks if type(cb).__name__ == "ScriptedValLoss").started_at


def test_last_ckpt_is_the_last_epoch_also_when_its_validation_got_worse(corpus_dir: Path, tmp_path: Path) -> None:
    trainer = recipe_run(corpus_dir, tmp_path)
    best, latest = trainer.checkpoint_callbacks
    assert isinstance(best, ModelCheckpoint) and (best.monitor, best.mode) == ("val_loss", "min")
    assert float(best.best_model_score) == ScriptedValLoss.LOSSES[1], "the checkpoint saw the scripted val_loss"
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == 1
    last = Path(best.dirpath) / "last.ckpt"
    assert latest.best_model_path == str(last)
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (2, 3 * BATCHES), "the run's last epoch, not its best"
    assert sorted(p.name for p in last.parent.iterdir()) == [Path(best.best_model_path).name, "last.ckpt"]

    # best is read from the monitored callback's state in last.ckpt, whatever the order of the states
    saved["callbacks"] = dict(reversed(saved["callbacks"].items()))
    torch.save(saved, last)
    assert find_checkpoint(tmp_path, "best") == Path(best.best_model_path)
    assert find_checkpoint(tmp_path, "last") == last

    summary = fit_summary(trainer, trainer.lightning_module)
    assert f"  best validation perplexity  {math.exp(2.0):.4f} (epoch 1, counting from 0)" in summary  # scripted
    assert f"  last checkpoint             {last} (epoch 2; --ckpt_path last resumes from it)" in summary

    # Lightning's own ckpt_path="last" (the newest last*.ckpt of the checkpoint directory) resumes at epoch 3
    resumed = recipe_run(corpus_dir, tmp_path, max_epochs=4, ckpt_path="last")
    assert started_at(resumed) == (3, 3 * BATCHES)
    assert resumed.global_step == 4 * BATCHES


def test_selfish_rnn_fit_ckpt_path_last_resumes_at_the_run_s_last_epoch(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(CONFIG_DIR / "stacked_lstm_ptb.yaml"),
        "--model.network.init_args.ninp=8",
        "--model.network.init_args.nhid=8",
        "--data.corpus=tiny",
        f"--data.data_dir={corpus_dir}",
        "--data.batch_size=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.limit_train_batches={BATCHES}",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks+=tests.recipes.test_checkpoint_last.ScriptedValLoss",
    ]
    fit = build_cli(args=["fit", *common, "--trainer.max_epochs=3"])
    assert float(fit.trainer.checkpoint_callback.best_model_score) == ScriptedValLoss.LOSSES[1]
    version = Path(fit.trainer.log_dir)
    last = version / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's own last.ckpt: no warning that it may be older than the run
        assert resolve_checkpoint_in(version.parent, "last") == last
    assert torch.load(resolve_checkpoint_in(version.parent, "best"), weights_only=False)["epoch"] == 1

    resumed = build_cli(args=["fit", *common, "--trainer.max_epochs=4", "--ckpt_path", "last"])
    assert Path(resumed.trainer.ckpt_path) == last
    assert started_at(resumed.trainer) == (3, 3 * BATCHES), "the resumed run goes on after epoch 2, the last one"
    assert resumed.trainer.global_step == 4 * BATCHES
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (3, 4 * BATCHES)  # the resumed epoch, written in place


def test_a_last_ckpt_written_beside_a_monitor_is_resolved_with_a_warning(corpus_dir: Path, tmp_path: Path) -> None:
    """A checkpoint callback of the user's own with a monitor and save_last=True (the recipes' own until they kept
    the latest epoch apart): its last.ckpt is the last improvement, epoch 1 of 3, and --ckpt_path last says so."""
    own = ModelCheckpoint(dirpath=tmp_path / "version_0" / "checkpoints", monitor="val_loss", save_last=True)
    trainer = recipe_run(corpus_dir, tmp_path, extra=(own,))
    assert trainer.checkpoint_callbacks == [own], "the recipe adds none of its own beside a monitored one"
    assert float(own.best_model_score) == ScriptedValLoss.LOSSES[1]
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning) as warned:
        assert resolve_checkpoint_in(tmp_path, "last") == last
    (warning,) = warned
    assert str(warning.message).startswith(
        f"--ckpt_path last: {last} (epoch 1) was not written as the run's latest epoch but by a ModelCheckpoint with "
        "a monitor and save_last=True, which Lightning writes only when that checkpoint improves"
    )
    assert torch.load(resolve_checkpoint_in(tmp_path, "best"), weights_only=False)["epoch"] == 1
    summary = fit_summary(trainer, trainer.lightning_module)
    assert "(epoch 1, counting from 0)" in summary and "(no checkpoint)" not in summary
    assert "last checkpoint" not in summary  # it has no latest-epoch checkpoint


def test_the_summary_of_a_run_without_checkpoints(corpus_dir: Path, tmp_path: Path) -> None:
    trainer = recipe_run(corpus_dir, tmp_path, checkpoint=False)
    summary = fit_summary(trainer, trainer.lightning_module)
    assert f"  last validation perplexity  {math.exp(ScriptedValLoss.LOSSES[2]):.4f} (no checkpoint)" in summary
    assert "best checkpoint" not in summary and "last checkpoint" not in summary
