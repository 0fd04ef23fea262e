"""The bundled experiments at a glance: ``selfish-rnn list`` and the overview ``selfish-rnn`` prints alone.

The rows, the paper's perplexities and the command of each experiment come from :mod:`recipes.paper_results`
(model configs composed with method and optimizer overlays). Costs are the estimates of docs/recipes.md ("What the
runs cost") for one modern data-centre GPU, except the quickstart's, which was measured on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from recipes.paper_results import PAPER_ROWS, TABLES, PaperRow

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

__all__ = ["COSTS", "QUICKSTART", "list_command", "overview", "table"]

COSTS: dict[str, str] = {
    "stacked_lstm_ptb": "100 epochs, GPU ~1-2 h",
    "rhn_ptb": "500 epochs, GPU ~12-20 h",
    "onlstm_ptb": "1000 epochs, GPU ~1 day",
    "awd_lstm_mos_wt2": "1000 epochs, GPU ~1.5-3 days",
}
"""Estimated cost of a full run of each model (docs/recipes.md); small-dense and short runs cost less."""

QUICKSTART = (
    "quickstart: 2 x 200 LSTM, sparsity 0.5, Adam, 1 epoch of PTB; validation perplexity ~196-200; "
    "3-4 min on 2 idle CPU cores"
)


def _perplexities(row: PaperRow) -> str:
    def fmt(value: float | None, std: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" + (f"±{std:.2f}" if std is not None else "")

    return f"{fmt(row.val, row.val_std)} / {fmt(row.test, row.test_std)}"


def _cost(row: PaperRow) -> str:
    cost = COSTS[row.model]
    if row.epochs is not None:
        cost = f"{row.epochs} epochs" + cost[cost.index(",") :] + " (longer)"
    return cost


def table(rows: list[PaperRow] = PAPER_ROWS) -> str:
    """The trained rows of the paper's tables: what, paper perplexities, cost, and the command of each."""
    lines: list[str] = []
    for key, title in TABLES.items():
        chosen = [row for row in rows if row.table == key and row.trained]
        if not chosen:
            continue
        lines.append(title)
        width = max(len(f"{row.model}: {row.row}") for row in chosen)
        for row in chosen:
            name = f"{row.model}: {row.row}"
            lines.append(f"  {name:<{width}}  paper val/test {_perplexities(row):<17}  {_cost(row)}")
            lines.append(f"      {row.command()}")
        lines.append("")
    return "\n".join(lines)


def list_command(argv: list[str]) -> int:
    """List the bundled experiments: the paper's perplexities, what each run costs, and its command."""
    parser = argparse.ArgumentParser(prog="selfish-rnn list", description=list_command.__doc__)
    parser.add_argument("--table", choices=sorted(TABLES), help="only this table of the paper")
    parser.add_argument("--model", choices=sorted(COSTS), help="only this model")
    args = parser.parse_args(argv)
    rows = [r for r in PAPER_ROWS if (args.table in (None, r.table)) and (args.model in (None, r.model))]
    text = f"{QUICKSTART}\n  selfish-rnn fit --config {CONFIG_DIR / 'quickstart.yaml'}\n\n" + table(rows)
    text += (
        f"Configs are in {CONFIG_DIR} (run the commands from the repository root, or use that path). Short runs\n"
        "do not reach the paper's numbers; costs are estimates (docs/recipes.md), except the quickstart's.\n"
        "selfish-rnn results fills these tables in from finished runs.\n"
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
  --model.sparsity.sparsity S   fraction of every sparsified weight that is zero, in [0, 1)
  --model.sparsity null         train dense (no sparsity callback)
  --model.sparsity.method NAME  selfish (default), static, set, dsr, snfs, rigl or gmp
  --model.sparsity.prune_rate P initial fraction of active weights replaced at each topology update
  --model.sparsity.gate_redistribution false   every gate keeps its own count (the paper's ablation)
  --model.sparsity.help         every argument of the sparsity callback (SelfishSparsityCallback)
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
