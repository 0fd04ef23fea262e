"""The ``selfish-rnn`` command: LightningCLI over :class:`~recipes.lm.LanguageModel` and the PTB/WikiText-2 data.

::

    selfish-rnn fit  --config recipes/configs/stacked_lstm_ptb.yaml
    selfish-rnn fit  --config recipes/configs/stacked_lstm_ptb.yaml --trainer.max_epochs 3 --model.sparsity 0.62
    selfish-rnn test --config recipes/configs/stacked_lstm_ptb.yaml --ckpt_path best
    selfish-rnn fit  --help

Every argument of the model, the network (``--model.network.init_args.nhid``), the data and the trainer can be
set in a config or on the command line. The vocabulary size is linked from the data to the network's ``ntoken``
and ``data.bptt`` to the model's ``bptt`` (set them on the data). TensorBoard is the default logger
(``tensorboard --logdir lightning_logs``).

``--ckpt_path best`` / ``last`` in a fresh process (``test`` after an earlier ``fit``, or resuming ``fit``) are
resolved from the most recent run of the same logger name: ``last.ckpt`` of the newest version directory, whose
checkpoint callback state records which checkpoint was best.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from recipes.data import LanguageModelingDataModule
from recipes.lm import LanguageModel
from recipes.runtime import keep_freed_memory_for_reuse

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The bundled recipes (``recipes/configs/*.yaml``)."""

DESCRIPTION = (
    "Selfish-RNN (ICML 2021): train the paper's RNN language models dense or sparse from scratch "
    "(dynamic sparse connectivity with cell-gate redistribution, SNT-ASGD). Start from a config in "
    f"{CONFIG_DIR} and override any argument on the command line."
)


class SelfishRNNCLI(LightningCLI):
    """LightningCLI with the data -> network links, TensorBoard by default and cross-process ``best``/``last``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The vocabulary is only known once the corpus is read: link it when the classes are instantiated.
        parser.link_arguments("data.vocab_size", "model.network.init_args.ntoken", apply_on="instantiate")
        # One window length for the data and for the learning-rate scaling of variable BPTT.
        parser.link_arguments("data.bptt", "model.bptt")

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        arguments = self.config_init[self.subcommand]
        ckpt_path = arguments.get("ckpt_path")
        if ckpt_path in ("best", "last"):
            resolved = resolve_checkpoint(self.trainer, ckpt_path, require=self.subcommand != "fit")
            if resolved is not None:
                rank_zero_info(f"selfish-rnn: --ckpt_path {ckpt_path} is {resolved}")
                arguments["ckpt_path"] = str(resolved)
            elif self.subcommand == "fit":
                arguments["ckpt_path"] = None  # nothing to resume from: start a new run


def resolve_checkpoint(trainer: Any, which: str, require: bool = True) -> Path | None:
    """The ``best`` or ``last`` checkpoint of the newest earlier run logged under the trainer's logger name.

    Runs are ``<save_dir>/<name>/version_*``; the newest one that has ``checkpoints/last.ckpt`` is used. ``best``
    is read from that file's ``ModelCheckpoint`` state (``best_model_path``). Returns None when nothing is found
    and ``require`` is False; raises ``FileNotFoundError`` otherwise.
    """
    root = _runs_root(trainer)
    candidates = sorted(root.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        if not require:
            return None
        raise FileNotFoundError(
            f"--ckpt_path {which}: no earlier run with a last.ckpt under {root}. Train first (selfish-rnn fit with "
            "the same config and logger name), or pass the path of a checkpoint file."
        )
    last = candidates[-1]
    if which == "last":
        return last
    checkpoint = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("best_model_path"):
            best = Path(state["best_model_path"])
            if best.is_file():
                return best
            raise FileNotFoundError(f"--ckpt_path best: {last} names {best} as the best checkpoint, which is missing")
    raise FileNotFoundError(
        f"--ckpt_path best: {last} records no best checkpoint (was a val_loss monitor configured?); pass a path"
    )


def _runs_root(trainer: Any) -> Path:
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root is None:
        return Path(trainer.default_root_dir) / "lightning_logs"
    return Path(root)


def configure_logging() -> None:
    """Show the INFO messages of the recipes (corpus summary) and the library (topology-update summaries)."""
    root = logging.getLogger()
    for name in ("recipes", "lightning_selfish"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not root.handlers and not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False


def build_cli(args: ArgsType = None, run: bool = True) -> SelfishRNNCLI:
    """Parse ``args`` (default ``sys.argv``) and, with ``run``, execute the subcommand; returns the CLI object."""
    return SelfishRNNCLI(
        LanguageModel,
        LanguageModelingDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the optimizer is a model argument (--model.optimizer)
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__qualname__}",
                "init_args": {"save_dir": "lightning_logs", "name": "selfish_rnn"},
            },
            "num_sanity_val_steps": 0,  # a sanity pass must not enter NT-ASGD's history
        },
        parser_kwargs={"description": DESCRIPTION},
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``selfish-rnn`` console script."""
    configure_logging()
    keep_freed_memory_for_reuse()  # CPU training: reuse large per-step buffers instead of re-faulting them
    build_cli(args)


__all__ = ["CONFIG_DIR", "SelfishRNNCLI", "build_cli", "configure_logging", "main"]
