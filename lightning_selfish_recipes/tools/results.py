"""``selfish-rnn results DIR``: the runs found under DIR, each filed under the cells of the paper's tables it is.

Every run of ``selfish-rnn`` leaves a version directory with its ``config.yaml`` and its TensorBoard event files
(``<save_dir>/<name>/<label>/version_N``, see :mod:`lightning_selfish_recipes.runs`). A ``fit``, its resumptions and the
``test`` of its best checkpoint are version directories of the same run directory (``<label>``): this command reads them
together. A run belongs to a row of the paper's tables (:mod:`lightning_selfish_recipes.tools.paper_results`) only when
every setting the paper fixes for that cell agrees (:mod:`lightning_selfish_recipes.tools.matching`: corpus, network and
its sizes, method and its parts, optimizer and its settings, BPTT, batch sizes, dropouts, epochs planned, restarts,
sparsity to the paper's printed precision). Several runs of one row (seeds, save directories) are averaged and counted.
Runs that match no row are listed apart, with the nearest row and the settings that differ from it.

Shown by default: the rows that have a run, then the runs that match none; ``--all`` shows every row of the
paper's tables. Per row: our best validation perplexity (the checkpoint the paper reports) and the test perplexity
of ``selfish-rnn test --ckpt_path best``, the paper's, the differences, the epochs done out of the paper's (an
unfinished run is marked, and not averaged with finished ones), the runs (of the paper's repeats), and the training
and inference FLOPs relative to dense (Table 9's in parentheses). Markdown by default, CSV with ``--format csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_selfish_recipes.tools.matching import Difference, differences, paper_epochs, run_settings, with_defaults
from lightning_selfish_recipes.tools.paper_results import PAPER_ROWS, TABLES, PaperRow

__all__ = ["Line", "RunResult", "Unmatched", "collect_runs", "main", "match", "render_csv", "render_markdown"]

log = logging.getLogger(__name__)

SCALARS = ("val_ppl", "test_ppl", "flops/train_vs_dense", "flops/inference_vs_dense")


@dataclass
class RunResult:
    """One run directory: the settings of its ``fit`` and what its event files say."""

    directory: Path
    settings: (
        dict[str, Any] | None
    )  # lightning_selfish_recipes.tools.matching.run_settings of its fit config; None: no readable config
    planned_epochs: int | None  # the run's own --trainer.max_epochs
    best_val_ppl: float | None = None
    test_ppl: float | None = None
    epochs_done: int = 0
    train_flops: float | None = None
    inference_flops: float | None = None
    versions: list[Path] = field(default_factory=list)


def collect_runs(root: Path) -> list[RunResult]:
    """Every run directory under ``root`` (a directory holding ``version_*`` directories with a ``config.yaml``)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (give the save_dir of the runs, e.g. lightning_logs)")
    versions = sorted(path.parent for path in root.rglob("config.yaml"))
    families: dict[Path, list[Path]] = defaultdict(list)
    for version in versions:
        families[version.parent if version.name.startswith("version_") else version].append(version)
    return [_read_run(directory, members) for directory, members in sorted(families.items())]


