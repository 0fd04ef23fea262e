"""``selfish-rnn analyze``: the paper's analysis figures from a finished run's own files.

::

    selfish-rnn analyze lightning_logs/stacked_lstm_ptb/version_0
    selfish-rnn analyze RUN --compare OTHER_RUN            # two seeds from one initialisation; SNT- vs NT-ASGD
    selfish-rnn analyze RUN --compare OTHER_RUN --align activations --max-batches 20

Writes into ``--out`` (default ``RUN/analysis``):

* ``distance_within.png/.csv`` (Figure 4, left): the topology distance of every saved epoch to the reference
  epoch (``--reference-epoch``, default the paper's 5th epoch, i.e. index 4, or the earliest saved one), per
  tensor and per gate; from the bit-packed masks that ``MaskHistory`` saves in ``RUN/masks``.
* ``distance_between.png/.csv`` (Figure 4, right; with ``--compare``): the distance between the two runs at
  every epoch both saved.
* ``magnitude.png`` (Figure 3): weights above the magnitude threshold over training, from the TensorBoard logs
  (``magnitude_above/*``); with ``--compare`` the other run is drawn dashed.
* ``gate_sparsity.png`` and ``gate_sparsity.md`` (Figure 10 and its table): the final sparsity of every gate, from
  the logged ``sparsity/<param>/<gate>`` scalars (or the last saved masks).

Distances are the graph edit distance of :mod:`lightning_selfish.analysis`. ``--align none`` (default) pairs units
by position: exact within one run, where a unit keeps its identity. ``--align activations`` is Appendix J in
full: units are paired by the maximum correlation of their activations on the test split (Li et al.'s
semi-matching), which needs the weights of every compared epoch, i.e. a checkpoint per epoch in
``RUN/checkpoints`` (``ModelCheckpoint(every_n_epochs=1, save_top_k=-1)``, see docs/analysis.md), and the run's
``config.yaml`` for the data. It aligns the units of every ``nn.LSTM`` in the network (the stacked LSTM); the CSV
says for each tensor whether it was aligned.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_selfish import analysis, plots
from lightning_selfish.history import MaskSnapshot, load_mask_history

PAPER_REFERENCE_EPOCH = 4  # "We start alignment at the 5th epoch" (Appendix J), counting from 0 here
_CHECKPOINT_EPOCH = re.compile(r"epoch[=_]?(\d+)")


class AnalyzeError(Exception):
    """A run directory that lacks what the requested analysis needs."""


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
        help=f"epoch the within-run distances compare to (default {PAPER_REFERENCE_EPOCH}, or the earliest saved)",
    )
    parser.add_argument(
        "--align",
        choices=("none", "activations"),
        default="none",
        help="pair units by position (none) or by activation correlation on the test split (needs checkpoints)",
    )
    parser.add_argument(
        "--max-batches", type=_positive_int, default=50, help="test windows used for activations (--align activations)"
    )
    parser.add_argument("--threshold", type=float, default=0.1, help="the magnitude threshold, for Figure 3's label")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def main(argv: Sequence[str]) -> int:
    """``selfish-rnn analyze ARGS``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    try:
        written = analyze(
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
    for path in written:
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
) -> list[Path]:
    """Write every figure the run's files allow; returns the written paths. Raises when none is possible."""
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
    written: list[Path] = []

    history = load_mask_history(run / "masks") if (run / "masks").is_dir() else {}
    if align == "activations":
        source: TopologySource = CheckpointTopologies(run, max_batches)
    else:
        source = HistoryTopologies(history)
    epochs = source.epochs()
    if epochs:
        reference = _reference_epoch(epochs, reference_epoch)
        rows = [
            (epoch, *entry) for epoch in epochs if epoch >= reference for entry in source.distance(reference, epoch)
        ]
        written += _write_distances(
            out / "distance_within",
            rows,
            f"Distance to epoch {reference} ({'aligned units' if align != 'none' else 'units by position'})",
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
        rows = [(epoch, *entry) for epoch in common for entry in source.distance_to(other, epoch)]
        written += _write_distances(out / "distance_between", rows, "Distance between the two runs")

    scalars = _read_scalars(run)
    magnitude = {tag.split("/", 1)[1]: points for tag, points in scalars.items() if tag.startswith("magnitude_above/")}
    if magnitude:
        compared = _read_scalars(Path(compare)) if compare is not None else {}
        other_magnitude = {t.split("/", 1)[1]: p for t, p in compared.items() if t.startswith("magnitude_above/")}
        figure = plots.magnitude_figure(
            magnitude,
            other_magnitude or None,
            threshold=threshold,
            labels=(_label(run), _label(Path(compare)) if compare else ""),
            xlabel="optimizer step",
        )
        written.append(plots.save_figure(figure, out / "magnitude.png"))

    table = _gate_table_from_scalars(scalars)
    if not table and history:
        last = history[max(history)]
        table = analysis.gate_sparsity(last.masks, last.gates)
    if table:
        written.append(plots.save_figure(plots.gate_sparsity_figure(table), out / "gate_sparsity.png"))
        markdown = out / "gate_sparsity.md"
        markdown.write_text(analysis.gate_sparsity_markdown(table))
        written.append(markdown)

    if not written:
        raise AnalyzeError(
            f"nothing to analyse in {run}: no mask history (masks/), no TensorBoard scalars "
            "(magnitude_above/*, sparsity/*) and no checkpoints; train with the TopologyMonitor and MaskHistory "
            "callbacks (the recipes add them to sparse runs) and a TensorBoard logger"
        )
    return written


# ----------------------------------------------------------------------------------------------------------------
# topologies: from the mask history (units by position) or from checkpoints (units aligned by activations)
# ----------------------------------------------------------------------------------------------------------------

DistanceRow = tuple[str, str, float, bool, float]  # tensor, part ("all" or a gate), distance, aligned, chance


class TopologySource:
    def epochs(self) -> list[int]:
        raise NotImplementedError

    def distance(self, first: int, second: int) -> list[DistanceRow]:
        raise NotImplementedError

    def distance_to(self, other: TopologySource, epoch: int) -> list[DistanceRow]:
        raise NotImplementedError


class HistoryTopologies(TopologySource):
    """Topologies of the bit-packed mask history, compared unit by unit at the same position."""

    def __init__(self, history: dict[int, MaskSnapshot]) -> None:
        self.history = history

    def epochs(self) -> list[int]:
        return sorted(self.history)

    def distance(self, first: int, second: int) -> list[DistanceRow]:
        return _mask_rows(self.history[first], self.history[second])

    def distance_to(self, other: TopologySource, epoch: int) -> list[DistanceRow]:
        assert isinstance(other, HistoryTopologies)
        return _mask_rows(self.history[epoch], other.history[epoch])


def _mask_rows(a: MaskSnapshot, b: MaskSnapshot) -> list[DistanceRow]:
    if set(a.masks) != set(b.masks):
        raise AnalyzeError(f"the runs sparsify different tensors: {sorted(a.masks)} and {sorted(b.masks)}")
    rows = []
    for name, mask in a.masks.items():
        gates = a.gates.get(name)
        chance = analysis.chance_distance(mask, b.masks[name], gates)
        for part, value in analysis.mask_distance(mask, b.masks[name], gates).items():
            rows.append((name, part, value, False, chance[part]))
    return rows


class CheckpointTopologies(TopologySource):
    """Topologies and activations of per-epoch checkpoints; units of every ``nn.LSTM`` aligned by activations."""

    def __init__(self, run: Path, max_batches: int, data_from: CheckpointTopologies | None = None) -> None:
        self.run = run
        self.max_batches = max_batches
        self.checkpoints = _checkpoints_by_epoch(run)
        if not self.checkpoints:
            raise AnalyzeError(
                f"--align activations needs a checkpoint per compared epoch in {run / 'checkpoints'} (file names "
                "with epoch<N> or epoch=<N>); train with ModelCheckpoint(every_n_epochs=1, save_top_k=-1), "
                "see docs/analysis.md"
            )
        self._batches = data_from._test_batches() if data_from is not None else None
        self._cache: dict[int, tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor], dict]] = {}

    def epochs(self) -> list[int]:
        return sorted(self.checkpoints)

    def distance(self, first: int, second: int) -> list[DistanceRow]:
        return _aligned_rows(self._load(first), self._load(second))

    def distance_to(self, other: TopologySource, epoch: int) -> list[DistanceRow]:
        assert isinstance(other, CheckpointTopologies)
        other._batches = self._test_batches()
        return _aligned_rows(self._load(epoch), other._load(epoch))

    def _test_batches(self) -> list[Tensor]:
        if self._batches is None:
            self._batches = _test_batches(self.run, self.max_batches)
        return self._batches

    def _load(self, epoch: int) -> tuple[dict[str, Tensor], dict, dict[str, Tensor], dict]:
        # The two most recently used epochs stay loaded: the reference epoch and the one compared to it.
        entry = self._cache.pop(epoch, None)
        if entry is None:
            entry = _load_checkpoint(self.checkpoints[epoch], self._test_batches())
        self._cache[epoch] = entry
        while len(self._cache) > 2:
            self._cache.pop(next(iter(self._cache)))
        return entry


