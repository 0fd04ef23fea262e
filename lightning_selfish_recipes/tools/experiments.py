"""The bundled experiments at a glance: ``selfish-rnn list`` and the overview ``selfish-rnn`` prints alone.

The rows, the paper's perplexities and the command of each experiment come from
:mod:`lightning_selfish_recipes.tools.paper_results` (model configs composed with method and optimizer overlays). Costs
are the estimates of docs/recipes.md ("What the runs cost") for one modern data-centre GPU, except the quickstart's,
which was measured on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from lightning_selfish_recipes.tools.matching import paper_epochs
from lightning_selfish_recipes.tools.paper_results import PAPER_ROWS, TABLES, PaperRow

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

__all__ = ["COSTS", "QUICKSTART", "cost", "list_command", "overview", "table"]

COSTS: dict[str, tuple[int, float, float]] = {
    "stacked_lstm_ptb": (100, 1, 2),
    "rhn_ptb": (500, 12, 20),
    "onlstm_ptb": (1000, 24, 24),
    "awd_lstm_mos_wt2": (1000, 36, 72),
}
"""Estimated GPU hours (low, high) of a full run of each model's config, and its epochs (docs/recipes.md); a row
with more epochs costs proportionally more, small-dense runs cost less."""

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


def _hours(low: float, high: float) -> str:
    if high < 48:
        low, high = float(f"{low:.2g}"), float(f"{high:.2g}")
        return f"~{low:g} h" if low == high else f"~{low:g}-{high:g} h"
    low, high = round(low / 24, 1), round(high / 24, 1)
    return f"~{low:g} days" if low == high else f"~{low:g}-{high:g} days"


def cost(row: PaperRow) -> str:
    """What the row costs on one GPU: its epochs, the estimated time of one run, and of the paper's repeats."""
    epochs = paper_epochs(row)
    base_epochs, low, high = COSTS[row.model]
    scale = epochs / base_epochs
    text = f"{epochs} epochs, GPU {_hours(low * scale, high * scale)}"
    if row.repeats > 1:
        text += f" per run; x{row.repeats} runs: {_hours(low * scale * row.repeats, high * scale * row.repeats)}"
    return text


def table(rows: list[PaperRow] = PAPER_ROWS) -> str:
    """The trained rows of the paper's tables: what, paper perplexities, cost, and the command of each."""
    lines: list[str] = []
    for key, title in TABLES.items():
        chosen = [row for row in rows if row.table == key and row.trained]
        if not chosen:
            continue
        lines.append(title)
        width = max(len(row.label) for row in chosen)
        for row in chosen:
            lines.append(f"  {row.label:<{width}}  paper val/test {_perplexities(row):<17}  {cost(row)}")
            if row.quoted:
                lines.append(f"      (the paper quotes this row from {row.quoted}; the command reproduces its setup)")
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
        "do not reach the paper's numbers; costs are estimates for one GPU (docs/recipes.md), except the\n"
        "quickstart's. Table 7 reports the mean of five runs of each command (seeds 1 to 5, say).\n"
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
  --model.sparsity.sparsity S   fraction of every sparsified weight that is zero, in (0, 1)
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
