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
import csv
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_selfish import analysis
from lightning_selfish.analysis import plots
from lightning_selfish.callbacks.history import MaskSnapshot, load_mask_history, load_mask_snapshot
from lightning_selfish_recipes.tools.options import positive_int

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


#: Below this fraction of units with distinct partners, a semi-matching has collapsed: its aligned distances
#: compare units with other units' edges.
POOR_MATCHING = 0.5


@dataclass
class Analysis:
    """What :func:`analyze` did: the files written, what it left out or warns about, and the figures drawn."""

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib Figure

    def save(self, figure: Any, path: Path) -> None:
        self.figures[path.name] = figure
        self.written.append(plots.save_figure(figure, path))


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
        reference = _reference_epoch(epochs, reference_epoch)
        rows = [(epoch, entry) for epoch in epochs for entry in source.distance(reference, epoch)]
        how = "units aligned by activations" if align != "none" else "units by position"
        paper = " (the paper's 5th)" if reference == PAPER_REFERENCE_EPOCH else ""
        _write_distances(
            result, out / "distance_within", rows, f"Distance to epoch {reference}{paper}, {how}", reference
        )
    elif epochs:
        _reference_epoch(epochs, reference_epoch)  # a wrong --reference-epoch is still an error
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
        _write_distances(result, out / "distance_between", rows, "Distance between the two runs")

    scalars = _read_scalars(run)
    _magnitude(result, scalars, run, compare, out, threshold)
    _gate_sparsity(result, scalars, history, out)
    _mask_pictures(result, run, history, out)

    if not result.written:
        raise AnalyzeError(
            f"nothing to analyse in {run}: no mask history (masks/), no TensorBoard scalars "
            "(magnitude_above/*, sparsity/*) and no checkpoints; train with the TopologyMonitor and MaskHistory "
            "callbacks (the recipes add them to sparse runs) and a TensorBoard logger"
        )
    return result


def _magnitude(result: Analysis, scalars: dict, run: Path, compare: Path | None, out: Path, threshold: float) -> None:
    series = _magnitude_by_epoch(scalars)
    if not series:
        return
    if max(len(points) for points in series.values()) < 2:
        result.notes.append(
            "magnitude.png left out: the run logged the weights above the threshold for one epoch; a curve needs two"
        )
        return
    other = _magnitude_by_epoch(_read_scalars(Path(compare))) if compare is not None else {}
    figure = plots.magnitude_figure(
        series,
        other or None,
        threshold=threshold,
        labels=(_label(run), _label(Path(compare)) if compare else ""),
        xlabel="epoch",
    )
    result.save(figure, out / "magnitude.png")


def _gate_sparsity(result: Analysis, scalars: dict, history: dict[int, MaskSnapshot], out: Path) -> None:
    table = _gate_table_from_scalars(scalars)
    if not table and history:
        last = history[max(history)]
        table = analysis.gate_sparsity(last.masks, last.gates)
    if table:
        result.save(plots.gate_sparsity_figure(table), out / "gate_sparsity.png")
        markdown = out / "gate_sparsity.md"
        markdown.write_text(analysis.gate_sparsity_markdown(table))
        result.written.append(markdown)


def _mask_pictures(result: Analysis, run: Path, history: dict[int, MaskSnapshot], out: Path) -> None:
    """The masks of every gated tensor at the start (``init.pt``) and at the last saved epoch."""
    snapshots: list[tuple[str, MaskSnapshot]] = []
    if (run / "masks" / "init.pt").is_file():
        snapshots.append(("start", load_mask_snapshot(run / "masks" / "init.pt")))
    if history:
        last = max(history)
        snapshots.append((f"epoch{last:04d}", history[last]))
    for label, snapshot in snapshots:
        for name, mask in snapshot.masks.items():
            gates = snapshot.gates.get(name)
            if not gates:
                continue
            title = f"{name}, {'start' if label == 'start' else f'after epoch {int(label[5:])}'}"
            figure = plots.mask_density_figure(mask, gates, title)
            result.save(figure, out / f"masks_{plots.short_name(name)}_{label}.png")


