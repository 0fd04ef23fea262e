"""docs/experiments.md, lightning_selfish_recipes/tools/paper_results.py and the configs agree: every documented command
builds its row."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish_recipes.cli import build_cli
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.runs import run_label
from lightning_selfish_recipes.tools.matching import differences, paper_epochs, run_settings
from lightning_selfish_recipes.tools.paper_results import PAPER_ROWS, TABLES

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "experiments.md").read_text()
VOCAB = {"ptb": 10_000, "wikitext-2": 33_278}
TRAINED = [row for row in PAPER_ROWS if row.trained]
COMMANDS = sorted({row.command() for row in TRAINED})


@pytest.fixture(autouse=True)
def known_vocab(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip tokenising PTB / WikiText-2 (seconds each): only the vocabulary size is needed to build a model."""
    monkeypatch.setattr(
        LanguageModelingDataModule, "vocab_size", property(lambda self: VOCAB[self.corpus_name]), raising=True
    )
    monkeypatch.chdir(ROOT)  # the documented commands use paths relative to the repository root


def build(args: list[str]):
    with torch.device("meta"):  # the paper's sizes, without allocating them
        return build_cli(args=args, run=False)


def fit_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[:2] == ["selfish-rnn", "fit"], command
    return words[2:]


# ---------------------------------------------------------------------------------------------------- rows


def test_the_tables_are_complete() -> None:
    by_table = {table: [row for row in PAPER_ROWS if row.table == table] for table in TABLES}
    assert len(by_table["2"]) == 2 * (1 + 1 + 1 + 2 + 1 + 6 + 3 + 1 + 3)  # both models, both sparsity levels
    assert len(by_table["3"]) == 1 + 3 * 5 and len(by_table["5"]) == 4 * 3
    assert len(by_table["6"]) == 3 and len(by_table["7"]) == 10 and len(by_table["8"]) == 7
    quoted = {row.row for row in PAPER_ROWS if not row.trained}
    assert quoted == {"Dense*", "ISS*", "Dense"}, "only rows quoted from other papers lack a command"
    [yang] = [row for row in PAPER_ROWS if row.table == "8" and row.quoted]
    assert yang.row == "Dense (NT-ASGD)" and yang.quoted == "Yang et al. (2018)" and yang.trained
    assert {row.repeats for row in PAPER_ROWS if row.table == "7"} == {5}
    assert {row.repeats for row in PAPER_ROWS if row.table != "7"} == {1}
    with pytest.raises(ValueError, match="quoted"):
        next(row for row in PAPER_ROWS if not row.trained).command()


@pytest.fixture(scope="module")
def run_directories() -> dict[tuple[str, str], str]:
    """(logger name, run label) -> command, shared by the cases below: two commands must never share a directory."""
    return {}


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_every_row_command_trains_what_its_row_says(command: str, run_directories: dict) -> None:
    rows = [row for row in TRAINED if row.command() == command]
    cli = build(fit_arguments(command))
    settings = run_settings(cli.config.as_dict())
    # selfish-rnn results files a run of this command under exactly the rows of this command
    assert [row for row in TRAINED if not differences(row, settings)] == rows
    # the run directory of this composition (lightning_selfish_recipes.runs) is its own: --ckpt_path best/last find this
    # run only
    directory = (
        cli.config.trainer.logger.init_args.name,
        run_label(cli.config.model, cli.config.seed_everything),
    )
    assert run_directories.setdefault(directory, command) == command, f"two commands share {directory}"
    row = rows[0]
    model = cli.model
    assert isinstance(model, LanguageModel)
    assert model.optimizer_name == row.optimizer
    assert (model.sparsity and model.sparsity.sparsity) == row.sparsity
    assert cli.trainer.max_epochs == paper_epochs(row) == (1300 if "1300" in row.row else cli.trainer.max_epochs)
    assert model.restart_at_epochs == ([500, 1000] if "1300" in row.row else [500] if row.model == "onlstm_ptb" else [])
    if row.optimizer == "adam":
        assert model.lr == 0.001
    if row.model == "awd_lstm_mos_wt2":
        assert model.small_batch_size == 5 and cli.datamodule.batch_size == 15, "MoS trains as the paper did"
    if row.sparsity is None:
        assert not any(isinstance(cb, SelfishSparsityCallback) for cb in model.configure_callbacks())
        return
    arguments = model.sparsity_arguments()
    preset = {"no_redistribution": "selfish", "static_er": "static"}.get(row.method, row.method)
    if row.method.startswith("gates_"):  # Table 6: Selfish-RNN with another way of sharing regrowth over gates
        preset = "selfish"
        assert arguments["gate_redistribution"] == row.method.removeprefix("gates_")
    assert arguments["method"] == preset
    if row.method == "static_er":
        assert arguments["init"] == "er"
    if row.method == "no_redistribution":
        assert arguments["gate_redistribution"] is False
    callback = SelfishSparsityCallback(**arguments)
    assert callback.method == preset and callback.sparsity == row.sparsity


