"""The ``selfish-rnn`` command and its configs: every config instantiates, each model runs, overrides apply."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish_recipes.cli import CONFIG_DIR, build_cli, main, resolve_checkpoint
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.lm import LanguageModel, MaskBlindNTASGD
from lightning_selfish_recipes.models import ONLSTM, RHN, AWDLSTMMoS, StackedLSTM
from tests.conftest import write_random_corpus

MODELS = ["stacked_lstm_ptb", "rhn_ptb", "onlstm_ptb", "awd_lstm_mos_wt2"]
VOCAB = {"ptb": 10_000, "wikitext-2": 33_278}

# The paper's models (docs/models.md#parameter-counts) and their small dense counterparts.
PARAMETERS = {StackedLSTM: 66_034_000, RHN: 23_484_060, ONLSTM: 25_232_180, AWDLSTMMoS: 34_909_528}
SMALL_DENSE = {"stacked_lstm_ptb": 21_861_200, "rhn_ptb": 11_104_524, "onlstm_ptb": 11_433_668}
# Table 4: (class, sparsity, prune rate, lr, epochs, seed, batch, eval batch, test batch, bptt, variable).
TABLE4 = {
    "stacked_lstm_ptb": (StackedLSTM, 0.67, 0.7, 40, 100, 1111, 20, 20, 20, 35, False),
    "rhn_ptb": (RHN, 0.528, 0.5, 15, 500, 42, 20, 20, 20, 35, False),
    "onlstm_ptb": (ONLSTM, 0.55, 0.5, 30, 1000, 141, 20, 10, 1, 70, True),
    "awd_lstm_mos_wt2": (AWDLSTMMoS, 0.55, 0.5, 15, 1000, 1882, 15, 10, 1, 70, True),
}
TINY = {
    "stacked_lstm_ptb": ["--model.network.init_args.ninp=8", "--model.network.init_args.nhid=8"],
    "rhn_ptb": [
        "--model.network.init_args.ninp=8",
        "--model.network.init_args.nhid=8",
        "--model.network.init_args.depth=2",
    ],
    "onlstm_ptb": [
        "--model.network.init_args.ninp=10",
        "--model.network.init_args.nhid=10",
        "--model.network.init_args.chunk_size=5",
    ],
    "awd_lstm_mos_wt2": [
        "--model.network.init_args.ninp=8",
        "--model.network.init_args.nhid=8",
        "--model.network.init_args.nhidlast=8",
        "--model.network.init_args.n_experts=2",
    ],
}


@pytest.fixture
def known_vocab(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip tokenising PTB / WikiText-2 (seconds each) where only the vocabulary size is needed."""
    monkeypatch.setattr(
        LanguageModelingDataModule, "vocab_size", property(lambda self: VOCAB[self.corpus_name]), raising=True
    )


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_corpus(tmp_path_factory.mktemp("corpus"), seed=1, vocab=15)


def tiny_data(corpus_dir: Path) -> list[str]:
    return ["--data.corpus=tiny", f"--data.data_dir={corpus_dir}", "--data.batch_size=4"]


# ------------------------------------------------------------------------------------------------- configs


# name -> overlays over the model config (lightning_selfish_recipes/configs/{methods,optimizers,small_dense}/)
VARIANTS = {
    "": [],
    "dense": ["methods/dense.yaml", "optimizers/ntasgd.yaml"],
    "adam": ["optimizers/adam.yaml"],
    "no_redistribution": ["methods/no_redistribution.yaml"],
    "standard_ntasgd": ["optimizers/ntasgd.yaml"],
    "static": ["methods/static.yaml"],
    "momentum": ["optimizers/momentum.yaml"],
    "small_dense": ["small_dense/{model}.yaml", "optimizers/ntasgd.yaml"],
}
COMPOSITIONS = [
    (model, variant)
    for model in MODELS
    for variant in VARIANTS
    if not (variant == "momentum" and model != "stacked_lstm_ptb")
    and not (variant == "small_dense" and model == "awd_lstm_mos_wt2")
] + [("quickstart", "")]