def _checkpoints_by_epoch(run: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        match = _CHECKPOINT_EPOCH.search(path.stem)
        if match and not path.stem.startswith("last"):
            found.setdefault(int(match.group(1)), path)
    return found


def _test_batches(run: Path, max_batches: int) -> list[Tensor]:
    import yaml

    from recipes.data import LanguageModelingDataModule

    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise AnalyzeError(f"--align activations reads the data from the run's config, but {config_path} is missing")
    config = yaml.safe_load(config_path.read_text()) or {}
    data = LanguageModelingDataModule(**(config.get("data") or {}))
    data.prepare_data()
    data.setup("test")
    batches = []
    for k, batch in enumerate(data.test_dataloader()):
        if k >= max_batches:
            break
        batches.append(batch[0])
    return batches


def _load_checkpoint(path: Path, batches: list[Tensor]) -> tuple[dict[str, Tensor], dict, dict[str, Tensor], dict]:
    """Masks, gate layouts, activations per unit group and the tensor -> (row group, column group) map."""
    from lightning_selfish.gates import detect_gate_layouts
    from recipes.lm import LanguageModel

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("callbacks", {}).get("SelfishSparsityCallback", {})
    if "masks" not in state:
        raise AnalyzeError(f"{path} holds no SelfishSparsityCallback masks: was the run sparse?")
    model = LanguageModel.load_from_checkpoint(path, map_location="cpu")
    model.eval()
    gates = detect_gate_layouts(model)
    activations, groups = lstm_unit_activations(model, batches)
    return {n: m.bool() for n, m in state["masks"].items()}, gates, activations, groups


@torch.no_grad()
def lstm_unit_activations(model: nn.Module, batches: list[Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Activations ``(samples, units)`` of every unit group of the ``nn.LSTM`` modules of ``model``'s network.

    Groups are ``<lstm>.input`` (the features fed to the first layer) and ``<lstm>.l<k>`` (layer ``k``'s hidden
    output); each layer is replayed on its own from the module's weights, so the per-layer outputs that a
    multi-layer cuDNN LSTM keeps inside are available. Returns the activations and, per tensor name, the
    (row group, column group) that :func:`lightning_selfish.analysis.topology_distance` aligns it by.
    """
    lstms = {name: module for name, module in model.named_modules() if type(module) is nn.LSTM}
    recorded: dict[str, list[Tensor]] = {}
    groups: dict[str, tuple[str, str]] = {}
    for name, lstm in lstms.items():
        if lstm.bidirectional or lstm.proj_size:
            continue
        for k in range(lstm.num_layers):
            groups[f"{name}.weight_ih_l{k}"] = (f"{name}.l{k}", f"{name}.input" if k == 0 else f"{name}.l{k - 1}")
            groups[f"{name}.weight_hh_l{k}"] = (f"{name}.l{k}", f"{name}.l{k}")

    def record(name: str, lstm: nn.LSTM):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            hx = args[1] if len(args) > 1 else None
            recorded.setdefault(f"{name}.input", []).append(x.reshape(-1, x.shape[-1]).float())
            for k in range(lstm.num_layers):
                weights = [getattr(lstm, f"{w}_l{k}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                state = None if hx is None else (hx[0][k : k + 1].contiguous(), hx[1][k : k + 1].contiguous())
                if state is None:
                    zeros = x.new_zeros(1, x.shape[1], lstm.hidden_size)
                    state = (zeros, zeros)
                x = torch.lstm(x, state, weights[: 4 if lstm.bias else 2], lstm.bias, 1, 0.0, False, False, False)[0]
                recorded.setdefault(f"{name}.l{k}", []).append(x.reshape(-1, x.shape[-1]).float())

        return hook

    handles = [lstm.register_forward_hook(record(name, lstm)) for name, lstm in lstms.items()]
    try:
        network = getattr(model, "network", model)
        hidden = None
        for tokens in batches:
            if hidden is None or _batch_size(hidden) != tokens.shape[1]:
                hidden = network.init_hidden(tokens.shape[1])
            hidden = network(tokens, hidden).hidden
    finally:
        for handle in handles:
            handle.remove()
    return {group: torch.cat(chunks) for group, chunks in recorded.items()}, groups


def _batch_size(hidden: Any) -> int:
    while not isinstance(hidden, Tensor):
        hidden = hidden[0]
    return hidden.shape[-2]


def _aligned_rows(first: tuple, second: tuple) -> list[DistanceRow]:
    masks_a, gates, acts_a, groups = first
    masks_b, _, acts_b, _ = second
    matches: dict[str, tuple[Tensor, Tensor]] = {}
    for group in acts_a:
        correlation = analysis.correlation_matrix(acts_a[group], acts_b[group])
        matches[group] = (analysis.semi_matching(correlation), analysis.semi_matching(correlation.T))
    rows = []
    for name, mask in masks_a.items():
        layout = gates.get(name)
        if name in groups and all(g in matches for g in groups[name]):
            row_group, col_group = groups[name]
            distance = analysis.topology_distance(
                mask,
                masks_b[name],
                layout,
                rows_ab=matches[row_group][0],
                cols_ab=matches[col_group][0],
                rows_ba=matches[row_group][1],
                cols_ba=matches[col_group][1],
            )
            aligned = True
        else:
            distance, aligned = analysis.mask_distance(mask, masks_b[name], layout), False
        chance = analysis.chance_distance(mask, masks_b[name], layout)
        rows += [(name, part, value, aligned, chance[part]) for part, value in distance.items()]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------


def _reference_epoch(epochs: list[int], requested: int | None) -> int:
    if requested is None:
        return PAPER_REFERENCE_EPOCH if PAPER_REFERENCE_EPOCH in epochs else epochs[0]
    if requested not in epochs:
        raise AnalyzeError(f"--reference-epoch {requested}: that epoch was not saved; saved epochs: {epochs}")
    return requested


def _write_distances(stem: Path, rows: list[tuple[int, str, str, float, bool, float]], title: str) -> list[Path]:
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "tensor", "part", "distance", "aligned", "chance"])
        for epoch, tensor, part, value, aligned, chance in rows:
            writer.writerow([epoch, tensor, part, f"{value:.6f}", int(aligned), f"{chance:.6f}"])
    epochs = sorted({row[0] for row in rows})
    tensors = list(dict.fromkeys(row[1] for row in rows))
    values = {(row[0], row[1]): row[3] for row in rows if row[2] == "all"}
    matrix = [[values[(epoch, tensor)] for epoch in epochs] for tensor in tensors]
    chances = [row[5] for row in rows if row[2] == "all"]
    if chances:  # the level of two unrelated random topologies of the same densities
        title += f"; chance level {min(chances):.2f}" + (
            f"-{max(chances):.2f}" if max(chances) - min(chances) > 0.005 else ""
        )
    figure = plots.distance_heatmap(matrix, [plots.short_name(t) for t in tensors], epochs, title)
    return [csv_path, plots.save_figure(figure, stem.with_suffix(".png"))]


def _label(run: Path) -> str:
    """``name/version_0`` for a logger's version directory, else the directory's name."""
    return f"{run.parent.name}/{run.name}" if run.name.startswith("version_") else run.name


def _read_scalars(run: Path) -> dict[str, list[tuple[float, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(run.glob("events.out.tfevents.*")):
        return {}
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 1})
    accumulator.Reload()
    return {
        tag: [(float(e.step), float(e.value)) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith(("magnitude_above/", "sparsity/"))
    }


def _gate_table_from_scalars(scalars: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for tag, points in scalars.items():
        parts = tag.split("/")
        if parts[0] != "sparsity" or len(parts) != 3 or not points:
            continue
        tensor, gate = parts[1], parts[2]
        table.setdefault(tensor, {})[gate] = points[-1][1]
    for tensor in table:
        whole = scalars.get(f"sparsity/{tensor}")
        if whole:
            table[tensor]["all"] = whole[-1][1]
    return table
