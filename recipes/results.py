"""``selfish-rnn results DIR``: the paper's tables filled in with the runs found under DIR.

Every run of ``selfish-rnn`` leaves a version directory with its ``config.yaml`` and its TensorBoard event files
(``<save_dir>/<name>/<label>/version_N``, see :mod:`recipes.runs`). A ``fit``, its resumptions and the ``test``
of its best checkpoint are version directories of the same run directory (``<label>``): this command reads them
together. A run is matched to the rows of the paper's tables (:mod:`recipes.paper_results`) by what its config
trains: the model, the method, the optimizer, the sparsity and the number of epochs. Several runs of one row (seeds,
or save directories) are averaged and counted.

Reported per row: our best validation perplexity (the checkpoint the paper reports) and the test perplexity of
``selfish-rnn test --ckpt_path best``, the paper's, the differences, the epochs done out of the run's total (a
running run shows its progress), and the training and inference FLOPs relative to dense
(``flops/train_vs_dense``, ``flops/inference_vs_dense``; Table 9's in parentheses). Markdown by default, CSV with
``--format csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipes.paper_results import PAPER_ROWS, TABLES, PaperRow, signature_of_config

__all__ = ["RunResult", "collect_runs", "main", "render_csv", "render_markdown"]

log = logging.getLogger(__name__)

SCALARS = ("val_ppl", "test_ppl", "flops/train_vs_dense", "flops/inference_vs_dense")


@dataclass
class RunResult:
    """One run directory: its signature and what its event files say."""

    directory: Path
    signature: tuple[Any, ...] | None
    max_epochs: int | None
    best_val_ppl: float | None = None
    test_ppl: float | None = None
    epochs_done: int = 0
    train_flops: float | None = None
    inference_flops: float | None = None
    versions: list[Path] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.max_epochs is not None and self.epochs_done >= self.max_epochs


def collect_runs(root: Path) -> list[RunResult]:
    """Every run directory under ``root`` (a directory holding ``version_*`` directories with a ``config.yaml``)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"results: {root} is not a directory (give the save_dir of the runs, e.g. lightning_logs)"
        )
    versions = sorted(path.parent for path in root.rglob("config.yaml"))
    families: dict[Path, list[Path]] = defaultdict(list)
    for version in versions:
        families[version.parent if version.name.startswith("version_") else version].append(version)
    return [_read_run(directory, members) for directory, members in sorted(families.items())]


