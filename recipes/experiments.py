"""The bundled experiments at a glance: ``selfish-rnn list`` and the overview ``selfish-rnn`` prints alone.

Paper numbers are validation / test perplexity from the paper (Table 2, Tables 5, 7 and 8, ALGORITHM.md section 5);
costs are the estimates of docs/recipes.md ("What the runs cost") for one modern data-centre GPU, except the
quickstart, which was measured on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

__all__ = ["EXPERIMENTS", "Experiment", "list_command", "overview"]


class Experiment(NamedTuple):
    config: str  # file name in recipes/configs without .yaml
    what: str
    paper: str  # validation / test perplexity, or "-" when the paper gives none
    cost: str


_COST = {
    "stacked_lstm_ptb": "100 epochs, GPU ~1-2 h",
    "rhn_ptb": "500 epochs, GPU ~12-20 h",
    "onlstm_ptb": "1000 epochs, GPU ~1 day",
    "awd_lstm_mos_wt2": "1000 epochs, GPU ~1.5-3 days",
}


def _family(base: str, rows: list[tuple[str, str, str]]) -> list[Experiment]:
    return [Experiment(base + suffix, what, paper, _COST[base]) for suffix, what, paper in rows]


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("quickstart", "2 x 200 LSTM, sparsity 0.5, Adam, 1 epoch of PTB", "val ~196", "CPU ~4 min (2 cores)"),
    *_family(
        "stacked_lstm_ptb",
        [
            ("", "stacked LSTM, Selfish-RNN, sparsity 0.67", "73.76 / 71.65"),
            ("_dense", "dense, NT-ASGD", "74.51 / 72.40"),
            ("_adam", "Selfish-RNN with Adam", "85.70 / 82.85"),
            ("_momentum", "Selfish-RNN with momentum SGD", "82.48 / 79.69"),
            ("_no_redistribution", "ablation: no cell-gate redistribution", "- / 72.89"),
            ("_standard_ntasgd", "ablation: standard NT-ASGD", "- / 73.74"),
            ("_static", "static sparse", "80.37 / 78.61"),
            ("_small_dense", "dense 2 x 700, same parameter count", "88.67 / 86.33"),
        ],
    ),
    *_family(
        "rhn_ptb",
        [
            ("", "RHN, Selfish-RNN, sparsity 0.528", "62.10 / 60.35"),
            ("_dense", "dense, NT-ASGD", "63.44 / 61.84"),
            ("_adam", "Selfish-RNN with Adam", "63.28 / 60.75"),
            ("_no_redistribution", "ablation: no cell-gate redistribution", "- / 60.26"),
            ("_standard_ntasgd", "ablation: standard NT-ASGD", "- / 69.70"),
            ("_static", "static sparse", "74.11 / 71.83"),
            ("_small_dense", "dense, width 518, same parameter count", "70.10 / 68.40"),
        ],
    ),
    *_family(
        "onlstm_ptb",
        [
            ("", "ON-LSTM, Selfish-RNN, sparsity 0.55", "58.17 / 56.31"),
            ("_dense", "dense, NT-ASGD", "58.29 / 56.17"),
            ("_adam", "Selfish-RNN with Adam", "-"),
            ("_no_redistribution", "ablation: no cell-gate redistribution", "- / 57.48"),
            ("_standard_ntasgd", "ablation: standard NT-ASGD", "- / 69.28"),
            ("_static", "static sparse", "-"),
            ("_small_dense", "dense, hidden 610, same parameter count", "-"),
        ],
    ),
    *_family(
        "awd_lstm_mos_wt2",
        [
            ("", "AWD-LSTM-MoS on WikiText-2, Selfish-RNN, sparsity 0.55", "65.96 / 63.05"),
            ("_dense", "dense, NT-ASGD", "66.01 / 63.33"),
            ("_adam", "Selfish-RNN with Adam", "-"),
            ("_no_redistribution", "ablation: no cell-gate redistribution", "- / 65.27"),
            ("_standard_ntasgd", "ablation: standard NT-ASGD", "- / 71.65"),
            ("_static", "static sparse", "-"),
        ],
    ),
)
"""Every config in recipes/configs, in the order of docs/recipes.md."""


def table(experiments: tuple[Experiment, ...] = EXPERIMENTS) -> str:
    """The experiments as a plain-text table."""
    header = Experiment("config", "what", "paper val / test ppl", "cost")
    rows = [header, *experiments]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n"


def list_command(argv: list[str]) -> int:
    """List the bundled experiments with the paper's perplexities and what each run costs."""
    parser = argparse.ArgumentParser(prog="selfish-rnn list", description=list_command.__doc__)
    parser.parse_args(argv)
    text = table()
    text += (
        f"\nconfigs: {CONFIG_DIR}\n"
        f"run one: selfish-rnn fit --config {CONFIG_DIR / 'stacked_lstm_ptb.yaml'}\n"
        "Short runs do not reach the paper's numbers; costs are estimates (docs/recipes.md), except the\n"
        "quickstart's (measured).\n"
    )
    sys.stdout.write(text)
    return 0


def overview(tool_commands: Mapping[str, Callable[[list[str]], int]]) -> str:
    """The short help ``selfish-rnn`` prints without arguments (or with only ``--help``)."""
    tools = "".join(
        f"  selfish-rnn {name:<8} {(command.__doc__ or '').strip().splitlines()[0] if command.__doc__ else ''}\n"
        for name, command in tool_commands.items()
    )
    return f"""selfish-rnn: train the RNN language models of "Selfish Sparse RNN Training" (ICML 2021) dense or sparse
from scratch, with PyTorch Lightning.

  selfish-rnn fit  --config CONFIG [--ARGUMENT VALUE ...]    train (and validate every epoch)
  selfish-rnn test --config CONFIG --ckpt_path best          test perplexity of a run's best checkpoint
  selfish-rnn fit  --config CONFIG --ckpt_path last          resume a run where it stopped
  selfish-rnn fit  --help                                    every argument (model, data, trainer)
{tools}
Start here:  selfish-rnn fit --config {CONFIG_DIR / "quickstart.yaml"}
Configs:     {CONFIG_DIR}

The project's arguments (all of them in 'selfish-rnn fit --help'):
  --model.sparsity S            fraction of every sparsified weight that is zero, in [0, 1); null trains dense
  --model.prune_rate P          initial fraction of active weights replaced at each topology update
  --model.static true           keep the initial masks (static sparse training)
  --model.gate_redistribution false   every gate keeps its own count (the paper's ablation)
  --model.optimizer NAME        sntasgd (default), ntasgd, sgd, momentum or adam
  --model.lr LR                 learning rate
  --data.corpus NAME            ptb or wikitext-2 (bundled), or your own with --data.data_dir DIR
  --data.batch_size N, --data.bptt N
  --trainer.max_epochs N        e.g. 1 for a first look; the paper's runs are long (selfish-rnn list)
  --ckpt_path best|last|FILE    test or resume; best and last are found in the newest run of the same config
  --continue_log_version false  log a resumed run to a new TensorBoard version instead of its own
  --debug                       show the traceback of an error

Curves: tensorboard --logdir lightning_logs. Docs: docs/recipes.md.
Set SELFISH_RNN_LIGHTNING=lightning to run on the unified 'lightning' package instead of 'pytorch_lightning'.
"""
