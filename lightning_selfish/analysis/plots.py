"""Pictures of sparse training: mask-density images (plain torch) and the paper's figures (matplotlib).

:func:`mask_density_image` needs nothing beyond torch, so the topology monitor's mask pictures work everywhere.
The figures (:func:`gate_sparsity_figure` for Figure 10, :func:`magnitude_figure` for Figure 3,
:func:`distance_heatmap` for Figure 4) need matplotlib: ``pip install "lightning-selfish[analysis]"``. They build a
``matplotlib.figure.Figure`` without pyplot (no global state, no display backend); :func:`figure_to_array` renders
one for TensorBoard and :func:`save_figure` writes it to a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_selfish.core.gates import GateLayout

# Anchors of matplotlib's viridis colour map: density 0 is dark blue, density 1 yellow.
_VIRIDIS = torch.tensor(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=torch.float32,
)
_BOUNDARY = torch.tensor([255, 255, 255], dtype=torch.float32)

__all__ = [
    "MaskImageRenderer",
    "distance_heatmap",
    "figure_to_array",
    "gate_sparsity_figure",
    "magnitude_figure",
    "mask_density_figure",
    "mask_density_grid",
    "mask_density_image",
    "matplotlib_available",
    "save_figure",
    "short_name",
    "wrap",
]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _require_matplotlib() -> None:
    if not matplotlib_available():
        raise ImportError(
            'the figures need matplotlib: pip install "lightning-selfish[analysis]" (or pip install matplotlib)'
        )


# --------------------------------------------------------------------------------------------------------------
# Mask density images (torch only)
# --------------------------------------------------------------------------------------------------------------


def _colormap(density: Tensor) -> Tensor:
    """``(H, W)`` values in [0, 1] to ``(H, W, 3)`` float RGB in [0, 255] along viridis."""
    position = density.clamp(0, 1) * (len(_VIRIDIS) - 1)
    low = position.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (position - low).unsqueeze(-1)
    return _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac


@torch.no_grad()
def mask_density_grid(
    mask: Tensor, gates: GateLayout | None = None, resolution: int = 64
) -> tuple[Tensor, list[tuple[str, int, int]]]:
    """The density of ``mask`` over a grid of row and column blocks, and each gate's ``(name, first, end)`` block rows.

    Each gate's rows are pooled separately (so no block straddles two gates) into a number of row blocks in
    proportion to its size, the columns into at most ``resolution`` blocks.
    """
    flat = mask.detach().reshape(mask.shape[0], -1).float().cpu()
    rows, cols = flat.shape
    layout = list(gates) if gates else [("", slice(0, rows))]
    col_blocks = min(cols, resolution)
    pieces, blocks, start = [], [], 0
    for name, gate_rows in layout:
        block = flat[gate_rows]
        row_blocks = max(1, min(block.shape[0], round(resolution * block.shape[0] / rows)))
        pieces.append(F.adaptive_avg_pool2d(block[None, None], (row_blocks, col_blocks))[0, 0])
        blocks.append((name, start, start + row_blocks))
        start += row_blocks
    return torch.cat(pieces), blocks


@torch.no_grad()
def mask_density_image(
    mask: Tensor, gates: GateLayout | None = None, resolution: int = 64, min_height: int = 256
) -> Tensor:
    """An ``(H, W, 3)`` uint8 picture of the density of ``mask`` (:func:`mask_density_grid`), torch only.

    Colour is density (viridis: dark blue empty, yellow full), and a white line marks every gate boundary. The grid
    is scaled up by whole pixels to at least ``min_height`` rows. No labels and no colour scale: those need
    matplotlib (:class:`MaskImageRenderer`, :func:`mask_density_figure`).
    """
    grid, blocks = mask_density_grid(mask, gates, resolution)
    height, col_blocks = grid.shape
    scale = max(1, math.ceil(min_height / height), 4 if col_blocks < 48 else 1)
    scaled = [
        _colormap(grid[first:end]).repeat_interleave(scale, 0).repeat_interleave(scale, 1) for _, first, end in blocks
    ]
    line = _BOUNDARY.expand(max(1, scale // 2), scaled[0].shape[1], 3)
    parts: list[Tensor] = []
    for k, piece in enumerate(scaled):
        if k:
            parts.append(line)
        parts.append(piece)
    return torch.cat(parts).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------------------
# Figures (matplotlib)
# --------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    _require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def wrap(text: str, width_inches: float, fontsize: float = 10.0) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize`` points (each line wrapped on its own)."""
    import textwrap

    chars = max(16, int(width_inches * 72 / (0.62 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) if line else line for line in text.split("\n"))


_TITLE_POINTS = 10.0  # fontsize "medium" at matplotlib's default 10 pt


def figure_to_array(figure: Any) -> Tensor:
    """Render a matplotlib figure to an ``(H, W, 3)`` uint8 tensor (for TensorBoard's ``add_image``)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return torch.from_numpy(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` (PNG by the file's suffix) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path)
    return path


def short_name(name: str) -> str:
    """A compact label for a parameter name: ``network.rnn.weight_hh_l0`` -> ``hh0``; others keep their last parts."""
    base = name.split(".")
    last = base[-1]
    for kind in ("ih", "hh"):
        if last.startswith(f"weight_{kind}"):
            suffix = last[len(f"weight_{kind}") :].replace("_raw", "").replace("_l", "").replace("_reverse", "r")
            return f"{kind}{suffix}"
    parts = [p for p in base if p not in ("network", "weight", "module")]
    return ".".join(parts[-2:]) or name


def gate_sparsity_figure(table: Mapping[str, Mapping[str, float]], title: str = "Final sparsity per gate") -> Any:
    """The paper's Figure 10: grouped bars of the sparsity of every gate of every recurrent tensor.

    ``table`` is :func:`lightning_selfish.analysis.gate_sparsity`'s ``{tensor: {gate: sparsity, "all": ...}}``; the
    dashed line in each group is the tensor's overall sparsity.
    """
    names = list(table)
    gates: list[str] = []
    for row in table.values():
        gates.extend(g for g in row if g != "all" and g not in gates)
    figure = _figure(max(4.0, 0.9 + 0.32 * len(names) * max(len(gates), 1)), 3.2)
    ax = figure.add_subplot()
    width = 0.8 / max(len(gates), 1)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    for k, gate in enumerate(gates):
        xs = [i + (k - (len(gates) - 1) / 2) * width for i, name in enumerate(names) if gate in table[name]]
        ys = [table[name][gate] for name in names if gate in table[name]]
        ax.bar(xs, ys, width=width * 0.95, label=gate, color=colors[k % len(colors)])
    for i, name in enumerate(names):
        if "all" in table[name]:
            ax.hlines(table[name]["all"], i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_ylim(0.0, 1.0)  # the whole range: differences between gates at their true scale
    ax.set_xticks(range(len(names)), [short_name(n) for n in names])
    ax.set_ylabel("sparsity (fraction of weights inactive)")
    ax.set_title(wrap(title, figure.get_figwidth() - 1.0), fontsize="medium")
    ax.legend(title="gate", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def magnitude_figure(
    series: Mapping[str, Sequence[tuple[float, float]]],
    compare: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    threshold: float = 0.1,
    labels: tuple[str, str] = ("run", "compared run"),
    xlabel: str = "epoch",
) -> Any:
    """The paper's Figure 3: the number of weights with magnitude above ``threshold`` over training, per tensor.

    ``series`` maps a tensor name to ``(x, count)`` points; ``compare`` (drawn dashed, same colours) is a second run,
    e.g. standard NT-ASGD against SNT-ASGD. Which run is solid and which dashed is a legend of its own below the
    axes, the run names wrapped to the figure's width.
    """
    from matplotlib.lines import Line2D

    figure = _figure(6.4, 4.2 if compare else 3.6)
    ax = figure.add_subplot()
    names = [n for n in series if n != "overall"] or list(series)
    cmap = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    few = max((len(points) for points in series.values()), default=0) <= 12
    marker = "o" if few else None
    for k, name in enumerate(names):
        color = cmap[k % len(cmap)]
        xs, ys = zip(*series[name]) if series[name] else ((), ())
        ax.plot(xs, ys, color=color, marker=marker, markersize=3, label=f"{short_name(name)}")
        if compare and compare.get(name):
            cx, cy = zip(*compare[name])
            ax.plot(cx, cy, color=color, linestyle="dashed", marker=marker, markersize=3, fillstyle="none")
    positive = [y for points in [*series.values(), *(compare or {}).values()] for _, y in points if y > 0]
    if positive and max(positive) > 50 * min(positive):  # tensors of very different sizes: keep all readable
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs
    ax.set_ylabel(f"weights with |w| > {threshold:g}")
    ax.set_title("Weights above the magnitude threshold", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), title="tensor")
    if compare:
        width = figure.get_figwidth() - 0.8
        styles = [
            Line2D([], [], color="black", label=wrap(f"solid: {labels[0]}", width, 8)),
            Line2D([], [], color="black", linestyle="dashed", label=wrap(f"dashed: {labels[1]}", width, 8)),
        ]
        figure.legend(handles=styles, loc="outside lower center", fontsize="small", frameon=False)
    return figure


def distance_heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[Any],
    title: str,
    xlabel: str = "epoch",
    marked_column: int | None = None,
) -> Any:
    """The paper's Figure 4: a heatmap of topology distances in [0, 1], rows = tensors (or gates), columns = epochs.

    The title is wrapped to the figure's width; ``marked_column`` (e.g. the reference epoch) is labelled "ref.".
    """
    data = torch.tensor(values, dtype=torch.float64).reshape(len(row_labels), len(col_labels))
    width = max(5.0, 1.8 + 0.32 * len(col_labels))
    figure = _figure(width, max(2.4, 1.4 + 0.3 * len(row_labels) + 0.18 * title.count("\n")))
    ax = figure.add_subplot()
    image = ax.imshow(data.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ticks = [str(c) + ("\nref." if k == marked_column else "") for k, c in enumerate(col_labels)]
    ax.set_xticks(range(len(col_labels)), ticks, fontsize="small")
    ax.set_yticks(range(len(row_labels)), list(row_labels), fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_title(wrap(title, width - 1.2, _TITLE_POINTS), fontsize="medium")
    figure.colorbar(image, ax=ax, label="distance")
    return figure


# --------------------------------------------------------------------------------------------------------------
# Labelled mask pictures (matplotlib)
# --------------------------------------------------------------------------------------------------------------


def _mask_axes(ax: Any, grid_shape: tuple[int, int], blocks: Sequence[tuple[str, int, int]], columns: int) -> None:
    ax.set_yticks([(first + end) / 2 - 0.5 for _, first, end in blocks], [name or "rows" for name, _, _ in blocks])
    ax.set_ylabel("gate" if len(blocks) > 1 else "")
    ax.set_xticks([])
    ax.set_xlabel(f"inputs ({columns} columns in {grid_shape[1]} blocks)", fontsize="small")


def mask_density_figure(mask: Tensor, gates: GateLayout | None = None, title: str = "", resolution: int = 64) -> Any:
    """A labelled picture of the density of ``mask``: gates named on the left, white lines between them, colour scale.

    What TensorBoard's ``masks/<param>`` images show (:class:`MaskImageRenderer`), as a figure for a file.
    """
    grid, blocks = mask_density_grid(mask, gates, resolution)
    figure = _figure(4.2, 3.6)
    ax = figure.add_subplot()
    image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    for _, first, _ in blocks[1:]:
        ax.axhline(first - 0.5, color="white", linewidth=1.5)
    _mask_axes(ax, tuple(grid.shape), blocks, mask.reshape(mask.shape[0], -1).shape[1])
    ax.set_title(wrap(title, 3.0, _TITLE_POINTS), fontsize="medium")
    figure.colorbar(image, ax=ax, label="density (fraction active)")
    return figure


class MaskImageRenderer:
    """Labelled mask pictures (:func:`mask_density_figure`) at the speed of the plain ones.

    The frame (title, gate labels, colour scale) is drawn by matplotlib once per tensor and grid shape; every
    picture pastes the density grid, coloured with the colour scale's own colour map, into it: about a millisecond
    instead of a hundred for a whole figure, so the monitor can picture every topology update.
    """

    def __init__(self, resolution: int = 64) -> None:
        _require_matplotlib()
        self.resolution = resolution
        self._frames: dict[tuple, tuple[Tensor, tuple[int, int, int, int], Tensor]] = {}

    def __call__(self, name: str, mask: Tensor, gates: GateLayout | None = None) -> Tensor:
        """An ``(H, W, 3)`` uint8 picture of ``mask`` titled ``name``."""
        grid, blocks = mask_density_grid(mask, gates, self.resolution)
        columns = mask.reshape(mask.shape[0], -1).shape[1]
        key = (name, tuple(grid.shape), tuple(blocks), columns)
        if key not in self._frames:
            self._frames[key] = self._frame(name, tuple(grid.shape), blocks, columns)
        frame, (top, bottom, left, right), colours = self._frames[key]
        height, width = bottom - top, right - left
        index = (grid.clamp(0, 1) * (len(colours) - 1)).round().long()
        rows = (torch.arange(height) * grid.shape[0]) // height
        cols = (torch.arange(width) * grid.shape[1]) // width
        picture = frame.clone()
        picture[top:bottom, left:right] = colours[index[rows][:, cols]]
        for _, first, _ in blocks[1:]:  # white lines between the gates
            y = top + round(first * height / grid.shape[0])
            picture[max(top, y - 1) : y + 1, left:right] = 255
        return picture

    def _frame(self, name: str, shape: tuple[int, int], blocks, columns: int):
        import numpy as np
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        figure = _figure(4.2, 3.6)
        ax = figure.add_subplot()
        image = ax.imshow(np.zeros(shape), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        _mask_axes(ax, shape, blocks, columns)
        ax.set_title(wrap(short_name(name) if len(name) > 40 else name, 3.0, _TITLE_POINTS), fontsize="medium")
        figure.colorbar(image, ax=ax, label="density (fraction active)")
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        pixels = torch.from_numpy(np.asarray(canvas.buffer_rgba())[..., :3].copy())
        box = ax.get_window_extent()
        total = pixels.shape[0]
        area = (math.ceil(total - box.y1), math.floor(total - box.y0), math.ceil(box.x0), math.floor(box.x1))
        colours = torch.from_numpy((colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round()).to(torch.uint8)
        return pixels, area, colours
