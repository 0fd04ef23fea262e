"""A first hour with ``selfish-rnn``: one-line user errors, quiet runs, a result at the end, one log version per
run, short help, and the recipes on the unified ``lightning`` package.

The command runs in subprocesses (``python -m lightning_selfish_recipes.cli`` with this checkout first on
``PYTHONPATH``), as a user runs it. No assertion is on time: an argument error must instead come before the corpus is
read.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_selfish_recipes import compat, console
from lightning_selfish_recipes.cli import CONFIG_DIR, TOOL_COMMANDS, build_cli, main
from lightning_selfish_recipes.data import resolve_corpus
from tests.conftest import write_random_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(CONFIG_DIR / "quickstart.yaml")
NOISE = (
    "💡 Tip",
    "LeafSpec",
    "has `__len__` defined",
    "will override existing callbacks",
    "dirpath has changed",
    "exists and is not empty",
    "Loading `train_dataloader`",
    "does not have many workers",
)
TINY_NETWORK = ["--model.network.init_args.ninp=8", "--model.network.init_args.nhid=8"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
#: The quickstart's cadence (every 400 steps) makes no update in the tiny runs here, which is refused.
SHORT_CADENCE = "--model.sparsity.update_every=2"


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    # The timeout only guards against a hang; nothing here measures time.
    return subprocess.run(
        [sys.executable, "-m", "lightning_selfish_recipes.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_corpus(tmp_path_factory.mktemp("tiny"), seed=3, vocab=20, lines=(60, 12, 12))


@pytest.fixture(scope="module")
def ptb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    resolve_corpus("ptb", cache_dir=root)
    return root


def tiny_data(corpus: Path) -> list[str]:
    return ["--data.corpus=tiny", f"--data.data_dir={corpus}", "--data.batch_size=4", "--data.eval_batch_size=4"]


# ------------------------------------------------------------------------------------------------ user errors


def assert_one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    text = output_of(result)
    lines = [line for line in text.splitlines() if line.strip()]
    assert result.returncode == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(expected, errors[0]), text
    assert len(lines) <= 3 and len(errors[0]) < 700, text  # at most "Seed set to ..." and a corpus line besides


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.sparsity.sparsity", "1.5"], r"error: --model\.sparsity\.sparsity must be in \(0, 1\), got 1\.5$"),
        (["--model.lr", "-1"], r"error: --model\.lr must be a positive number, got -1\.0$"),
        (["--model.optimizer", "foo"], r"--model.optimizer: expected one of 'sntasgd', .*'adam', got 'foo' \(selfish"),
        (["--model.sparsty", "0.5"], r"unrecognized arguments: --model.sparsty 0.5 \(selfish-rnn fit --help"),
        (["--data.corpus", "nosuch"], r"corpus='nosuch' is not bundled \(allowed without data_dir: ptb, wikitext-2\)"),
    ],
    ids=["sparsity", "lr", "optimizer", "unknown", "corpus"],
)
def test_argument_errors_are_one_line_before_the_corpus_is_read(args: list[str], expected: str, tmp_path: Path) -> None:
    result = run_cli(["fit", "--config", QUICKSTART, *args], tmp_path, {"LIGHTNING_SELFISH_CACHE": str(tmp_path)})
    assert_one_error_line(result, expected)
    assert "Corpus 'ptb'" not in output_of(result) and not (tmp_path / "ptb").exists()  # nothing was read


def test_a_damaged_corpus_is_one_error_line(ptb_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = resolve_corpus("ptb", cache_dir=cache)
    with open(target / "valid.txt", "r+b") as f:
        f.truncate(100)
    result = run_cli(["fit", "--config", QUICKSTART], tmp_path, {"LIGHTNING_SELFISH_CACHE": str(cache)})
    assert_one_error_line(result, r"valid.txt.*delete the directory")


def test_a_missing_checkpoint_is_one_error_line(tiny_corpus: Path, tmp_path: Path) -> None:
    result = run_cli(["test", "--config", QUICKSTART, *tiny_data(tiny_corpus), "--ckpt_path", "best"], tmp_path)
    assert_one_error_line(result, r"--ckpt_path best: no earlier run with a last.ckpt under lightning_logs/quickstart")


@pytest.mark.parametrize("command", ["test", "fit"])
def test_a_checkpoint_file_that_is_not_there_is_refused_before_any_work(
    command: str, tiny_corpus: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.ckpt"
    args = [command, "--config", QUICKSTART, *TINY_NETWORK, *tiny_data(tiny_corpus), "--ckpt_path", str(missing)]
    result = run_cli(args, tmp_path)
    assert_one_error_line(result, rf"^error: --ckpt_path {re.escape(str(missing))}: no such checkpoint file \(")
    assert "Corpus 'tiny'" not in output_of(result)  # nothing was read
    assert not (tmp_path / "lightning_logs").exists()  # and no log folder left behind


def test_fit_without_a_config_says_to_give_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.sparsity.sparsity", "1.5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: the following arguments are required: --model.network, --model.lr; no --config was given: start "
        f"from a recipe, e.g. selfish-rnn fit --config {QUICKSTART} (selfish-rnn list shows them all; selfish-rnn fit "
        "--help lists the arguments)\n"
    )


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli(["fit", "--config", QUICKSTART, "--model.sparsity.sparsity", "1.5", "--debug"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ValueError: sparsity.sparsity must be in (0, 1)" in result.stderr


def test_which_exceptions_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def deliberate() -> None:
        raise ValueError("lr must be a positive number, got -1")

    def unpacking() -> tuple[int, int]:
        first, second = (1, 2, 3)  # a bug, not a check
        return first, second

    errors = {}
    for name, function in (("deliberate", deliberate), ("unpacking", unpacking)):
        try:
            function()
        except ValueError as error:
            errors[name] = error
    assert console.user_error_message(errors["deliberate"]) is None  # this file is not a trusted package
    monkeypatch.setattr(console, "_package_dirs", lambda packages: [Path(__file__).parent])
    assert console.user_error_message(errors["deliberate"]) == "lr must be a positive number, got -1"
    assert console.user_error_message(errors["unpacking"]) is None  # not a raise statement: a bug
    monkeypatch.undo()
    with pytest.raises(ValueError) as info:
        build_cli(["--config", QUICKSTART, "--model.lr", "-1"], run=False, exit_on_error=False)
    assert console.user_error_message(info.value) == "--model.lr must be a positive number, got -1.0"
    with pytest.raises(ValueError) as info:
        torch.nn.functional.nll_loss(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    assert console.user_error_message(info.value) is None  # raised in torch: a bug of the model, with its traceback
    assert console.user_error_message(RuntimeError("boom")) is None
    assert console.user_error_message(FileNotFoundError(2, "No such file or directory", "x.ckpt")) is not None


# ----------------------------------------------------------------------------------- quiet runs and results


def test_quickstart_sized_run_is_quiet_reports_its_result_and_keeps_one_log_version(
    ptb_cache: Path, tmp_path: Path
) -> None:
    env = {"LIGHTNING_SELFISH_CACHE": str(ptb_cache)}
    short = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--data.eval_batch_size=20"]
    short.append(SHORT_CADENCE)
    fit = run_cli(["fit", "--config", QUICKSTART, *short, "--trainer.max_epochs=1"], tmp_path, env)
    text = output_of(fit)
    assert fit.returncode == 0, text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the output:\n{text}"

    (version,) = tmp_path.glob("lightning_logs/quickstart/*/version_0")  # <name>/<run label>/version_0
    last = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best_ppl = float(torch.exp(state["best_model_score"]))
    assert f"best validation perplexity  {best_ppl:.4f} (epoch 0, counting from 0)" in text
    assert f"best checkpoint             {state['best_model_path']}" in text
    assert re.search(r"network\.rnn\.weight_hh_l1: 0\.5000 \| i 0\.\d{4}, f 0\.\d{4}, g 0\.\d{4}, o 0\.\d{4}", text)
    next_command = re.search(r"next: (selfish-rnn test .*)", text).group(1)
    assert next_command == (
        f"selfish-rnn test --config {version / 'config.yaml'} --ckpt_path {state['best_model_path']}".replace(
            str(tmp_path) + "/", ""
        )
    )

    test = run_cli([*shlex.split(next_command)[1:], "--trainer.limit_test_batches=2"], tmp_path, env)
    text = output_of(test)
    assert test.returncode == 0, text
    assert re.search(r"selfish-rnn test: test perplexity \d+\.\d{4} \(checkpoint .*epoch0000", text), text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the output:\n{text}"

    resumed = run_cli(
        ["fit", "--config", QUICKSTART, *short, "--trainer.max_epochs=2", "--ckpt_path=last"], tmp_path, env
    )
    text = output_of(resumed)
    assert resumed.returncode == 0, text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the output:\n{text}"
    assert sorted(p.name for p in version.parent.iterdir()) == ["version_0"], "test and resume log to the run's version"
    assert len(list(version.glob("events.out.tfevents.*"))) == 3  # fit, test, resumed fit
    assert len(list((version / "checkpoints").glob("epoch0001-*.ckpt"))) == 1  # the resumed epoch, same directory


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning"])
def test_the_model_summary_shows_the_runs_flops_per_token(package: str, tiny_corpus: Path, tmp_path: Path) -> None:
    """The summary printed at the start of a fit: FLOPs per token of this run's masks, not torch's 0."""
    args = ["fit", "--config", QUICKSTART, *TINY_NETWORK, *tiny_data(tiny_corpus), "--trainer.max_epochs=1"]
    args.append(SHORT_CADENCE)  # (the quickstart's 400-step cadence makes no update in a run this short: refused)
    result = run_cli([*args, "--trainer.enable_progress_bar=false"], tmp_path, {compat.ENV_VAR: package})
    text = output_of(result)
    assert result.returncode == 0, text
    assert "Total Flops" not in text and "Total FLOPs" not in text, text
    assert "Trainer already configured with model summary callbacks" not in text, text
    (last,) = tmp_path.glob("lightning_logs/quickstart/*/version_0/checkpoints/last.ckpt")
    checkpoint = torch.load(last, weights_only=False, map_location="cpu")
    masks = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("SelfishSparsityCallback"))["masks"]
    weights = checkpoint["state_dict"]
    # The rule (docs/flops.md): 2 FLOPs per active weight of each matrix that multiplies an activation, once per
    # token; the (untied) embedding is a lookup and free.
    matmuls = [name for name in weights if name.startswith(("network.rnn.weight_", "network.decoder.weight"))]
    sparse = sum(2 * int(masks[name].sum()) if name in masks else 2 * weights[name].numel() for name in matmuls)
    dense = sum(2 * weights[name].numel() for name in matmuls)
    assert sparse < dense
    header = next(line for line in text.splitlines() if line.lstrip().startswith("| Name"))
    assert header.split("|")[-1].strip() == "FLOPs per token", text
    row = next(line for line in text.splitlines() if re.match(r"0 \| network ", line))
    assert row.split("|")[-1].strip() == f"{sparse:,}", text
    assert re.search(rf"^{sparse:,} +Inference FLOPs per token \(with this run's masks; dense {dense:,}\)$", text, re.M)


def test_the_model_summary_in_a_trainer_of_ones_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dense model of one's own: the dense figure; a weight of unknown cost: no figure, and why (no crash)."""
    from lightning_selfish_recipes import model_summary
    from tests.conftest import TinyLM, make_trainer, token_loader

    printed: list[str] = []
    monkeypatch.setattr(model_summary, "rank_zero_info", printed.append)
    model = TinyLM()
    make_trainer([model_summary.FlopsPerTokenModelSummary()], max_epochs=1, limit_train_batches=1).fit(
        model, token_loader()
    )
    recurrent = 2 * sum(p.numel() for n, p in model.rnn.named_parameters() if n.startswith("weight_"))
    dense = recurrent + 2 * model.decoder.weight.numel()  # the embedding is a lookup: free
    (text,) = printed
    assert re.search(rf"^\d +\| rnn +\| LSTM +\| .* \| {recurrent:,}$", text, re.M), text
    assert re.search(rf"^{dense:,} +Inference FLOPs per token \(dense\)$", text, re.M), text

    model.scale = torch.nn.Parameter(torch.ones(2, 2))  # a 2-d weight of no known layer: its cost is unknown
    printed.clear()
    make_trainer([model_summary.FlopsPerTokenModelSummary()], max_epochs=1, limit_train_batches=1).fit(
        model, token_loader()
    )
    (text,) = printed
    assert "FLOPs per token not counted: cannot count the FLOPs of ['scale']" in text, text
    assert "Inference FLOPs" not in text and "| Mode" in text, text


