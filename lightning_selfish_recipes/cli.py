"""The ``selfish-rnn`` command: LightningCLI over :class:`~lightning_selfish_recipes.lm.LanguageModel` and the
PTB/WikiText-2 data.

::

    selfish-rnn fit  --config lightning_selfish_recipes/configs/stacked_lstm_ptb.yaml
    selfish-rnn fit  --config lightning_selfish_recipes/configs/stacked_lstm_ptb.yaml --model.sparsity.sparsity 0.62
    selfish-rnn test --config lightning_selfish_recipes/configs/stacked_lstm_ptb.yaml --ckpt_path best
    selfish-rnn fit  --help

Every argument of the model, the network (``--model.network.init_args.nhid``), the data and the trainer can be
set in a config or on the command line. The vocabulary size is linked from the data to the network's ``ntoken``
and ``data.bptt`` to the model's ``bptt`` (set them on the data). TensorBoard is the default logger
(``tensorboard --logdir lightning_logs``).

``--ckpt_path best`` / ``last`` in a fresh process (``test`` after an earlier ``fit``, or resuming ``fit``) are
resolved from the most recent run of the same logger name: ``last.ckpt`` of the newest version directory (the run's
latest epoch), whose checkpoint callback state records which checkpoint was best. With a checkpoint of such a run,
``fit`` and ``test`` log to that run's own version directory (``--continue_log_version false`` starts a new one).

``selfish-rnn`` alone prints a short overview and ``selfish-rnn list`` the bundled experiments; other tool
subcommands are dispatched from :data:`TOOL_COMMANDS`. Mistakes in arguments, configs or data end in one
``error:`` line (see :mod:`lightning_selfish_recipes.console`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_selfish_recipes.command.checkpoint_paths import (
    check_checkpoint_path,
    checkpoint_global_step,
    config_log_root,
    continue_log_version,
    resolve_checkpoint,
    resolve_checkpoint_in,
)
from lightning_selfish_recipes.command.checks import check_model_arguments, check_trains_something
from lightning_selfish_recipes.command.help import (
    BRIEF_TRAINER_OPTIONS,
    PlainTextHelpFormatter,
    arrange_subcommand_help,
)
from lightning_selfish_recipes.command.noise import expect_checkpoints_in_log_dir, quiet_dependency_noise
from lightning_selfish_recipes.compat import module, subcommand_parsers
from lightning_selfish_recipes.console import user_error_message
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.hparams import PerplexityHParams
from lightning_selfish_recipes.inference import add_sparse_inference_argument, enable_sparse_inference
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.model_summary import FlopsPerTokenModelSummary
from lightning_selfish_recipes.old_names import check_checkpoint, check_config_files
from lightning_selfish_recipes.runs import label_run_logger
from lightning_selfish_recipes.runtime import keep_freed_memory_for_reuse
from lightning_selfish_recipes.summary import fit_summary, test_summary
from lightning_selfish_recipes.tools import experiments

_cli = module("cli")
ArgsType = _cli.ArgsType
LightningArgumentParser = _cli.LightningArgumentParser
LightningCLI = _cli.LightningCLI
TensorBoardLogger = module("loggers").TensorBoardLogger
rank_zero_info = module("utilities.rank_zero").rank_zero_info
rank_zero_warn = module("utilities.rank_zero").rank_zero_warn
_callbacks = module("callbacks")
ModelSummary = _callbacks.ModelSummary
ProgressBar = _callbacks.ProgressBar
RichProgressBar = _callbacks.RichProgressBar
TQDMProgressBar = _callbacks.TQDMProgressBar

log = logging.getLogger("lightning_selfish_recipes.cli")  # also when run as python -m lightning_selfish_recipes.cli

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The bundled recipes (``lightning_selfish_recipes/configs/*.yaml``)."""

QUICKSTART = CONFIG_DIR / "quickstart.yaml"
"""The recipe a first run starts from (docs/recipes.md)."""

DESCRIPTION = (
    "Selfish-RNN (ICML 2021): train the paper's RNN language models dense or sparse from scratch "
    "(dynamic sparse connectivity with cell-gate redistribution, SNT-ASGD). Start from a config in "
    f"{CONFIG_DIR} and override any argument on the command line. The project's own arguments are "
    "--model.* and --data.*; 'selfish-rnn' alone gives a short overview, 'selfish-rnn list' the experiments."
)