def composition_args(model: str, variant: str) -> list[str]:
    args = ["--config", str(CONFIG_DIR / f"{model}.yaml")]
    for overlay in VARIANTS[variant]:
        args += ["--config", str(CONFIG_DIR / overlay.format(model=model))]
    return args


def test_the_recipes_are_all_there() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == {*MODELS, "quickstart"}
    methods = {p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml")}
    assert {"selfish", "static", "static_er", "set", "dsr", "snfs", "rigl", "gmp", "dense"} <= methods
    assert {p.stem for p in (CONFIG_DIR / "optimizers").glob("*.yaml")} == {"sntasgd", "ntasgd", "adam", "momentum"}
    small = {p.stem for p in (CONFIG_DIR / "small_dense").glob("*.yaml")}
    assert small == {"stacked_lstm_ptb", "rhn_ptb", "onlstm_ptb"}


@pytest.mark.parametrize("composition", COMPOSITIONS, ids=["+".join(filter(None, c)) for c in COMPOSITIONS])
def test_every_config_parses_and_instantiates(composition: tuple[str, str], known_vocab: None) -> None:
    base, variant = composition
    with torch.device("meta"):  # the paper's sizes, without allocating 66M parameters many times
        cli = build_cli(args=composition_args(base, variant), run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, LanguageModel) and isinstance(data, LanguageModelingDataModule)
    assert model.network.ntoken == VOCAB[data.corpus_name], "the vocabulary is linked to the network"
    assert model.bptt == data.bptt, "data.bptt is linked to the model"
    assert trainer.num_sanity_val_steps == 0
    assert isinstance(trainer.logger, TensorBoardLogger)
    assert model.weight_decay == 1.2e-6 and model.clip == 0.25 and model.nonmono == 5

    if base == "quickstart":
        assert model.sparsity is not None and trainer.max_epochs == 1
        return
    cls, sparsity, prune_rate, lr, epochs, seed, batch, eval_batch, test_batch, bptt, variable = TABLE4[base]
    assert type(model.network) is cls
    n_params = sum(p.numel() for p in model.network.parameters())
    assert n_params == (SMALL_DENSE[base] if variant == "small_dense" else PARAMETERS[cls])
    assert trainer.max_epochs == epochs and cli.config.seed_everything == seed and data.seed == seed
    assert (data.batch_size, data.eval_batch_size, data.test_batch_size, data.bptt, data.variable_bptt) == (
        batch,
        eval_batch,
        test_batch,
        bptt,
        variable,
    )
    assert data.max_seq_len_delta == (20 if base == "awd_lstm_mos_wt2" else None)
    assert model.small_batch_size == (5 if base == "awd_lstm_mos_wt2" else None)
    assert model.restart_at_epochs == ([500] if base == "onlstm_ptb" else [])
    expected_optimizer = {
        "dense": "ntasgd",
        "small_dense": "ntasgd",
        "standard_ntasgd": "ntasgd",
        "adam": "adam",
        "momentum": "momentum",
    }.get(variant, "sntasgd")
    assert model.optimizer_name == expected_optimizer
    assert model.lr == {"adam": 1e-3, "momentum": 2.0}.get(variant, lr)
    if variant in ("dense", "small_dense"):
        assert model.sparsity is None
        return
    assert model.sparsity.sparsity == sparsity
    group = model.sparsity
    assert group.prune_rate == (None if variant == "static" else prune_rate)
    assert group.method == {"static": "static"}.get(variant, "selfish")
    assert group.gate_redistribution is (False if variant == "no_redistribution" else None)
    assert group.init is None and group.update_every is None, "the model configs leave these to the method"
    assert group.verbose is True  # the recipes log the per-gate summary
    assert model.sparsity_arguments()["exclude"] == (["network.prior.weight"] if cls is AWDLSTMMoS else [])


def test_command_line_overrides(known_vocab: None) -> None:
    config = CONFIG_DIR / "stacked_lstm_ptb.yaml"
    args = [
        "--config",
        str(config),
        "--trainer.max_epochs",
        "3",
        "--model.sparsity.sparsity",
        "0.62",
        "--model.network.init_args.nhid",
        "16",
        "--model.network.init_args.ninp",
        "16",
        "--data.bptt",
        "20",
    ]
    cli = build_cli(args=args, run=False)
    assert cli.trainer.max_epochs == 3 and cli.model.sparsity.sparsity == 0.62
    assert cli.model.network.nhid == 16 and cli.model.bptt == 20
    sparse = next(cb for cb in cli.model.configure_callbacks() if isinstance(cb, SelfishSparsityCallback))
    assert sparse.sparsity == 0.62 and sparse.prune_rate == 0.7

    # --model.sparsity.method picks a preset; the model config's prune rate and explicit parts override it
    args += ["--model.sparsity.method", "rigl", "--model.sparsity.gate_redistribution", "magnitude"]
    cli = build_cli(args=args, run=False)
    rigl = next(cb for cb in cli.model.configure_callbacks() if isinstance(cb, SelfishSparsityCallback))
    assert (rigl.method, rigl.growth.name, rigl.init.name, rigl.prune_rate) == ("rigl", "gradient", "erk", 0.7)
    assert rigl.gate_redistribution.name == "magnitude" and rigl.update_every == 100
    with pytest.raises(ValueError, match=r"sparsity.method must be one of \['selfish', .*got 'pruning'"):
        build_cli(args=[*args, "--model.sparsity.method", "pruning"], run=False)


def test_the_sparsity_group_composes_and_refuses_unknown_keys(known_vocab: None, tmp_path: Path) -> None:
    base = ["--config", str(CONFIG_DIR / "stacked_lstm_ptb.yaml")]
    # an overlay sets only the keys it names; the command line wins over both
    rigl = ["--config", str(CONFIG_DIR / "methods/rigl.yaml"), "--model.sparsity.min_prune_rate", "0.01"]
    with torch.device("meta"):
        group = build_cli(args=[*base, *rigl], run=False).model.sparsity
    assert (group.sparsity, group.prune_rate, group.method, group.update_every) == (0.67, 0.7, "rigl", "epoch")
    assert (group.update_until, group.min_prune_rate) == (1.0, 0.01)
    with torch.device("meta"):
        assert build_cli(args=[*base, "--model.sparsity", "null"], run=False).model.sparsity is None
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("model:\n  sparsity:\n    sparsty: 0.5\n")
    with pytest.raises(argparse.ArgumentError, match="Option 'sparsty' is not accepted"):
        build_cli(args=[*base, "--config", str(misspelt)], run=False, exit_on_error=False)
    with pytest.raises(argparse.ArgumentError, match="prune_rate"):
        build_cli(args=[*base, "--model.sparsity.prune_rate", "high"], run=False, exit_on_error=False)


def test_help_explains_the_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for argument in ("--model.sparsity", "--model.sparsity.help", "--model.optimizer", "--data.bptt", "--ckpt_path"):
        assert argument in text
    assert "SNT-ASGD" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.sparsity.help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out  # the callback's arguments, their types, defaults and docs
    for argument in ("--model.sparsity.sparsity", "--model.sparsity.prune_rate", "--model.sparsity.method"):
        assert argument in text
    assert "gate_redistribution" in text and "cosine schedule ends" in text


# ----------------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_of_each_model_at_tiny_size(
    model: str, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(CONFIG_DIR / f"{model}.yaml"),
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *TINY[model],
        *tiny_data(corpus_dir),
    ]
    cli = build_cli(args=args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["val_ppl"])
    callback = cli.model._sparsity_callback
    assert callback is not None
    report = callback.engine.sparsity_report()
    assert report["overall"] == pytest.approx(TABLE4[model][1], abs=0.02)