def test_resume_can_start_a_new_log_version(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    common = ["--config", QUICKSTART, *TINY_NETWORK, *tiny_data(tiny_corpus), *QUIET, SHORT_CADENCE]
    build_cli(["fit", *common, "--trainer.max_epochs=1"])
    same = build_cli(["fit", *common, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert Path(same.trainer.log_dir).name == "version_0" and same.trainer.current_epoch == 2
    new = build_cli(["fit", *common, "--trainer.max_epochs=3", "--ckpt_path=last", "--continue_log_version=false"])
    assert Path(new.trainer.log_dir).name == "version_1" and new.trainer.current_epoch == 3


# ------------------------------------------------------------------------------------------ the lightning package


def test_recipes_run_on_the_unified_lightning_package(tiny_corpus: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", QUICKSTART, *TINY_NETWORK, *tiny_data(tiny_corpus), *QUIET, SHORT_CADENCE]
    args.append("--trainer.max_epochs=2")
    result = run_cli(args, tmp_path, {compat.ENV_VAR: "lightning"})
    text = output_of(result)
    assert result.returncode == 0, text
    assert "selfish-rnn fit: done" in text and "best validation perplexity" in text
    (version,) = tmp_path.glob("lightning_logs/quickstart/*/version_0")
    config = (version / "config.yaml").read_text()
    assert "class_path: lightning.pytorch.loggers.TensorBoardLogger" in config
    assert "pytorch_lightning" not in config


def test_the_package_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compat.PACKAGE == "pytorch_lightning"  # the default, in this process
    monkeypatch.setenv(compat.ENV_VAR, "lightning.pytorch")
    with pytest.raises(ValueError, match=r"SELFISH_RNN_LIGHTNING must be one of \['pytorch_lightning', 'lightning'\]"):
        compat.selected()
    monkeypatch.setenv(compat.ENV_VAR, "lightning")
    assert compat.selected() == "lightning"


# -------------------------------------------------------------------------------------------------------- help


def test_overview_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    overview = capsys.readouterr().out
    assert "selfish-rnn list" in overview and "--model.sparsity.sparsity" in overview and "quickstart.yaml" in overview
    assert len(overview.splitlines()) < 40
    with pytest.raises(SystemExit) as exit_info:
        main(["list"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert "quickstart.yaml" in listing
    for model in ("stacked_lstm_ptb", "rhn_ptb", "onlstm_ptb", "awd_lstm_mos_wt2"):
        assert f"--config lightning_selfish_recipes/configs/{model}.yaml" in listing
    assert re.search(
        r"stacked_lstm_ptb: Selfish-RNN \(SNT-ASGD\), sparsity 0\.67\s+paper val/test 73\.76 / 71\.65\s+100 epochs, "
        r"GPU ~1-2 h",
        listing,
    )
    # rows that differ only in sparsity are told apart; longer rows and the paper's repeats cost more
    assert "stacked_lstm_ptb: RigL (SNT-ASGD), sparsity 0.62" in listing
    assert re.search(
        r"Selfish-RNN1300 \(ASGD\), sparsity 0\.55 .* 1300 epochs, GPU ~31 h per run; x5 runs: ~6\.5 days", listing
    )
    for name in TOOL_COMMANDS:  # every command of the overview is described
        line = next(line for line in overview.splitlines() if line.startswith(f"  selfish-rnn {name} "))
        assert len(line.split(maxsplit=2)[2]) > 20, line
    with pytest.raises(SystemExit):
        main(["list", "--table", "8"])
    table8 = capsys.readouterr().out
    assert "awd_lstm_mos_wt2" in table8 and "stacked_lstm_ptb:" not in table8


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    assert '"sntasgd" (SGD, then SNT-ASGD' in text  # from ``"sntasgd"`` in LanguageModel's docstring
    assert console.plain_text("``x`` and :class:`~lightning_selfish_recipes.models.StackedLSTM` and :func:`a.b`") == (
        "x and StackedLSTM and a.b"
    )


def test_fit_help_shows_the_projects_options_first_and_all_with_help_all(capsys: pytest.CaptureFixture[str]) -> None:
    def help_of(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *args])
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    brief, full = help_of("--help"), help_of("--help-all")
    for text in (brief, full):
        lines = text.splitlines()
        assert lines[0] == "usage: selfish-rnn fit --config CONFIG [--ARGUMENT VALUE ...] [--help | --help-all]"
        first = {prefix: next(k for k, line in enumerate(lines) if line.startswith(f"  --{prefix}.")) for prefix in (
            "model", "data", "trainer")}  # fmt: skip
        assert first["model"] < first["data"] < first["trainer"]
        assert first["model"] < 40, "the model's options right after the general ones"
        assert "torch.nn.Identity" not in text and "and 5" in text  # the network's subclasses, not all of torch's
    assert "--trainer.max_epochs" in brief and "--trainer.fast_dev_run" not in brief
    assert "all of them: selfish-rnn fit --help-all" in brief
    assert "--trainer.fast_dev_run" in full and len(full.splitlines()) > len(brief.splitlines()) + 100
    assert len(brief.splitlines()) < 400


def test_the_cli_offers_every_choice_of_the_callback(tiny_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_selfish.method.catalogue import INITS, REMOVALS

    def callback_of(*args: str):
        cli = build_cli(["--config", QUICKSTART, *tiny_data(tiny_corpus), *args], run=False)
        return next(cb for cb in cli.model.configure_callbacks() if type(cb).__name__ == "SelfishSparsityCallback")

    for init in INITS:
        assert callback_of("--model.sparsity.init", init).init.name == init
    dsr = callback_of(
        "--model.sparsity.init", "erk", "--model.sparsity.removal", "threshold", "--model.sparsity.growth", "gradient"
    )
    assert (dsr.init.name, dsr.removal.name, dsr.growth.name) == ("erk", "threshold", "gradient")
    gmp = callback_of(
        "--model.sparsity.method", "gmp", "--model.sparsity.removal", "set", "--model.sparsity.growth", "none"
    )
    assert (gmp.removal.name, gmp.growth.name) == ("set", "none")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.sparsity.removal", "largest"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --model.sparsity.removal must be one of {list(REMOVALS)} or a Removal object, got 'largest'\n"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.clip", "half"], "--model.clip: expected a number or null, got 'half'"),
        (["--model.lr", "abc"], "--model.lr: expected a number, got 'abc'"),
        (["--model.nonmono", "1.5"], "--model.nonmono: expected a whole number, got '1.5'"),
        (["--model.flops", "maybe"], "--model.flops: expected true or false, got 'maybe'"),
        (
            ["--model.restart_at_epochs", "x"],
            "--model.restart_at_epochs: expected a list of whole numbers or null, got 'x'",
        ),
    ],
    ids=["float", "required float", "int", "bool", "list"],
)
def test_a_value_of_the_wrong_type_is_one_plain_line(args, expected, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {expected} (selfish-rnn fit --help lists the arguments)\n"


def test_an_unknown_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_selfish_recipes.cli import SelfishRNNCLI

    with pytest.raises(SystemExit) as exit_info:
        main(["exprot", "--config", QUICKSTART])
    assert exit_info.value.code == 2
    commands = [*SelfishRNNCLI.subcommands(), *TOOL_COMMANDS]
    assert "fit" in commands and "results" in commands
    assert capsys.readouterr().err == (
        f"error: unknown command 'exprot'; the commands are {', '.join(commands)} "
        "('selfish-rnn' alone describes them)\n"
    )