def _read_run(directory: Path, versions: list[Path]) -> RunResult:
    settings, planned = None, None
    val: dict[int, float] = {}
    test: list[tuple[float, float]] = []  # (wall time, value)
    flops: dict[str, tuple[float, float]] = {}
    for version in versions:
        try:
            config = yaml.safe_load((version / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            log.warning("results: skipping %s: unreadable config.yaml (%s)", version, error)
            continue
        if settings is None or _is_fit(config):  # the latest fit (a resumption may plan more epochs)
            settings = run_settings(with_defaults(config))
            planned = (config.get("trainer") or {}).get("max_epochs")
        for tag, events in _scalars(version).items():
            if tag == "val_ppl":
                # one value per validation; a resumed run may repeat a step: the later run wins
                for _, step, value in sorted(events):
                    val[step] = value
            elif tag == "test_ppl":
                test.extend((wall, value) for wall, _, value in events)
            else:
                wall, _, value = max(events)
                if tag not in flops or wall >= flops[tag][0]:
                    flops[tag] = (wall, value)
    return RunResult(
        directory=directory,
        settings=settings,
        planned_epochs=planned,
        best_val_ppl=min(val.values()) if val else None,
        test_ppl=max(test)[1] if test else None,
        epochs_done=len(val),
        train_flops=flops.get("flops/train_vs_dense", (0, None))[1],
        inference_flops=flops.get("flops/inference_vs_dense", (0, None))[1],
        versions=versions,
    )


def _is_fit(config: dict[str, Any]) -> bool:
    return config.get("ckpt_path") in (None, "last") and (config.get("trainer") or {}).get("max_epochs") is not None


def _scalars(version: Path) -> dict[str, list[tuple[float, int, float]]]:
    """The scalars of :data:`SCALARS` in the event files of one version directory: (wall time, step, value)."""
    if not any(version.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags().get("scalars", []))
    return {
        tag: [(e.wall_time, e.step, float(e.value)) for e in accumulator.Scalars(tag)]
        for tag in SCALARS
        if tag in available
    }


# ------------------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One row of the paper's tables and the runs filed under it."""

    row: PaperRow
    runs: list[RunResult]

    def finished(self, run: RunResult) -> bool:
        return run.epochs_done >= paper_epochs(self.row)

    def counted(self) -> list[RunResult]:
        """The runs whose numbers are shown: the finished ones, or, while none has finished, the unfinished ones."""
        done = [run for run in self.runs if self.finished(run)]
        return done or self.runs

    @property
    def unfinished_only(self) -> bool:
        return bool(self.runs) and not any(self.finished(run) for run in self.runs)

    def values(self, attribute: str) -> list[float]:
        return [getattr(run, attribute) for run in self.counted() if getattr(run, attribute) is not None]

    def ours(self, attribute: str) -> float | None:
        values = self.values(attribute)
        return sum(values) / len(values) if values else None

    def std(self, attribute: str) -> float | None:
        values = self.values(attribute)
        return statistics.stdev(values) if len(values) > 1 else None

    def epochs(self) -> str:
        if not self.runs:
            return ""
        total = paper_epochs(self.row)
        return ", ".join(
            f"{run.epochs_done}/{total}" + ("" if self.finished(run) else " unfinished") for run in self.runs
        )

    def run_count(self) -> str:
        if not self.row.trained:
            return ""
        return f"{len(self.runs)} of {self.row.repeats}" if self.row.repeats > 1 else str(len(self.runs))


@dataclass
class Unmatched:
    """A run that is no cell of the paper: the nearest row (fewest differing settings) and how it differs."""

    run: RunResult
    nearest: PaperRow | None
    differences: list[Difference]


def match(runs: Sequence[RunResult], rows: Sequence[PaperRow] = PAPER_ROWS) -> tuple[list[Line], list[Unmatched]]:
    """File every run under each row whose settings it has (a cell printed in several tables is several rows)."""
    trained = [row for row in rows if row.trained]
    lines = {id(row): Line(row, []) for row in rows}
    unmatched = []
    for run in runs:
        if run.settings is None:
            unmatched.append(Unmatched(run, None, []))
            continue
        found = [
            (len(diff), k, row, diff) for k, row in enumerate(trained) for diff in [differences(row, run.settings)]
        ]
        exact = [row for n, _, row, _ in found if n == 0]
        for row in exact:
            lines[id(row)].runs.append(run)
        if not exact:
            nearest = min(found, key=lambda item: item[:2], default=None)
            unmatched.append(Unmatched(run, nearest[2] if nearest else None, nearest[3] if nearest else []))
    return [lines[id(row)] for row in rows], unmatched


# ------------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _ours(line: Line, attribute: str) -> str:
    value, std = line.ours(attribute), line.std(attribute)
    if value is None:
        return "—"
    text = f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (" (unfinished)" if line.unfinished_only else "")


def _delta(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return "—"
    return f"{ours - paper:+.2f}"


def _paper(value: float | None, std: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _flops(ours: float | None, paper: float | None) -> str:
    text = f"{ours:.2f}x" if ours is not None else "—"
    return text + (f" ({paper:.2f}x)" if paper is not None else "")


def _sparsity(row: PaperRow) -> str:
    return "dense" if row.printed_sparsity is None else f"{row.printed_sparsity:g}"


def _row_name(row: PaperRow) -> str:
    if row.quoted is None:
        return row.row
    if row.reproduces_quote:
        return f"{row.row} (quoted from {row.quoted}; its command reproduces the setup)"
    return f"{row.row} (quoted from {row.quoted}; not trained here)"


HEADER = (
    "model",
    "row",
    "sparsity",
    "val (ours)",
    "test (ours)",
    "val (paper)",
    "test (paper)",
    "Δ val",
    "Δ test",
    "epochs done",
    "runs",
    "train FLOPs",
    "inference FLOPs",
)

COLUMNS = """Columns:
- val (ours): the best validation perplexity of the run (the checkpoint the paper reports); the mean ± std over the
  runs of a row when it has several (seeds, save directories).
- test (ours): test_ppl of `selfish-rnn test ... --ckpt_path best` (— until it is run).
- val / test (paper): the paper's (± std over five runs in Table 7); Δ: ours minus the paper's.
- epochs done: per run, validated epochs out of the paper's; an unfinished run is marked, and counted only while
  no run of its row has finished ("(unfinished)" next to the numbers then).
- runs: runs filed under the row (Table 7: of the paper's five).
- train / inference FLOPs: flops/train_vs_dense (the whole run so far) and flops/inference_vs_dense (the current
  masks), relative to dense; Table 9's in parentheses.
A run is filed under a row only when every setting of the row's command agrees (docs/experiments.md).
"""

UNMATCHED_HEADER = (
    "run",
    "epochs done / planned",
    "best val",
    "test",
    "train FLOPs",
    "inference FLOPs",
    "nearest row",
    "settings that differ from it",
)


def _unmatched_cells(item: Unmatched) -> list[str]:
    run = item.run
    if item.nearest is None:
        nearest, differ = "—", "no readable config.yaml" if run.settings is None else "—"
    else:
        nearest = f"Table {item.nearest.table}: {item.nearest.label}"
        differ = "; ".join(str(d) for d in item.differences)
    planned = "?" if run.planned_epochs is None else str(run.planned_epochs)
    return [
        str(run.directory),
        f"{run.epochs_done}/{planned}",
        _fmt(run.best_val_ppl),
        _fmt(run.test_ppl),
        _flops(run.train_flops, None),
        _flops(run.inference_flops, None),
        nearest,
        differ,
    ]


def _cells(line: Line) -> list[str]:
    row = line.row
    val, test = line.ours("best_val_ppl"), line.ours("test_ppl")
    return [
        row.model,
        _row_name(row),
        _sparsity(row),
        _ours(line, "best_val_ppl"),
        _ours(line, "test_ppl"),
        _paper(row.val, row.val_std),
        _paper(row.test, row.test_std),
        _delta(val, row.val),
        _delta(test, row.test),
        line.epochs(),
        line.run_count(),
        _flops(line.ours("train_flops"), row.train_flops),
        _flops(line.ours("inference_flops"), row.test_flops),
    ]


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n\n"


def render_markdown(lines: Iterable[Line], unmatched: Sequence[Unmatched], tables: Sequence[str] | None = None) -> str:
    """The tables as GitHub markdown, one section per table of the paper, then the runs that match no row."""
    lines = list(lines)
    out = io.StringIO()
    for table, title in TABLES.items():
        chosen = [line for line in lines if line.row.table == table]
        if (tables and table not in tables) or not chosen:
            continue
        out.write(f"## {title}\n\n")
        out.write(_markdown_table(HEADER, (_cells(line) for line in chosen)))
        notes = [line.row for line in chosen if line.row.note]
        for row in notes:
            out.write(f"- {row.label}: {row.note}\n")
        if notes:
            out.write("\n")
    if not any(line.runs for line in lines):
        out.write("No run is a cell of the paper's tables.\n\n")
    if unmatched:
        out.write("## Runs that match no row of the paper\n\n")
        out.write(_markdown_table(UNMATCHED_HEADER, (_unmatched_cells(item) for item in unmatched)))
    out.write(COLUMNS)
    return out.getvalue()


CSV_FIELDS = (
    "table",
    "model",
    "row",
    "method",
    "optimizer",
    "sparsity",
    "runs",
    "repeats",
    "val_ours",
    "val_ours_std",
    "test_ours",
    "test_ours_std",
    "val_paper",
    "test_paper",
    "val_diff",
    "test_diff",
    "epochs_done",
    "paper_epochs",
    "planned_epochs",
    "finished",
    "train_flops_ours",
    "inference_flops_ours",
    "train_flops_paper",
    "inference_flops_paper",
    "quoted_from",
    "note",
    "directories",
    "nearest_table",
    "nearest_row",
    "differences",
)


def render_csv(lines: Iterable[Line], unmatched: Sequence[Unmatched], tables: Sequence[str] | None = None) -> str:
    """One CSV line per paper row (and per unmatched run), numbers unformatted; per-run fields joined by ``;``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        row = line.row
        if tables and row.table not in tables:
            continue
        val, test = line.ours("best_val_ppl"), line.ours("test_ppl")
        writer.writerow(
            {
                "table": row.table,
                "model": row.model,
                "row": row.row,
                "method": row.method,
                "optimizer": row.optimizer,
                "sparsity": "" if row.printed_sparsity is None else row.printed_sparsity,
                "runs": len(line.runs),
                "repeats": row.repeats,
                "val_ours": _raw(val),
                "val_ours_std": _raw(line.std("best_val_ppl")),
                "test_ours": _raw(test),
                "test_ours_std": _raw(line.std("test_ppl")),
                "val_paper": _raw(row.val),
                "test_paper": _raw(row.test),
                "val_diff": _raw(None if val is None or row.val is None else val - row.val),
                "test_diff": _raw(None if test is None or row.test is None else test - row.test),
                "epochs_done": ";".join(str(run.epochs_done) for run in line.runs),
                "paper_epochs": paper_epochs(row) if row.trained else "",
                "planned_epochs": ";".join(str(run.planned_epochs) for run in line.runs),
                "finished": ";".join(str(int(line.finished(run))) for run in line.runs),
                "train_flops_ours": _raw(line.ours("train_flops")),
                "inference_flops_ours": _raw(line.ours("inference_flops")),
                "train_flops_paper": _raw(row.train_flops),
                "inference_flops_paper": _raw(row.test_flops),
                "quoted_from": row.quoted or "",
                "note": row.note,
                "directories": ";".join(str(run.directory) for run in line.runs),
            }
        )
    for item in unmatched:
        run = item.run
        writer.writerow(
            {
                "runs": 1,
                "val_ours": _raw(run.best_val_ppl),
                "test_ours": _raw(run.test_ppl),
                "epochs_done": run.epochs_done,
                "planned_epochs": "" if run.planned_epochs is None else run.planned_epochs,
                "train_flops_ours": _raw(run.train_flops),
                "inference_flops_ours": _raw(run.inference_flops),
                "directories": str(run.directory),
                "nearest_table": item.nearest.table if item.nearest else "",
                "nearest_row": item.nearest.label if item.nearest else "",
                "differences": "; ".join(str(d) for d in item.differences),
            }
        )
    return out.getvalue()


def _raw(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def main(argv: Sequence[str]) -> int:
    """Fill the paper's tables in with the runs under a directory: ours, the paper's, the differences."""
    parser = argparse.ArgumentParser(
        prog="selfish-rnn results",
        description=(
            f"Collect the runs under DIR and file each under the rows of the paper's tables "
            f"({', '.join(TABLES)}; Table 9's FLOPs on Table 2) whose every setting it has: our perplexities, the "
            "paper's, the differences, the epochs done and the FLOPs. Runs that match no row are listed with the "
            "settings that differ from the nearest one."
        ),
    )
    parser.add_argument("directory", type=Path, help="where the runs are (the loggers' save_dir, e.g. lightning_logs)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="output format")
    parser.add_argument("--table", action="append", choices=list(TABLES), help="only these tables (repeatable)")
    parser.add_argument(
        "--all", action="store_true", help="every row of the paper's tables, not only the rows that have a run"
    )
    args = parser.parse_args(list(argv))
    try:
        runs = collect_runs(args.directory)
    except FileNotFoundError as error:
        print(f"selfish-rnn results: error: {error}", file=sys.stderr)
        return 2
    lines, unmatched = match(runs)
    if not args.all:
        lines = [line for line in lines if line.runs]
    render = render_csv if args.format == "csv" else render_markdown
    sys.stdout.write(render(lines, unmatched, args.table))
    if not runs:
        print(f"selfish-rnn results: no run (no config.yaml) under {args.directory}", file=sys.stderr)
    return 0