# ----------------------------------------------------------------------------------------------------------------
# topologies: from the mask history (units by position) or from checkpoints (units aligned by activations)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistanceRow:
    """One part (``"all"`` or a gate) of one tensor compared: the distance and what it is worth."""

    tensor: str
    part: str
    distance: float
    aligned: bool
    chance: float
    by_position: float  # the distance with units paired by position (equal to ``distance`` when not aligned)
    partners: float | None = None  # aligned: the smallest fraction of units with distinct partners it used
    correlation: float | None = None  # aligned: the smallest mean correlation with the partner it used
    poor: tuple[str, ...] = ()  # aligned: what was poor about its matchings, one line per matching


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
            rows.append(DistanceRow(name, part, value, False, chance[part], value))
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

    from lightning_selfish_recipes.data import LanguageModelingDataModule

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
    from lightning_selfish.core.gates import detect_gate_layouts
    from lightning_selfish_recipes.lm import LanguageModel
    from lightning_selfish_recipes.old_names import with_current_class_paths

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("callbacks", {}).get("SelfishSparsityCallback", {})
    if "masks" not in state:
        raise AnalyzeError(f"{path} holds no SelfishSparsityCallback masks: was the run sparse?")
    # a run of an earlier version names its network recipes.models.X: give the current class path instead
    network = with_current_class_paths((checkpoint.get("hyper_parameters") or {}).get("network"))
    model = LanguageModel.load_from_checkpoint(path, map_location="cpu", **({"network": network} if network else {}))
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
    (row group, column group) that :func:`lightning_selfish.analysis.topology_distance` aligns it by (None: by
    position). Besides the LSTM tensors, every embedding whose output is a group (its columns are those units:
    the features fed to the first layer) and every linear layer whose input is one (the decoder reading the last
    layer) is aligned: found by comparing, in eval mode, what the module produced or read with each group.
    """
    lstms = {name: module for name, module in model.named_modules() if type(module) is nn.LSTM}
    recorded: dict[str, list[Tensor]] = {}
    groups: dict[str, tuple[str | None, str | None]] = {}
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

    seen: dict[str, list[Tensor]] = {}  # what every embedding produced and every linear layer read

    def watch(name: str, produced: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            value = output if produced else args[0]
            seen.setdefault(name, []).append(value.reshape(-1, value.shape[-1]).float())

        return hook

    handles = [lstm.register_forward_hook(record(name, lstm)) for name, lstm in lstms.items()]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.Linear)) and isinstance(getattr(module, "weight", None), Tensor):
            handles.append(module.register_forward_hook(watch(name, isinstance(module, nn.Embedding))))
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
    activations = {group: torch.cat(chunks) for group, chunks in recorded.items()}
    for name, chunks in seen.items():
        values = torch.cat(chunks)
        group = next(
            (g for g, acts in activations.items() if acts.shape == values.shape and torch.allclose(acts, values)),
            None,
        )
        if group is not None:
            groups[f"{name}.weight"] = (None, group)  # rows: tokens (embedding) or outputs, kept by position
    return activations, groups


def _batch_size(hidden: Any) -> int:
    while not isinstance(hidden, Tensor):
        hidden = hidden[0]
    return hidden.shape[-2]


def _aligned_rows(first: tuple, second: tuple) -> list[DistanceRow]:
    masks_a, gates, acts_a, groups = first
    masks_b, _, acts_b, _ = second
    matches: dict[str, tuple[Tensor, Tensor]] = {}
    quality: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for group in acts_a:
        correlation = analysis.correlation_matrix(acts_a[group], acts_b[group])
        forward, backward = analysis.semi_matching(correlation), analysis.semi_matching(correlation.T)
        matches[group] = (forward, backward)
        quality[group] = [
            ("first to second", analysis.match_quality(correlation, forward)),
            ("second to first", analysis.match_quality(correlation.T, backward)),
        ]
    rows = []
    for name, mask in masks_a.items():
        layout = gates.get(name)
        by_position = analysis.mask_distance(mask, masks_b[name], layout)
        used = [g for g in groups.get(name, (None, None)) if g is not None]
        chance = analysis.chance_distance(mask, masks_b[name], layout)
        if used and all(g in matches for g in used):
            row_group, col_group = groups[name]
            distance = analysis.topology_distance(
                mask,
                masks_b[name],
                layout,
                rows_ab=matches[row_group][0] if row_group else None,
                cols_ab=matches[col_group][0] if col_group else None,
                rows_ba=matches[row_group][1] if row_group else None,
                cols_ba=matches[col_group][1] if col_group else None,
            )
            found = [(g, way, q) for g in used for way, q in quality[g]]
            partners = min(q["distinct_fraction"] for _, _, q in found)
            correlation = min(q["mean"] for _, _, q in found)
            poor = tuple(
                f"{g} ({way}): {q['distinct']} of {q['units']} units have distinct partners, mean correlation "
                f"{q['mean']:.2f}"
                for g, way, q in found
                if q["distinct_fraction"] < POOR_MATCHING
            )
            rows += [
                DistanceRow(name, part, value, True, chance[part], by_position[part], partners, correlation, poor)
                for part, value in distance.items()
            ]
        else:
            rows += [DistanceRow(name, part, value, False, chance[part], value) for part, value in by_position.items()]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------


def _reference_epoch(epochs: list[int], requested: int | None) -> int:
    """``requested``, or the paper's 5th epoch when the run saved it and a later one, or the earliest saved."""
    if requested is None:
        if PAPER_REFERENCE_EPOCH in epochs and max(epochs) > PAPER_REFERENCE_EPOCH:
            return PAPER_REFERENCE_EPOCH
        return epochs[0]
    if requested not in epochs:
        raise AnalyzeError(f"--reference-epoch {requested}: that epoch was not saved; saved epochs: {epochs}")
    return requested