class _SaveFitConfig(_cli.SaveConfigCallback):
    """Save the config of ``fit`` only: ``test`` logs into the tested run's directory and must keep its config."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class SelfishRNNCLI(LightningCLI):
    """LightningCLI with the data -> network links, TensorBoard by default and cross-process ``best``/``last``.

    A subcommand's help lists the project's options first (model, data, checkpoint), then the Trainer's: a few of
    them (:data:`BRIEF_TRAINER_OPTIONS`), or all with ``help_all``.
    """

    def __init__(self, *args: Any, help_all: bool = False, **kwargs: Any) -> None:
        self.help_all = help_all
        super().__init__(*args, **kwargs)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            return
        for subcommand, parser in subcommand_parsers(self).items():
            if subcommand == "test":
                add_sparse_inference_argument(parser)
            arrange_subcommand_help(parser, subcommand, self.help_all)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The vocabulary is only known once the corpus is read: link it when the classes are instantiated.
        parser.link_arguments("data.vocab_size", "model.network.init_args.ntoken", apply_on="instantiate")
        # One window length for the data and for the learning-rate scaling of variable BPTT.
        parser.link_arguments("data.bptt", "model.bptt")
        parser.add_argument(
            "--continue_log_version",
            type=bool,
            default=True,
            help="With --ckpt_path of an earlier run (best, last or a file in its checkpoints directory), log to "
            "that run's version directory, so a resumed fit continues its TensorBoard curves and a test adds "
            "test_ppl to them; false starts a new version.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # A config saved by an earlier version names the old package: one line with the new name, not an ImportError.
        check_config_files(sys.argv[1:] if args is None else args if isinstance(args, list | tuple) else ())
        super().parse_arguments(parser, args)
        # Argument mistakes must surface right after parsing, before the corpus is read (seconds for WikiText-2).
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else self.config
        check_model_arguments(section["model"])
        check_checkpoint_path(section.get("ckpt_path"))
        check_checkpoint(section.get("ckpt_path"))
        if subcommand == "fit":
            check_trains_something(section["trainer"])

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        # Composed configs share the model config's logger name: give each composition its own run directory.
        label_run_logger(config)
        logger_args = getattr(config["trainer"].get("logger"), "init_args", None)
        if logger_args is not None and "default_hp_metric" in logger_args:
            logger_args["default_hp_metric"] = False  # no placeholder hp_metric: see lightning_selfish_recipes.hparams
        root = config_log_root(config["trainer"])
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("best", "last") and root is not None:
            resolved = resolve_checkpoint_in(root, ckpt_path, require=self.subcommand != "fit")
            if resolved is not None:
                rank_zero_info(f"selfish-rnn: --ckpt_path {ckpt_path} is {resolved}")
            config["ckpt_path"] = ckpt_path = None if resolved is None else str(resolved)
        continued = (
            bool(ckpt_path)
            and root is not None
            and config.get("continue_log_version", True)
            and continue_log_version(config["trainer"], root, Path(ckpt_path))
        )
        if continued and self.subcommand == "fit":
            expect_checkpoints_in_log_dir()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # The bar redraws every PROGRESS_BAR_REFRESH_RATE batches and the model summary shows this project's FLOPs,
        # unless the config brings its own or disables them.
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = section.get("trainer", {})
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, progress_bar()]
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks = [*callbacks, FlopsPerTokenModelSummary()]
        trainer["callbacks"] = [*callbacks, PerplexityHParams()]  # TensorBoard's HParams tab, by perplexity
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        # LightningCLI's `_instantiator` stays in the checkpoint (load_from_checkpoint needs it), not in the logs.
        for component in (self.model, self.datamodule):
            getattr(component, "_hparams_initial", {}).pop("_instantiator", None)
        if self.subcommand is None:
            return
        arguments = self.config_init[self.subcommand]
        ckpt_path = arguments.get("ckpt_path")
        if ckpt_path in ("best", "last"):  # a logger whose directory the config does not tell
            resolved = resolve_checkpoint(self.trainer, ckpt_path, require=self.subcommand != "fit")
            if resolved is not None:
                rank_zero_info(f"selfish-rnn: --ckpt_path {ckpt_path} is {resolved}")
            arguments["ckpt_path"] = None if resolved is None else str(resolved)

    def before_fit(self) -> None:
        self._steps_before_fit = checkpoint_global_step(self.config_init[self.subcommand].get("ckpt_path"))

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.interrupted and trainer.global_step == self._steps_before_fit:
            ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
            raise ValueError(
                f"nothing was trained: the checkpoint {ckpt_path} is already at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}, the end of this run (--trainer.max_epochs {trainer.max_epochs}, "
                f"--trainer.max_steps {trainer.max_steps}); raise them to train on"
                if ckpt_path
                else "nothing was trained: the run ended before its first optimizer step"
            )
        if trainer.is_global_zero and not trainer.interrupted:
            log.info("%s", fit_summary(trainer, self.model))

    def after_test(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            log.info("%s", test_summary(self.trainer))

    def before_test(self) -> None:
        enable_sparse_inference(self.trainer, self.config_init["test"])


def configure_logging() -> None:
    """Show the INFO messages of the recipes (corpus summary) and the library (topology-update summaries)."""
    root = logging.getLogger()
    for name in ("lightning_selfish_recipes", "lightning_selfish"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not root.handlers and not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False


#: Batches between two redraws of the progress bar.
PROGRESS_BAR_REFRESH_RATE = 10


def progress_bar(refresh_rate: int = PROGRESS_BAR_REFRESH_RATE) -> ProgressBar:
    """Lightning's own choice of progress bar (Rich when installed, else tqdm), redrawn every ``refresh_rate`` batches.

    Lightning redraws its default bar synchronously after every batch: about 2 ms of CPU with Rich, 7 % of a
    validation pass of the 2 x 200 LSTM on the CPU and a quarter of an 8 ms GPU step (docs/performance.md).
    """
    if importlib.util.find_spec("rich") is not None:
        return RichProgressBar(refresh_rate=refresh_rate)
    return TQDMProgressBar(refresh_rate=refresh_rate)


def build_cli(
    args: ArgsType = None, run: bool = True, exit_on_error: bool = True, help_all: bool = False
) -> SelfishRNNCLI:
    """Parse ``args`` (default ``sys.argv``) and, with ``run``, execute the subcommand; returns the CLI object.

    ``exit_on_error=False`` makes a parsing error raise ``jsonargparse.ArgumentError`` instead of printing the
    usage and exiting (:func:`main` turns it into one ``error:`` line). ``help_all``: ``--help`` lists every
    Trainer option, not only :data:`BRIEF_TRAINER_OPTIONS`.
    """
    return SelfishRNNCLI(
        LanguageModel,
        LanguageModelingDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the optimizer is a model argument (--model.optimizer)
        save_config_callback=_SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__qualname__}",
                "init_args": {"save_dir": "lightning_logs", "name": "selfish_rnn"},
            },
            "num_sanity_val_steps": 0,  # a sanity pass must not enter NT-ASGD's history
        },
        help_all=help_all,
        parser_kwargs={
            "description": DESCRIPTION,
            "exit_on_error": exit_on_error,
            "formatter_class": PlainTextHelpFormatter,
        },
    )


def _analyze(argv: list[str]) -> int:
    """Draw the paper's analysis figures (topology distances, large weights, gate sparsity) from a run's files."""
    from lightning_selfish_recipes.tools.analyze import (
        main as analyze_main,  # matplotlib and tensorboard's reader load only when used
    )

    return analyze_main(argv)


def _results(argv: list[str]) -> int:
    """Fill the paper's tables in with the runs under a directory: ours, the paper's, the differences."""
    from lightning_selfish_recipes.tools.results import main as results_main

    return results_main(argv)


def _export(argv: list[str]) -> int:
    """Export a run's model with its masks applied: dense, or compressed (bit masks and the active values)."""
    from lightning_selfish_recipes.tools.export import main as export_main

    return export_main(argv)