def test_every_documented_row_command_is_a_row() -> None:
    for row in TRAINED:
        assert f"`{row.command()}`" in DOC, f"docs/experiments.md lacks the command of {row.table}/{row.row}"
    for row in PAPER_ROWS:
        if not row.trained:
            assert f"quoted from {row.quoted}" in DOC
    documented = set(re.findall(r"`(selfish-rnn fit [^`]*)`", DOC))
    assert documented - set(COMMANDS) == set(), "a documented table command that belongs to no row"


# ---------------------------------------------------------------------------------------------------- sweeps


def sweep_commands() -> list[tuple[str, dict[str, str]]]:
    """Every ``selfish-rnn fit`` of the bash loops in docs/experiments.md, with the loops' first and last values."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", DOC, flags=re.S):
        if "for " not in block:
            continue
        assignments = dict(re.findall(r"^\s*([A-Za-z_]+)=(\S+)\s*$", block, flags=re.M))
        loops = re.findall(r"for (\w+) in ([^;]+); do", block)
        values = [(name, [v.split()[0], v.split()[-1]]) for name, v in loops]
        for line in block.splitlines():
            if "selfish-rnn fit" not in line:
                continue
            for combination in itertools.product(*[vals for _, vals in values]):
                env = {**assignments, **dict(zip([name for name, _ in values], combination))}
                command = re.sub(r"\$\{?(\w+)\}?", lambda m, env=env: env[m.group(1)], line.strip())
                found.append((command, env))
    return found


SWEEPS = sweep_commands()


def test_the_sweeps_are_documented() -> None:
    loops = " ".join(command for command, _ in SWEEPS)
    assert "--model.sparsity.update_every" in loops and "--model.sparsity.growth gradient" in loops  # Figure 5
    assert "--model.sparsity.sparsity 0.9" in loops and "--model.sparsity.prune_rate 0.3" in loops  # Figure 6
    assert "optimizers/momentum.yaml" in loops and "awd_lstm_mos_wt2.yaml" in loops


@pytest.mark.parametrize("sweep", SWEEPS, ids=range(len(SWEEPS)))
def test_every_sweep_command_builds_with_its_loop_values(sweep) -> None:
    command, env = sweep
    cli = build(fit_arguments(command))
    model = cli.model
    filed = [row for row in TRAINED if not differences(row, run_settings(cli.config.as_dict()))]
    if "growth" in env:  # Figure 5 runs update every N steps: no table cell (docs/experiments.md)
        assert filed == []
    for row in filed:  # a Figure 6 point at a model config's own sparsity and prune rate is that model's main cell
        assert row.method == "selfish" and row.optimizer == "sntasgd" and row.sparsity == model.sparsity.sparsity
    if "sparsity" in env:
        assert model.sparsity.sparsity == float(env["sparsity"])
    if "prune_rate" in env:
        assert model.sparsity.prune_rate == float(env["prune_rate"])
    if "growth" in env:
        assert model.sparsity.growth == env["growth"] and model.sparsity.update_every == int(env["interval"])
        assert model.optimizer_name == env["optimizer"]
