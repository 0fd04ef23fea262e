"""Every method through the real CLI on a tiny model, then ``selfish-rnn results`` on what those runs left behind."""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import pytest

from lightning_selfish.flops_callback import FlopsCallback
from recipes.cli import CONFIG_DIR, TOOL_COMMANDS, build_cli, main
from recipes.paper_results import PAPER_ROWS, PaperRow
from recipes.results import collect_runs
from tests.conftest import write_random_corpus

TINY = ["--model.network.init_args.ninp=8", "--model.network.init_args.nhid=8"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
METHODS = ["selfish", "static", "set", "dsr", "snfs", "rigl", "gmp"]


def absolute(args: list[str]) -> list[str]:
    """A row's arguments with the config paths made absolute (the runs happen in a temporary directory)."""
    return [arg.replace("recipes/configs", str(CONFIG_DIR)) for arg in args]


def row_of(method: str) -> PaperRow:
    """The stacked-LSTM Table 2 row that trains ``method`` (Adam; static: Static-Uniform with SNT-ASGD)."""
    label = "Static-Uniform (SNT-ASGD)" if method == "static" else None
    for row in PAPER_ROWS:
        candidate = row.table == "2" and row.model == "stacked_lstm_ptb" and row.method == method
        if candidate and row.sparsity == 0.67 and (row.row == label if label else row.optimizer == "adam"):
            return row
    raise LookupError(method)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-epoch run of every method (and a dense one) through ``selfish-rnn fit``; the Selfish-RNN run tested."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus"
    corpus.mkdir()
    write_random_corpus(corpus, seed=1, vocab=15)
    data = ["--data.corpus=tiny", f"--data.data_dir={corpus}", "--data.batch_size=4"]
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a module fixture runs outside conftest's per-test quieting)
        patch.chdir(root)
        results = {}
        rows = {method: row_of(method) for method in METHODS}
        rows["dense"] = next(r for r in PAPER_ROWS if r.model == "stacked_lstm_ptb" and r.row == "Dense (NT-ASGD)")
        for method, row in rows.items():
            extra = ["--model.sparsity.update_every=1"] if method == "gmp" else []  # prune within the tiny run
            args = ["fit", *absolute(row.command_args()), *TINY, *data, *QUIET, "--trainer.max_epochs=2", *extra]
            cli = build_cli(args=args)
            results[method] = (row, cli, extra)
        selfish_row, _, _ = results["selfish"]
        test_args = ["test", *absolute(selfish_row.command_args()), *TINY, *data, *QUIET, "--ckpt_path", "best"]
        tested = build_cli(args=test_args)
    return {"root": root, "runs": results, "test": tested}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_the_cli(runs: dict, method: str) -> None:
    row, cli, _ = runs["runs"][method]
    trainer = cli.trainer
    assert trainer.state.finished and trainer.current_epoch == 2
    callback = cli.model._sparsity_callback
    assert callback is not None and callback.method == method
    report = callback.engine.sparsity_report()
    assert report["overall"] == pytest.approx(0.67, abs=0.01), "every method ends at the row's sparsity"
    assert math.isfinite(float(trainer.callback_metrics["val_ppl"]))
    flops = flops_of(cli)
    assert 0.2 < flops["flops/train_vs_dense"] <= 1.0
    assert flops["flops/inference_vs_dense"] == pytest.approx(0.33, abs=0.02)
    if method == "gmp":  # dense to sparse: the early steps cost more than the final masks
        assert callback.num_updates > 0 and flops["flops/train_vs_dense"] > 0.4
    if method == "static":
        assert callback.num_updates == 0


def flops_of(cli) -> dict[str, float]:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, FlopsCallback)).metrics()


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_results_fill_the_paper_tables_in(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root = runs["root"] / "lightning_logs"
    assert "results" in TOOL_COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main(["results", str(root), "--format", "csv", "--table", "2"])
    assert exit_info.value.code == 0
    lines = parse_csv(capsys.readouterr().out)
    by_row = {(line["model"], line["row"], line["sparsity"]): line for line in lines if line["table"] == "2"}
    for row, cli, _ in runs["runs"].values():
        line = by_row[(row.model, row.row, "" if row.sparsity is None else str(row.sparsity))]
        assert line["runs"] == "1" and line["epochs_done"] == "2" and line["max_epochs"] == "2"
        val_history = float(line["val_ours"])
        assert math.isfinite(val_history) and val_history <= float(cli.trainer.callback_metrics["val_ppl"]) + 1e-3
        assert float(line["val_diff"]) == pytest.approx(val_history - row.val, abs=1e-6)
        flops = flops_of(cli)
        assert float(line["train_flops_ours"]) == pytest.approx(float(flops["flops/train_vs_dense"]), rel=1e-5)
        assert float(line["inference_flops_ours"]) == pytest.approx(float(flops["flops/inference_vs_dense"]), rel=1e-5)
        assert float(line["train_flops_paper"]) == row.train_flops
    selfish = by_row[("stacked_lstm_ptb", "Selfish-RNN (Adam)", "0.67")]
    test_ppl = float(runs["test"].trainer.callback_metrics["test_ppl"])
    assert float(selfish["test_ours"]) == pytest.approx(test_ppl, rel=1e-5), "the test of the best checkpoint"
    assert float(selfish["test_diff"]) == pytest.approx(test_ppl - 82.85, abs=1e-4)
    untested = by_row[("stacked_lstm_ptb", "SET (Adam)", "0.67")]
    assert untested["test_ours"] == "" and untested["val_paper"] == "87.3"
    quoted = by_row[("stacked_lstm_ptb", "Dense*", "")]
    assert quoted["quoted_from"] and quoted["runs"] == "0"


def test_results_markdown_and_unmatched_runs(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root = runs["root"] / "lightning_logs"
    assert TOOL_COMMANDS["results"]([str(root)]) == 0
    text = capsys.readouterr().out
    assert "## Table 2: stacked LSTM and RHN on Penn Treebank" in text and "## Table 7" in text
    selfish = next(line for line in text.splitlines() if "| Selfish-RNN (Adam) |" in line and "stacked" in line)
    cells = [cell.strip() for cell in selfish.strip("|").split("|")]
    assert cells[5] == "85.70" and cells[6] == "82.85" and cells[9] == "2/2" and cells[10] == "1"
    assert cells[11].endswith("(0.33x)") and cells[12].endswith("(0.33x)")
    # --only-run keeps the rows that have runs: one per method (and dense)
    assert TOOL_COMMANDS["results"]([str(root), "--only-run", "--table", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| stacked_lstm_ptb")]
    assert len(rows) == len(METHODS) + 1
    runs_found = collect_runs(root)
    assert len(runs_found) == len(METHODS) + 1, "the test of the Selfish-RNN run is read with its fit"


def test_results_of_a_missing_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert TOOL_COMMANDS["results"]([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert TOOL_COMMANDS["results"]([str(tmp_path)]) == 0
    assert "no run" in capsys.readouterr().err