def test_fit_then_test_the_best_checkpoint_in_another_process(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(CONFIG_DIR / "stacked_lstm_ptb.yaml"),
        *TINY["stacked_lstm_ptb"],
        *tiny_data(corpus_dir),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    fit = build_cli(args=["fit", *common, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3"])
    best = Path(fit.trainer.checkpoint_callback.best_model_path)
    label = (
        "selfish-sntasgd-s0.67-p0.7-seed1111"  # the composition's own run directory (lightning_selfish_recipes/runs.py)
    )
    assert best.is_file() and best.parents[2].name == label and best.parents[3].name == "stacked_lstm_ptb"
    assert (tmp_path / "lightning_logs" / "stacked_lstm_ptb" / label / "version_0" / "config.yaml").is_file()

    test = build_cli(args=["test", *common, "--ckpt_path", "best"])  # a fresh CLI, as a new process would be
    assert Path(test.trainer.ckpt_path).resolve() == best.resolve()
    metrics = test.trainer.callback_metrics
    assert torch.exp(metrics["test_loss"]) == pytest.approx(float(metrics["test_ppl"]), rel=1e-5)
    assert resolve_checkpoint(test.trainer, "last").name == "last.ckpt"

    resumed = build_cli(
        args=["fit", *common, "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--ckpt_path", "last"]
    )
    assert resumed.trainer.current_epoch == 3 and resumed.trainer.global_step == 9


@pytest.mark.parametrize(
    "limit,match",
    [
        ("--trainer.max_epochs=0", r"--trainer.max_epochs 0 trains nothing \(0 epochs\)"),
        ("--trainer.max_steps=0", r"--trainer.max_steps 0 trains nothing \(0 optimizer steps\)"),
        ("--trainer.limit_train_batches=0", r"--trainer.limit_train_batches 0(\.0)? trains nothing"),
        ("--trainer.limit_train_batches=0.0", r"--trainer.limit_train_batches 0.0 trains nothing"),
    ],
)
def test_a_fit_that_trains_nothing_is_an_error(
    limit: str, match: str, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It used to end with "selfish-rnn fit: done", exit status 0 and an empty log folder.
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIG_DIR / "quickstart.yaml"), *tiny_data(corpus_dir), limit]
    with pytest.raises(ValueError, match=match):
        build_cli(args=args, exit_on_error=False)
    assert not (tmp_path / "lightning_logs").exists(), "refused before anything was created"


def test_a_resume_of_a_finished_run_says_nothing_was_trained(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(CONFIG_DIR / "stacked_lstm_ptb.yaml"),
        *TINY["stacked_lstm_ptb"],
        *tiny_data(corpus_dir),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    ]
    build_cli(args=["fit", *common])
    with pytest.raises(ValueError, match=r"nothing was trained: the checkpoint .*last.ckpt is already at epoch 1, "):
        build_cli(args=["fit", *common, "--ckpt_path", "last"])


def test_best_without_an_earlier_run_is_a_clear_error(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no earlier run"):
        build_cli(
            args=[
                "test",
                "--config",
                str(CONFIG_DIR / "rhn_ptb.yaml"),
                *TINY["rhn_ptb"],
                *tiny_data(corpus_dir),
                "--ckpt_path",
                "best",
            ]
        )


class LossLog(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, *args) -> None:
        self.losses.append(float(outputs["loss"]))


def test_quickstart_lowers_the_training_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml in the working directory when nothing is logged
    args = [
        "--config",
        str(CONFIG_DIR / "quickstart.yaml"),
        "--trainer.max_steps=30",
        "--model.sparsity.update_every=10",  # (the config's 400 steps would make no update: refused)
        "--trainer.limit_val_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--model.checkpoint=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    cli = build_cli(args=args, run=False)
    log = LossLog()
    cli.trainer.callbacks.append(log)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(log.losses) == 30
    assert log.losses[0] == pytest.approx(9.21, abs=0.1), "an untrained model predicts about uniformly over 10k words"
    assert sum(log.losses[-5:]) / 5 < log.losses[0] - 1.0


def test_standard_ntasgd_config_uses_the_mask_blind_optimizer(known_vocab: None) -> None:
    with torch.device("meta"):
        cli = build_cli(args=composition_args("rhn_ptb", "standard_ntasgd"), run=False)
    assert type(cli.model.configure_optimizers()) is MaskBlindNTASGD
