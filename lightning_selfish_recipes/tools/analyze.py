"""``selfish-rnn analyze``: the paper's analysis figures from a finished run's own files.

::

    selfish-rnn analyze lightning_logs/stacked_lstm_ptb/version_0
    selfish-rnn analyze RUN --compare OTHER_RUN            # two seeds from one initialisation; SNT- vs NT-ASGD
    selfish-rnn analyze RUN --compare OTHER_RUN --align activations --max-batches 20

Writes into ``--out`` (default ``RUN/analysis``), and says on stderr what it left out and why:

* ``distance_within.png/.csv`` (Figure 4, left): the topology distance of every saved epoch to the reference
  epoch (``--reference-epoch``; default the paper's 5th epoch, index 4, when the run saved it and a later one,
  else the earliest saved), per tensor and per gate; from the bit-packed masks that ``MaskHistory`` saves in
  ``RUN/masks``. Epochs before the reference are drawn too; the reference column is labelled "ref.". Needs two
  saved epochs.
* ``distance_between.png/.csv`` (Figure 4, right; with ``--compare``): the distance between the two runs at
  every epoch both saved.
* ``magnitude.png`` (Figure 3): weights above the magnitude threshold per epoch, from the TensorBoard logs
  (``magnitude_above/*``); with ``--compare`` the other run is drawn dashed. Needs two logged epochs.
* ``gate_sparsity.png`` and ``gate_sparsity.md`` (Figure 10 and its table): the final sparsity of every gate, from
  the logged ``sparsity/<param>/<gate>`` scalars (or the last saved masks).
* ``masks_<tensor>_start.png`` and ``masks_<tensor>_epoch<N>.png``: the density of every gated tensor's mask at
  the start and at the last saved epoch, gates labelled, with a colour scale.

Distances are the graph edit distance of :mod:`lightning_selfish.analysis`. ``--align none`` (default) pairs units
by position: exact within one run, where a unit keeps its identity. ``--align activations`` is Appendix J in
full: units are paired by the maximum correlation of their activations on the test split (Li et al.'s
semi-matching), which needs the weights of every compared epoch, i.e. a checkpoint per epoch in
``RUN/checkpoints`` (``ModelCheckpoint(every_n_epochs=1, save_top_k=-1)``, see docs/analysis.md), and the run's
``config.yaml`` for the data. It aligns the units of every ``nn.LSTM`` in the network (the stacked LSTM) and every
tensor whose rows or columns are those units (the embedding's columns feed the first layer, the decoder's columns
read the last one). The CSV says for each tensor whether it was aligned, its distance by position, and how good
the matching was (the fraction of units with distinct partners, the mean correlation with the partner); a poor
matching is reported on stderr and in the figure's title.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_selfish.analysis import plots
from lightning_selfish.callbacks.history import load_mask_history
from lightning_selfish_recipes.tools.analysis_outputs import (
    PAPER_REFERENCE_EPOCH,
    Analysis,
    choose_reference_epoch,
    gate_sparsity_outputs,
    magnitude_figure,
    mask_pictures,
    read_scalars,
    write_distances,
)
from lightning_selfish_recipes.tools.options import positive_int
from lightning_selfish_recipes.tools.topology_sources import (
    AnalyzeError,
    CheckpointTopologies,
    HistoryTopologies,
    TopologySource,
)

__all__ = ["Analysis", "AnalyzeError", "analyze", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfish-rnn analyze",
        description=(
            "Topology distances (Figure 4), weights above a magnitude (Figure 3) and the final gate sparsity "
            "(Figure 10, with a markdown table) of a finished run, from its mask history, logs and checkpoints."
        ),
    )
    parser.add_argument("run", type=Path, help="the run's log directory, e.g. lightning_logs/<name>/version_0")
    parser.add_argument("--compare", type=Path, help="a second run: distance between the runs, dashed Figure 3")
    parser.add_argument("--out", type=Path, help="where to write the figures (default: RUN/analysis)")
    parser.add_argument(
        "--reference-epoch",
        type=int,
        help=f"epoch the within-run distances compare to (default {PAPER_REFERENCE_EPOCH}, the paper's 5th, when it "
        "and a later epoch were saved; else the earliest saved)",
    )
    parser.add_argument(
        "--align",
        choices=("none", "activations"),
        default="none",
        help="pair units by position (none) or by activation correlation on the test split (needs checkpoints)",
    )
    parser.add_argument(
        "--max-batches", type=positive_int, default=50, help="test windows used for activations (--align activations)"
    )
    parser.add_argument("--threshold", type=float, default=0.1, help="the magnitude threshold, for Figure 3's label")
    return parser


def main(argv: Sequence[str]) -> int:
    """Draw the paper's analysis figures (topology distances, large weights, gate sparsity) from a run's files."""
    args = build_parser().parse_args(list(argv))
    try:
        result = analyze(
            args.run,
            compare=args.compare,
            out=args.out,
            reference_epoch=args.reference_epoch,
            align=args.align,
            max_batches=args.max_batches,
            threshold=args.threshold,
        )
    except (AnalyzeError, FileNotFoundError, ImportError) as error:
        print(f"selfish-rnn analyze: error: {error}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"selfish-rnn analyze: {note}", file=sys.stderr)
    for path in result.written:
        print(path)
    return 0


def analyze(
    run: Path,
    compare: Path | None = None,
    out: Path | None = None,
    reference_epoch: int | None = None,
    align: str = "none",
    max_batches: int = 50,
    threshold: float = 0.1,
) -> Analysis:
    """Write every figure the run's files allow. Raises when none is possible."""
    run = Path(run)
    if not run.is_dir():
        raise AnalyzeError(f"run directory {str(run)!r} does not exist")
    if compare is not None and not Path(compare).is_dir():
        raise AnalyzeError(f"--compare: run directory {str(compare)!r} does not exist")
    if align not in ("none", "activations"):
        raise AnalyzeError(f"--align must be 'none' or 'activations', got {align!r}")
    plots._require_matplotlib()
    out = Path(out) if out is not None else run / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    result = Analysis()

    history = load_mask_history(run / "masks") if (run / "masks").is_dir() else {}
    if align == "activations":
        source: TopologySource = CheckpointTopologies(run, max_batches)
    else:
        source = HistoryTopologies(history)
    epochs = source.epochs()
    if len(epochs) >= 2:
        reference = choose_reference_epoch(epochs, reference_epoch)
        rows = [(epoch, entry) for epoch in epochs for entry in source.distance(reference, epoch)]
        how = "units aligned by activations" if align != "none" else "units by position"
        paper = " (the paper's 5th)" if reference == PAPER_REFERENCE_EPOCH else ""
        write_distances(
            result, out / "distance_within", rows, f"Distance to epoch {reference}{paper}, {how}", reference
        )
    elif epochs:
        choose_reference_epoch(epochs, reference_epoch)  # a wrong --reference-epoch is still an error
        result.notes.append(
            f"distance_within.png left out: the run saved one epoch ({epochs[0]}); the distance to a reference "
            "epoch needs two"
        )
    if compare is not None:
        other: TopologySource = (
            CheckpointTopologies(Path(compare), max_batches, data_from=source)
            if isinstance(source, CheckpointTopologies)
            else HistoryTopologies(load_mask_history(Path(compare) / "masks"))
        )
        common = [epoch for epoch in epochs if epoch in set(other.epochs())]
        if not common:
            raise AnalyzeError(f"{run} and {compare} have no saved epoch in common")
        rows = [(epoch, entry) for epoch in common for entry in source.distance_to(other, epoch)]
        write_distances(result, out / "distance_between", rows, "Distance between the two runs")

    scalars = read_scalars(run)
    magnitude_figure(result, scalars, run, compare, out, threshold)
    gate_sparsity_outputs(result, scalars, history, out)
    mask_pictures(result, run, history, out)

    if not result.written:
        raise AnalyzeError(
            f"nothing to analyse in {run}: no mask history (masks/), no TensorBoard scalars "
            "(magnitude_above/*, sparsity/*) and no checkpoints; train with the TopologyMonitor and MaskHistory "
            "callbacks (the recipes add them to sparse runs) and a TensorBoard logger"
        )
    return result