def _read_run(directory: Path, versions: list[Path]) -> RunResult:
    signature, max_epochs = None, None
    val: dict[int, float] = {}
    test: list[tuple[float, float]] = []  # (wall time, value)
    flops: dict[str, tuple[float, float]] = {}
    for version in versions:
        try:
            config = yaml.safe_load((version / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            log.warning("results: skipping %s: unreadable config.yaml (%s)", version, error)
            continue
        found = signature_of_config(config)
        if found is not None and (signature is None or _is_fit(config)):
            signature = found
            max_epochs = (config.get("trainer") or {}).get("max_epochs")
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
    best = min(val.values()) if val else None
    return RunResult(
        directory=directory,
        signature=signature,
        max_epochs=max_epochs,
        best_val_ppl=best,
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
# matching and rendering
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One table line: a paper row (or None for a run that matches none) and the runs that match it."""

    row: PaperRow | None
    runs: list[RunResult]

    def ours(self, attribute: str) -> float | None:
        values = [getattr(run, attribute) for run in self.runs if getattr(run, attribute) is not None]
        return sum(values) / len(values) if values else None

    def epochs(self) -> str:
        if not self.runs:
            return ""
        return ", ".join(
            f"{run.epochs_done}/{run.max_epochs if run.max_epochs is not None else '?'}" for run in self.runs
        )


def match(runs: Sequence[RunResult], rows: Sequence[PaperRow] = PAPER_ROWS) -> tuple[list[Line], list[RunResult]]:
    """Pair every paper row with the runs of the same signature; also return the runs that match no row."""
    by_signature: dict[tuple[Any, ...], list[RunResult]] = defaultdict(list)
    for run in runs:
        if run.signature is not None:
            by_signature[run.signature].append(run)
    lines = [Line(row, by_signature.get(row.signature(), []) if row.trained else []) for row in rows]
    matched = {row.signature() for row in rows if row.trained}
    unmatched = [run for run in runs if run.signature not in matched]
    return lines, unmatched


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


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
    return "dense" if row.sparsity is None else f"{row.sparsity:g}"


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
    "epochs",
    "runs",
    "train FLOPs",
    "inference FLOPs",
)


def _cells(line: Line) -> list[str]:
    row = line.row
    assert row is not None
    val, test = line.ours("best_val_ppl"), line.ours("test_ppl")
    name = row.row + ("" if row.trained else f" (quoted: {row.quoted})")
    return [
        row.model,
        name,
        _sparsity(row),
        _fmt(val),
        _fmt(test),
        _paper(row.val, row.val_std),
        _paper(row.test, row.test_std),
        _delta(val, row.val),
        _delta(test, row.test),
        line.epochs(),
        str(len(line.runs)) if row.trained else "",
        _flops(line.ours("train_flops"), row.train_flops),
        _flops(line.ours("inference_flops"), row.test_flops),
    ]


def render_markdown(lines: Iterable[Line], unmatched: Sequence[RunResult], tables: Sequence[str] | None = None) -> str:
    """The tables as GitHub markdown, one section per table of the paper."""
    lines = list(lines)
    out = io.StringIO()
    for table, title in TABLES.items():
        if tables and table not in tables:
            continue
        chosen = [line for line in lines if line.row is not None and line.row.table == table]
        if not chosen:
            continue
        out.write(f"## {title}\n\n")
        out.write("| " + " | ".join(HEADER) + " |\n")
        out.write("|" + "---|" * len(HEADER) + "\n")
        for line in chosen:
            out.write("| " + " | ".join(_cells(line)) + " |\n")
        out.write("\n")
    if unmatched:
        out.write("## Runs that match no row of the paper\n\n")
        out.write(
            "| run | model, method, optimizer, sparsity, epochs | best val | test | epochs | train FLOPs | "
            "inference FLOPs |\n|---|---|---|---|---|---|---|\n"
        )
        for run in unmatched:
            signature = ", ".join("dense" if v is None else str(v) for v in run.signature or ("?",))
            out.write(
                f"| {run.directory} | {signature} | {_fmt(run.best_val_ppl)} | {_fmt(run.test_ppl)} | "
                f"{run.epochs_done}/{run.max_epochs} | {_flops(run.train_flops, None)} | "
                f"{_flops(run.inference_flops, None)} |\n"
            )
        out.write("\n")
    return out.getvalue()


CSV_FIELDS = (
    "table",
    "model",
    "row",
    "method",
    "optimizer",
    "sparsity",
    "runs",
    "val_ours",
    "test_ours",
    "val_paper",
    "test_paper",
    "val_diff",
    "test_diff",
    "epochs_done",
    "max_epochs",
    "train_flops_ours",
    "inference_flops_ours",
    "train_flops_paper",
    "inference_flops_paper",
    "quoted_from",
    "directories",
)


def render_csv(lines: Iterable[Line], unmatched: Sequence[RunResult], tables: Sequence[str] | None = None) -> str:
    """One CSV line per paper row (and per unmatched run), numbers unformatted."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        row = line.row
        if row is None or (tables and row.table not in tables):
            continue
        val, test = line.ours("best_val_ppl"), line.ours("test_ppl")
        writer.writerow(
            {
                "table": row.table,
                "model": row.model,
                "row": row.row,
                "method": row.method,
                "optimizer": row.optimizer,
                "sparsity": "" if row.sparsity is None else row.sparsity,
                "runs": len(line.runs),
                "val_ours": _raw(val),
                "test_ours": _raw(test),
                "val_paper": _raw(row.val),
                "test_paper": _raw(row.test),
                "val_diff": _raw(None if val is None or row.val is None else val - row.val),
                "test_diff": _raw(None if test is None or row.test is None else test - row.test),
                "epochs_done": ";".join(str(run.epochs_done) for run in line.runs),
                "max_epochs": ";".join(str(run.max_epochs) for run in line.runs),
                "train_flops_ours": _raw(line.ours("train_flops")),
                "inference_flops_ours": _raw(line.ours("inference_flops")),
                "train_flops_paper": _raw(row.train_flops),
                "inference_flops_paper": _raw(row.test_flops),
                "quoted_from": row.quoted or "",
                "directories": ";".join(str(run.directory) for run in line.runs),
            }
        )
    for run in unmatched:
        model, method, optimizer, sparsity, _ = run.signature or (None,) * 5
        writer.writerow(
            {
                "table": "",
                "model": model or "",
                "row": "",
                "method": method or "",
                "optimizer": optimizer or "",
                "sparsity": "" if sparsity is None else sparsity,
                "runs": 1,
                "val_ours": _raw(run.best_val_ppl),
                "test_ours": _raw(run.test_ppl),
                "epochs_done": run.epochs_done,
                "max_epochs": run.max_epochs,
                "train_flops_ours": _raw(run.train_flops),
                "inference_flops_ours": _raw(run.inference_flops),
                "directories": str(run.directory),
            }
        )
    return out.getvalue()


def _raw(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def main(argv: Sequence[str]) -> int:
    """``selfish-rnn results DIR [--format markdown|csv] [--table 2 ...]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="selfish-rnn results",
        description="Collect the runs under DIR and print the paper's tables (2, 3, 5, 7, 8; Table 9's FLOPs) "
        "filled in with our perplexities, the paper's, the differences, the epochs done and the FLOPs.",
    )
    parser.add_argument("directory", type=Path, help="where the runs are (the loggers' save_dir, e.g. lightning_logs)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="output format")
    parser.add_argument("--table", action="append", choices=sorted(TABLES), help="only these tables (repeatable)")
    parser.add_argument("--only-run", action="store_true", help="only the rows that have at least one run")
    args = parser.parse_args(list(argv))
    try:
        runs = collect_runs(args.directory)
    except FileNotFoundError as error:
        print(f"selfish-rnn results: {error}", file=sys.stderr)
        return 2
    lines, unmatched = match(runs)
    if args.only_run:
        lines = [line for line in lines if line.runs]
    render = render_csv if args.format == "csv" else render_markdown
    sys.stdout.write(render(lines, unmatched, args.table))
    if not runs:
        print(f"selfish-rnn results: no run (no config.yaml) under {args.directory}", file=sys.stderr)
    return 0
