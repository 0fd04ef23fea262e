"""What ``selfish-rnn analyze`` writes: the distance tables and figures, the magnitude and gate-sparsity figures
from the run's TensorBoard scalars, and the mask pictures."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_selfish import analysis
from lightning_selfish.analysis import plots
from lightning_selfish.callbacks.history import MaskSnapshot, load_mask_snapshot
from lightning_selfish_recipes.tools.topology_sources import POOR_MATCHING, AnalyzeError, DistanceRow

PAPER_REFERENCE_EPOCH = 4  # "We start alignment at the 5th epoch" (Appendix J), counting from 0 here


@dataclass
class Analysis:
    """What :func:`analyze` did: the files written, what it left out or warns about, and the figures drawn."""

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib Figure

    def save(self, figure: Any, path: Path) -> None:
        self.figures[path.name] = figure
        self.written.append(plots.save_figure(figure, path))


def magnitude_figure(
    result: Analysis, scalars: dict, run: Path, compare: Path | None, out: Path, threshold: float
) -> None:
    series = _magnitude_by_epoch(scalars)
    if not series:
        return
    if max(len(points) for points in series.values()) < 2:
        result.notes.append(
            "magnitude.png left out: the run logged the weights above the threshold for one epoch; a curve needs two"
        )
        return
    other = _magnitude_by_epoch(read_scalars(Path(compare))) if compare is not None else {}
    figure = plots.magnitude_figure(
        series,
        other or None,
        threshold=threshold,
        labels=(_label(run), _label(Path(compare)) if compare else ""),
        xlabel="epoch",
    )
    result.save(figure, out / "magnitude.png")


def gate_sparsity_outputs(result: Analysis, scalars: dict, history: dict[int, MaskSnapshot], out: Path) -> None:
    table = _gate_table_from_scalars(scalars)
    if not table and history:
        last = history[max(history)]
        table = analysis.gate_sparsity(last.masks, last.gates)
    if table:
        result.save(plots.gate_sparsity_figure(table), out / "gate_sparsity.png")
        markdown = out / "gate_sparsity.md"
        markdown.write_text(analysis.gate_sparsity_markdown(table))
        result.written.append(markdown)


def mask_pictures(result: Analysis, run: Path, history: dict[int, MaskSnapshot], out: Path) -> None:
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


def choose_reference_epoch(epochs: list[int], requested: int | None) -> int:
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


def write_distances(
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


def read_scalars(run: Path) -> dict[str, list[tuple[float, float]]]:
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
