"""Every method through the real CLI on a tiny model, then ``selfish-rnn results`` on what those runs left behind,
and on run folders that are a paper cell, or differ from one in one setting."""

from __future__ import annotations

import copy
import csv
import io
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_selfish.callbacks.flops import FlopsCallback
from lightning_selfish_recipes.cli import CONFIG_DIR, TOOL_COMMANDS, build_cli, main
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.tools.paper_results import PAPER_ROWS, PaperRow
from lightning_selfish_recipes.tools.results import collect_runs
from tests.conftest import write_random_corpus

TINY = ["--model.network.init_args.ninp=8", "--model.network.init_args.nhid=8"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
METHODS = ["selfish", "static", "set", "dsr", "snfs", "rigl", "gmp"]


def absolute(args: list[str]) -> list[str]:
    """A row's arguments with the config paths made absolute (the runs happen in a temporary directory)."""
    return [arg.replace("lightning_selfish_recipes/configs", str(CONFIG_DIR)) for arg in args]


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


def results(*args: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``selfish-rnn results ARGS`` through the console script's entry point; returns what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["results", *args])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


TINY_DIFFERENCES = {  # what the tiny runs change of their row's command
    "data.batch_size 4 (cell: 20)",
    "data.corpus tiny (cell: ptb)",
    "network.nhid 8 (cell: 1500)",
    "network.ninp 8 (cell: 1500)",
    "trainer.max_epochs 2 (cell: 100)",
}


def test_tiny_runs_are_no_paper_cell_and_are_listed_with_what_differs(runs: dict, capsys) -> None:
    root = runs["root"] / "lightning_logs"
    assert "results" in TOOL_COMMANDS
    lines = parse_csv(results(str(root), "--format", "csv", "--all", capsys=capsys))
    assert all(line["runs"] == "0" for line in lines if line["table"]), "a tiny run is filed under no paper row"
    unmatched = {line["directories"]: line for line in lines if not line["table"]}
    assert len(unmatched) == len(METHODS) + 1
    for row, cli, extra in runs["runs"].values():
        line = unmatched[str(runs["root"] / Path(cli.trainer.log_dir).parent)]
        assert line["nearest_table"] == row.table and line["nearest_row"] == row.label
        expected = TINY_DIFFERENCES | ({"method.update_every 1 (cell: 100)"} if extra else set())
        assert set(line["differences"].split("; ")) == expected
        assert line["epochs_done"] == "2" and line["planned_epochs"] == "2"
        val_history = float(line["val_ours"])
        assert math.isfinite(val_history) and val_history <= float(cli.trainer.callback_metrics["val_ppl"]) + 1e-3
        flops = flops_of(cli)
        assert float(line["train_flops_ours"]) == pytest.approx(float(flops["flops/train_vs_dense"]), rel=1e-5)
        assert float(line["inference_flops_ours"]) == pytest.approx(float(flops["flops/inference_vs_dense"]), rel=1e-5)
    selfish_directory = runs["root"] / Path(runs["runs"]["selfish"][1].trainer.log_dir).parent
    test_ppl = float(runs["test"].trainer.callback_metrics["test_ppl"])
    assert float(unmatched[str(selfish_directory)]["test_ours"]) == pytest.approx(test_ppl, rel=1e-5)


def paper_config(config: dict) -> dict:
    """A tiny run's config with the settings it changed set back to those of its row's command."""
    paper = copy.deepcopy(config)
    paper["data"].update(corpus="ptb", batch_size=20)
    paper["model"]["network"]["init_args"].update(ninp=1500, nhid=1500)
    paper["trainer"]["max_epochs"] = 100
    return paper


def test_a_run_with_its_rows_settings_is_filed_under_the_row_unfinished(runs: dict, tmp_path: Path, capsys) -> None:
    """The Selfish-RNN (Adam) run's files, as if its config were the paper's: filed under the row, 2 of 100 epochs."""
    _, cli, _ = runs["runs"]["selfish"]
    run = runs["root"] / Path(cli.trainer.log_dir).parent
    copy_ = tmp_path / "logs" / "stacked_lstm_ptb" / run.name
    shutil.copytree(run, copy_)
    for config_path in copy_.glob("version_*/config.yaml"):
        config_path.write_text(yaml.safe_dump(paper_config(yaml.safe_load(config_path.read_text()))))
    lines = parse_csv(results(str(tmp_path / "logs"), "--format", "csv", capsys=capsys))
    filed = {(line["table"], line["row"]) for line in lines if line["table"]}
    assert filed == {("2", "Selfish-RNN (Adam)"), ("3", "Selfish-RNN (Adam)")}  # one cell, printed in two tables
    line = lines[0]
    assert line["runs"] == "1" and line["epochs_done"] == "2" and line["paper_epochs"] == "100"
    assert line["finished"] == "0"
    test_ppl = float(runs["test"].trainer.callback_metrics["test_ppl"])
    assert float(line["test_ours"]) == pytest.approx(test_ppl, rel=1e-5)
    assert float(line["test_diff"]) == pytest.approx(test_ppl - 82.85, abs=1e-4)
    text = results(str(tmp_path / "logs"), capsys=capsys)
    selfish = next(row for row in text.splitlines() if row.startswith("| stacked_lstm_ptb | Selfish-RNN (Adam) |"))
    cells = [cell.strip() for cell in selfish.strip("|").split("|")]
    assert cells[3].endswith("(unfinished)") and cells[9] == "2/100 unfinished" and cells[10] == "1"
    assert cells[5] == "85.70" and cells[6] == "82.85"
    assert cells[11].endswith("(0.33x)") and cells[12].endswith("(0.33x)")


def test_results_markdown_shows_the_rows_with_runs_and_explains_every_column(runs: dict, capsys) -> None:
    root = runs["root"] / "lightning_logs"
    text = results(str(root), capsys=capsys)
    assert "## Table" not in text and "No run is a cell of the paper's tables." in text
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns == [
        "run",
        "epochs done / planned",
        "best val",
        "test",
        "train FLOPs",
        "inference FLOPs",
        "nearest row",
        "settings that differ from it",
    ]
    assert "()" not in text
    for column in ("val (ours)", "test (ours)", "val / test (paper)", "epochs done", "runs", "train / inference"):
        assert f"- {column}" in text, column
    full = results(str(root), "--all", capsys=capsys)
    assert "## Table 2: stacked LSTM and RHN on Penn Treebank" in full and "## Table 6" in full and "## Table 8" in full
    assert "Dense (NT-ASGD) (quoted from Yang et al. (2018); its command reproduces the setup)" in full
    runs_found = collect_runs(root)
    assert len(runs_found) == len(METHODS) + 1, "the test of the Selfish-RNN run is read with its fit"


def test_results_of_a_missing_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert TOOL_COMMANDS["results"]([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (
        f"selfish-rnn results: error: {tmp_path / 'nowhere'} is not a directory (give the save_dir of the runs, "
        "e.g. lightning_logs)\n"
    )
    assert TOOL_COMMANDS["results"]([str(tmp_path)]) == 0
    assert "no run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# run folders that are a paper cell, or differ from one in one setting
# ------------------------------------------------------------------------------------------------------------

VOCAB = {"ptb": 10_000, "wikitext-2": 33_278}


@pytest.fixture(scope="module")
def command_configs() -> dict[str, dict]:
    """The ``config.yaml`` that ``selfish-rnn fit`` saves for a few rows' commands (built on the meta device)."""
    wanted = {
        "main": ("2", "stacked_lstm_ptb", "Selfish-RNN (SNT-ASGD)", 0.67),
        "dense": ("2", "stacked_lstm_ptb", "Dense (NT-ASGD)", None),
        "rhn": ("2", "rhn_ptb", "Selfish-RNN (SNT-ASGD)", 0.528),
        "onlstm": ("7", "onlstm_ptb", "Selfish-RNN1000 (ASGD)", 0.55),
    }
    configs = {}
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(LanguageModelingDataModule, "vocab_size", property(lambda self: VOCAB[self.corpus_name]))
        patch.chdir(CONFIG_DIR.parent.parent)
        for key, (table, model, label, sparsity) in wanted.items():
            row = next(
                r for r in PAPER_ROWS if (r.table, r.model, r.row, r.sparsity) == (table, model, label, sparsity)
            )
            with torch.device("meta"):
                cli = build_cli(args=row.command_args(), run=False)
            configs[key] = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))  # as SaveConfigCallback
    return configs


MAIN_CELL = {
    ("2", "Selfish-RNN (SNT-ASGD)", "0.67"),
    ("3", "Selfish-RNN (SNT-ASGD)", "0.67"),
    ("5", "Selfish-RNN", "0.67"),
    ("6", "Ours (joint ranking)", "0.67"),
}


def write_run(root: Path, name: str, config: dict, val: list[float] = (), test: float | None = None) -> Path:
    """A run folder as ``selfish-rnn fit`` leaves it: ``config.yaml`` and, with values, TensorBoard events."""
    version = root / name / "version_0"
    version.mkdir(parents=True)
    (version / "config.yaml").write_text(yaml.safe_dump(config))
    if val or test is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(version)) as writer:
            for epoch, value in enumerate(val):
                writer.add_scalar("val_ppl", value, epoch)
            if test is not None:
                writer.add_scalar("test_ppl", test, len(val))
    return root / name


def set_path(config: dict, path: str, value) -> dict:
    changed = copy.deepcopy(config)
    *parents, key = path.split(".")
    section = changed
    for part in parents:
        section = section[part]
    section[key] = value
    return changed


def filed(text: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The rows that have runs: (table, row, sparsity as printed) -> CSV line."""
    return {(line["table"], line["row"], line["sparsity"]): line for line in parse_csv(text) if line["table"]}


def unmatched_lines(text: str) -> list[dict[str, str]]:
    return [line for line in parse_csv(text) if not line["table"]]


def test_a_run_of_a_rows_command_is_filed_under_exactly_its_rows(command_configs, tmp_path: Path, capsys) -> None:
    val = [200.0 - epoch for epoch in range(100)]
    write_run(tmp_path, "main", command_configs["main"], val, test=70.0)
    rows = filed(results(str(tmp_path), "--format", "csv", capsys=capsys))
    assert set(rows) == MAIN_CELL
    line = rows[("2", "Selfish-RNN (SNT-ASGD)", "0.67")]
    assert line["epochs_done"] == "100" and line["finished"] == "1" and float(line["val_ours"]) == 101.0
    assert float(line["val_diff"]) == pytest.approx(101.0 - 73.76) and float(line["test_ours"]) == 70.0


# (dotted path in config.yaml, value): one setting the paper fixes for the main cell, changed
ONE_SETTING = [
    ("data.corpus", "wikitext-2"),
    ("data.batch_size", 64),
    ("data.eval_batch_size", 10),
    ("data.test_batch_size", 1),
    ("data.bptt", 70),
    ("data.variable_bptt", True),
    ("model.network.class_path", "lightning_selfish_recipes.models.RHN"),
    ("model.network.init_args.ninp", 700),
    ("model.network.init_args.nhid", 700),
    ("model.network.init_args.nlayers", 3),
    ("model.network.init_args.dropout", 0.0),
    ("model.sparsity.sparsity", 0.62),
    ("model.sparsity.sparsity", 0.5),
    ("model.sparsity", None),
    ("model.sparsity.method", "set"),
    ("model.sparsity.prune_rate", 0.3),
    ("model.sparsity.method", "static"),
    ("model.sparsity.gate_redistribution", False),
    ("model.sparsity.gate_redistribution", "magnitude"),
    ("model.sparsity.init", "er"),
    ("model.sparsity.removal", "set"),
    ("model.sparsity.growth", "gradient"),
    ("model.sparsity.update_every", 200),
    ("model.sparsity.min_prune_rate", 0.0),
    ("model.sparsity.total_steps", 1000),
    ("model.optimizer", "ntasgd"),
    ("model.optimizer", "adam"),
    ("model.lr", 1.0),
    ("model.weight_decay", 0.0),
    ("model.clip", 0.5),
    ("model.nonmono", 10),
    ("model.restart_at_epochs", [50]),
    ("trainer.max_epochs", 1),
    ("trainer.max_epochs", 300),
    ("trainer.max_steps", 1000),
    ("trainer.limit_train_batches", 100),
    ("trainer.limit_val_batches", 0.5),
    ("trainer.accumulate_grad_batches", 2),
    ("trainer.gradient_clip_val", 1.0),
    ("trainer.precision", "bf16-mixed"),
]
# the rows such a run is another cell of (keyed by the value as text)
ELSEWHERE = {
    ("model.sparsity.method", "static"): {("2", "Static-Uniform (SNT-ASGD)", "0.67")},
    ("model.sparsity.method", "set"): {("3", "SET (SNT-ASGD)", "0.67")},
    ("model.sparsity.sparsity", "0.62"): {("2", "Selfish-RNN (SNT-ASGD)", "0.62")},
    ("model.optimizer", "ntasgd"): {("5", "w/o Sparse NT-ASGD", "0.67")},
    ("model.sparsity.gate_redistribution", "False"): {("5", "w/o cell gate redistribution", "0.67")},
    ("model.sparsity.gate_redistribution", "magnitude"): {("6", "Mean of the magnitude of nonzero weights", "0.67")},
}


def test_a_run_that_differs_from_a_cell_in_one_setting_is_not_filed_under_it(
    command_configs, tmp_path: Path, capsys
) -> None:
    """One run folder per setting the paper fixes: none is filed under the main cell; each names its difference."""
    for k, (path, value) in enumerate(ONE_SETTING):
        config = set_path(command_configs["main"], path, value)
        if path == "data.bptt":
            config["model"]["bptt"] = value  # linked
        write_run(tmp_path / f"case{k}", "run", config)
    for k, (path, value) in enumerate(ONE_SETTING):
        text = results(str(tmp_path / f"case{k}"), "--format", "csv", capsys=capsys)
        rows = filed(text)
        assert not set(rows) & MAIN_CELL, (path, value)
        expected = ELSEWHERE.get((path, str(value)), set())
        assert set(rows) == expected, (path, value)
        if not expected:
            [line] = unmatched_lines(text)
            assert line["nearest_row"], (path, value)
            assert line["differences"], (path, value)


def test_the_issues_runs_are_filed_where_they_belong(command_configs, tmp_path: Path, capsys) -> None:
    main_config = command_configs["main"]
    smoke = set_path(main_config, "trainer.max_epochs", 1)
    write_run(tmp_path, "smoke", smoke, [300.0])
    sweep = set_path(set_path(main_config, "model.sparsity.growth", "gradient"), "model.sparsity.update_every", 200)
    write_run(tmp_path, "figure5", set_path(sweep, "model.sparsity.prune_rate", 0.3), [90.0, 89.0])
    wt2 = set_path(main_config, "data.corpus", "wikitext-2")
    wt2["model"]["network"]["init_args"].update(ninp=8, nhid=8)
    write_run(tmp_path, "wt2_8x8", wt2, [500.0])
    odd = set_path(set_path(main_config, "model.lr", 1.0), "data.batch_size", 64)
    odd["data"]["bptt"] = odd["model"]["bptt"] = 70
    odd["model"]["network"]["init_args"]["dropout"] = 0.0
    write_run(tmp_path, "odd", odd, [337.5])
    small = copy.deepcopy(command_configs["dense"])  # a dense 2 x 700 run under the model config's logger name
    small["model"]["network"]["init_args"].update(ninp=700, nhid=700)
    write_run(tmp_path, "dense700", small, [88.0])
    onlstm = set_path(command_configs["onlstm"], "trainer.max_epochs", 1300)  # one restart: neither row
    write_run(tmp_path, "onlstm1300", onlstm, [60.0])
    rhn = set_path(command_configs["rhn"], "model.sparsity.sparsity", 0.53)  # the paper's printed sparsity
    write_run(tmp_path, "rhn053", rhn, [64.0])

    text = results(str(tmp_path), "--format", "csv", capsys=capsys)
    rows = filed(text)
    by_directory = {
        Path(directory).name: key for key, line in rows.items() for directory in line["directories"].split(";")
    }
    assert set(by_directory) == {"dense700", "rhn053"}
    assert rows[("2", "Small Dense (NT-ASGD)", "")]["directories"].endswith("dense700")
    assert [key for key, line in rows.items() if line["directories"].endswith("rhn053")] == [
        ("2", "Selfish-RNN (SNT-ASGD)", "0.53"),
        ("5", "Selfish-RNN", "0.53"),
    ]
    assert rows[("5", "Selfish-RNN", "0.53")]["model"] == "rhn_ptb"
    unmatched = {Path(line["directories"]).name: line for line in unmatched_lines(text)}
    assert set(unmatched) == {"smoke", "figure5", "wt2_8x8", "odd", "onlstm1300"}
    assert unmatched["smoke"]["differences"] == "trainer.max_epochs 1 (cell: 100)"
    assert unmatched["smoke"]["epochs_done"] == "1" and unmatched["smoke"]["planned_epochs"] == "1"
    assert set(unmatched["figure5"]["differences"].split("; ")) == {
        "method.growth gradient (cell: random)",
        "method.prune_rate 0.3 (cell: 0.7)",
        "method.update_every 200 (cell: epoch)",
    }
    assert set(unmatched["odd"]["differences"].split("; ")) == {
        "data.batch_size 64 (cell: 20)",
        "data.bptt 70 (cell: 35)",
        "lr 1 (cell: 40)",
        "network.dropout 0 (cell: 0.65)",
    }
    # the 1000-epoch command (Table 5 prints it first; Table 7's 1300-epoch row is as near: its second restart)
    assert unmatched["onlstm1300"]["nearest_table"] == "5"
    assert unmatched["onlstm1300"]["nearest_row"] == "onlstm_ptb: Selfish-RNN, sparsity 0.55"
    assert unmatched["onlstm1300"]["differences"] == "trainer.max_epochs 1300 (cell: 1000)"


def test_unfinished_runs_are_marked_and_not_averaged_with_finished_ones(command_configs, tmp_path, capsys) -> None:
    config = command_configs["main"]
    write_run(tmp_path, "done_a", config, [100.0] * 99 + [74.0])
    write_run(tmp_path, "done_b", config, [100.0] * 99 + [76.0])
    write_run(tmp_path, "running", config, [90.0] * 37)
    rows = filed(results(str(tmp_path), "--format", "csv", capsys=capsys))
    line = rows[("2", "Selfish-RNN (SNT-ASGD)", "0.67")]
    assert line["runs"] == "3" and line["epochs_done"] == "100;100;37" and line["finished"] == "1;1;0"
    assert float(line["val_ours"]) == 75.0 and float(line["val_ours_std"]) == pytest.approx(2**0.5)
    text = results(str(tmp_path), capsys=capsys)
    row = next(r for r in text.splitlines() if r.startswith("| stacked_lstm_ptb | Selfish-RNN (SNT-ASGD) |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3] == "75.00 ± 1.41" and cells[9] == "100/100, 100/100, 37/100 unfinished"


def test_tensorboard_gets_no_placeholders_and_an_hparams_tab_by_perplexity(runs: dict) -> None:
    """No ``hp_metric`` (one point, -1), no ``_instantiator`` in the logged hyperparameters; HParams by perplexity."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, cli, _ = runs["runs"]["selfish"]
    version = runs["root"] / cli.trainer.log_dir
    accumulator = EventAccumulator(str(version))
    accumulator.Reload()
    assert "hp_metric" not in accumulator.Tags()["scalars"] and "val_ppl" in accumulator.Tags()["scalars"]
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert "_instantiator" not in hparams and hparams["sparsity"]["sparsity"] == 0.67
    checkpoint = torch.load(next((version / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert "_instantiator" in checkpoint["hyper_parameters"], "load_from_checkpoint still rebuilds the network"
    experiments = [
        plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).experiment
        for events in version.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(events)).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/experiment"
    ]
    assert len(experiments) == 1
    assert [metric.name.tag for metric in experiments[0].metric_infos] == ["val_ppl", "test_ppl"]
    names = {info.name for info in experiments[0].hparam_infos}
    assert {"lr", "optimizer", "corpus"} <= names and "_instantiator" not in names
    assert any(name.startswith("sparsity") for name in names)  # (the sparsity group, flattened)