def _generate(argv: list[str]) -> int:
    """Sample text word by word from a trained model, dense and sparse, and compare their speed."""
    from lightning_selfish_recipes.tools.generate import main as generate_main

    return generate_main(argv)


TOOL_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": experiments.list_command,
    "results": _results,
    "analyze": _analyze,
    "export": _export,
    "generate": _generate,
}
"""Subcommands that are not LightningCLI's: name -> function of the remaining arguments returning an exit code.
The first line of each function's docstring describes it in the overview ``selfish-rnn`` prints."""


def main(args: ArgsType = None) -> None:
    """Entry point of the ``selfish-rnn`` console script.

    A tool subcommand (:data:`TOOL_COMMANDS`) ends in ``SystemExit`` with its exit code, a user error in one
    ``error:`` line and ``SystemExit(2)``; ``--debug`` anywhere shows the traceback of a user error instead.
    """
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv in (["-h"], ["--help"]):
        sys.stdout.write(experiments.overview(TOOL_COMMANDS))
        return
    if argv[0] in TOOL_COMMANDS:
        raise SystemExit(TOOL_COMMANDS[argv[0]](argv[1:]))
    commands = [*SelfishRNNCLI.subcommands(), *TOOL_COMMANDS]
    if not argv[0].startswith("-") and argv[0] not in commands:
        sys.stderr.write(
            f"error: unknown command {argv[0]!r}; the commands are {', '.join(commands)} "
            "('selfish-rnn' alone describes them)\n"
        )
        raise SystemExit(2)
    help_all = "--help-all" in argv
    argv = ["--help" if a == "--help-all" else a for a in argv]
    configure_logging()
    quiet_dependency_noise()
    keep_freed_memory_for_reuse()  # CPU training: reuse large per-step buffers instead of re-faulting them
    if args is None:
        sys.argv[1:] = argv  # without --debug (and --help-all as --help); LightningCLI reads sys.argv itself
    try:
        build_cli(None if args is None else argv, exit_on_error=False, help_all=help_all)
    except Exception as error:
        message = None if debug else user_error_message(error, argv, commands, str(QUICKSTART))
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None


__all__ = [
    "BRIEF_TRAINER_OPTIONS",
    "CONFIG_DIR",
    "TOOL_COMMANDS",
    "SelfishRNNCLI",
    "build_cli",
    "check_checkpoint_path",
    "check_model_arguments",
    "check_trains_something",
    "configure_logging",
    "main",
    "resolve_checkpoint",
    "resolve_checkpoint_in",
]

if __name__ == "__main__":
    sys.exit(main())