CSV_COLUMNS = (
    "epoch",
    "tensor",
    "part",
    "distance",
    "aligned",
    "chance",
    "distance_by_position",
    "distinct_partners",
    "match_correlation",
)


def _write_distances(
    result: Analysis,
    stem: Path,
    rows: list[tuple[int, DistanceRow]],
    title: str,
    reference: int | None = None,
) -> None:
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for epoch, row in rows:
            writer.writerow(
                [
                    epoch,
                    row.tensor,
                    row.part,
                    f"{row.distance:.6f}",
                    int(row.aligned),
                    f"{row.chance:.6f}",
                    f"{row.by_position:.6f}",
                    "" if row.partners is None else f"{row.partners:.4f}",
                    "" if row.correlation is None else f"{row.correlation:.4f}",
                ]
            )
    result.written.append(csv_path)
    epochs = sorted({epoch for epoch, _ in rows})
    tensors = list(dict.fromkeys(row.tensor for _, row in rows))
    values = {(epoch, row.tensor): row.distance for epoch, row in rows if row.part == "all"}
    matrix = [[values[(epoch, tensor)] for epoch in epochs] for tensor in tensors]
    chances = [row.chance for _, row in rows if row.part == "all"]
    if chances:  # the level of two unrelated random topologies of the same densities
        title += f"; chance level {min(chances):.2f}" + (
            f"-{max(chances):.2f}" if max(chances) - min(chances) > 0.005 else ""
        )
    poor = sorted({epoch for epoch, row in rows if row.poor})
    if poor:
        title += f"\npoor alignment (collapsed matching) at epoch {', '.join(map(str, poor))}: see the CSV"
        lines = dict.fromkeys(f"epoch {epoch}: {line}" for epoch, row in rows for line in row.poor)
        result.notes.append(
            f"{stem.name}: the semi-matching collapsed (fewer than {POOR_MATCHING:.0%} of the units have distinct "
            "partners), so the aligned distance compares units with other units' edges; distance_by_position in "
            "the CSV is the unaligned one:\n  " + "\n  ".join(lines)
        )
    figure = plots.distance_heatmap(
        matrix,
        [plots.short_name(t) for t in tensors],
        epochs,
        title,
        marked_column=epochs.index(reference) if reference is not None else None,
    )
    result.save(figure, stem.with_suffix(".png"))


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
        if tag.startswith(("magnitude_above/", "sparsity/")) or tag == "epoch"
    }


def _magnitude_by_epoch(scalars: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """``magnitude_above/<tensor>`` against the epoch (Lightning's ``epoch`` scalar at the same step; the monitor
    logs once per epoch, so without it the k-th distinct step is epoch k). A resumed run's repeated step: the later
    value."""
    epoch_at = {step: value for step, value in scalars.get("epoch", [])}
    series = {}
    for tag, points in scalars.items():
        if not tag.startswith("magnitude_above/"):
            continue
        by_step = dict(points)
        steps = sorted(by_step)
        series[tag.split("/", 1)[1]] = [(epoch_at.get(step, float(k)), by_step[step]) for k, step in enumerate(steps)]
    return series


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
