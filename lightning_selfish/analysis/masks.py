"""What sparse training did: topology distances, exploration and gate breakdowns as pure functions on bool masks.

The paper's analyses (Selfish-RNN, Section 5 and Appendices J, K, M), with no Lightning and no plotting:

* **Topology distance** (Appendix J). The units of two networks are aligned by the *semi-matching* of Li et al.
  (2016, "Convergent learning"): every unit of one network is paired with the unit of the other whose activations
  over the same data correlate most with its own (several units may pick the same partner; a one-to-one matching
  would be the "bipartite" variant of the same paper). After alignment, the two sparse topologies are compared
  with a graph edit distance (GED) scaled to [0, 1]: per unit, the edges into it that one network has and the
  other does not, over the edges either has (``|A Δ B| / |A ∪ B|``, 0 when neither has any), averaged over units.
  This is the normalised edit distance of the authors' own NNSTD code (Liu et al. 2020, "Topological insights
  into sparse neural networks"), which Appendix J builds on; there, units were aligned by the edit distance
  itself, here (as in Appendix J) by activations, with the edit-distance alignment kept as a data-free option.
  Since a semi-matching is not symmetric, the distance is the mean of both directions, so ``d(a, b) == d(b, a)``.
* **Mask distance**: the same GED with units paired by position (no alignment, no data), the natural measure for
  one network over time.
* A unit of a stacked recurrent tensor (rows ``[i | f | g | o]`` for an LSTM) is one hidden unit: its incoming
  edges are its row in every gate. Per gate, the rows of that gate are the units.
* **Exploration** (in-time over-parameterisation, Liu et al. 2021): the fraction of positions active at least once
  since the start, and the share of the current mask that was not active at the start.
* Bit-packed masks, eight positions per byte, for saving a mask per epoch cheaply.

Everything is vectorised: per-unit distances are elementwise reductions, the all-pairs edit distance and the
activation correlations are matrix products, so a 1500-unit stacked LSTM takes seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_selfish.core.gates import GateLayout
from lightning_selfish.core.sharding import RowShard
from lightning_selfish.method.shards import Span

__all__ = [
    "CONSTANT_SPREAD",
    "CorrelationAccumulator",
    "chance_distance",
    "correlation_matrix",
    "exploration_report",
    "gate_sparsity",
    "gate_sparsity_markdown",
    "magnitude_above",
    "match_quality",
    "mask_distance",
    "pack_mask",
    "pack_masks",
    "pairwise_edit_distance",
    "row_edit_distance",
    "semi_matching",
    "topology_distance",
    "unit_count",
    "unit_view",
    "unpack_mask",
    "unpack_masks",
]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------------------
# Bit-packed masks
# --------------------------------------------------------------------------------------------------------------


def pack_mask(mask: Tensor) -> dict[str, Any]:
    """A bool mask as ``{"shape": [...], "bits": uint8 tensor}``, eight positions per byte (on the CPU)."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": bits}


def unpack_mask(packed: Mapping[str, Any]) -> Tensor:
    """The bool mask that :func:`pack_mask` packed."""
    shape = [int(s) for s in packed["shape"]]
    numel = 1
    for size in shape:
        numel *= size
    bits = packed["bits"].to(torch.uint8)
    flat = (bits.unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)).ne(0).reshape(-1)[:numel]
    return flat.view(shape)


def pack_masks(masks: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    return {name: pack_mask(mask) for name, mask in masks.items()}


def unpack_masks(packed: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
    return {name: unpack_mask(value) for name, value in packed.items()}


# --------------------------------------------------------------------------------------------------------------
# Units of a (stacked) tensor
# --------------------------------------------------------------------------------------------------------------


def _equal_gates(mask: Tensor, gates: GateLayout | None) -> int:
    """Rows per gate when ``gates`` splits dim 0 into two or more equal blocks (one row per unit per gate), else 0."""
    if not gates or len(gates) < 2:
        return 0
    sizes = {rows.stop - rows.start for _, rows in gates}
    if len(sizes) != 1:
        return 0
    size = sizes.pop()
    return size if size * len(gates) == mask.shape[0] else 0


def unit_count(mask: Tensor, gates: GateLayout | None = None) -> int:
    """Units of a tensor: hidden units of a stacked tensor with equal gates, rows otherwise."""
    return _equal_gates(mask, gates) or mask.shape[0]


def unit_view(mask: Tensor, gates: GateLayout | None = None) -> Tensor:
    """``(units, incoming)``: one row per unit holding every edge into it.

    For a stacked tensor with equal gates, unit ``k`` gathers row ``k`` of every gate; otherwise each row of the
    tensor (flattened beyond dim 0) is a unit.
    """
    flat = mask.reshape(mask.shape[0], -1)
    size = _equal_gates(mask, gates)
    if not size:
        return flat
    return flat.reshape(len(gates), size, -1).transpose(0, 1).reshape(size, -1)


def _aligned(mask: Tensor, gates: GateLayout | None, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """``mask`` seen through another network's units: unit ``k`` becomes unit ``rows[k]``, column ``c`` ``cols[c]``."""
    flat = mask.reshape(mask.shape[0], -1)
    if cols is not None:
        flat = flat[:, cols.to(flat.device)]
    if rows is None:
        return flat
    rows = rows.to(flat.device)
    size = _equal_gates(mask, gates)
    if not size:
        return flat[rows]
    return flat.reshape(len(gates), size, -1)[:, rows].reshape(len(gates) * rows.numel(), -1)


# --------------------------------------------------------------------------------------------------------------
# Graph edit distance
# --------------------------------------------------------------------------------------------------------------


def row_edit_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per row ``i``: ``|A_i Δ B_i| / |A_i ∪ B_i|`` for bool ``a``, ``b`` of the same shape (0 where both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"row_edit_distance needs masks of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    inter = (a & b).sum(dim=1)
    union = (a | b).sum(dim=1)
    return torch.where(union > 0, (union - inter).double() / union.clamp(min=1).double(), 0.0)


def pairwise_edit_distance(a: Tensor, b: Tensor) -> Tensor:
    """``(rows of a, rows of b)``: :func:`row_edit_distance` of every pair of rows, by one matrix product.

    Counts are summed in float64 (exact for any realistic row length).
    """
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"pairwise_edit_distance needs rows of one length, got {a.shape[1]} and {b.shape[1]}")
    af, bf = a.double(), b.double()
    inter = af @ bf.T
    union = af.sum(dim=1, keepdim=True) + bf.sum(dim=1).unsqueeze(0) - inter
    return torch.where(union > 0, (union - inter) / union.clamp(min=1), 0.0)


def _one_way(
    a: Tensor, b: Tensor, gates: GateLayout | None, rows: Tensor | None, cols: Tensor | None
) -> dict[str, float]:
    b_seen = _aligned(b, gates, rows, cols)
    a_flat = a.reshape(a.shape[0], -1)
    if b_seen.shape != a_flat.shape:
        raise ValueError(
            f"the alignment maps a tensor of shape {tuple(b.shape)} to {tuple(b_seen.shape)}, "
            f"but the other tensor has shape {tuple(a_flat.shape)}"
        )
    result = {"all": float(row_edit_distance(unit_view(a_flat, gates), unit_view(b_seen, gates)).mean())}
    for gate, gate_rows in gates or []:
        result[gate] = float(row_edit_distance(a_flat[gate_rows], b_seen[gate_rows]).mean())
    return result


def topology_distance(
    a: Tensor,
    b: Tensor,
    gates: GateLayout | None = None,
    *,
    rows_ab: Tensor | None = None,
    cols_ab: Tensor | None = None,
    rows_ba: Tensor | None = None,
    cols_ba: Tensor | None = None,
) -> dict[str, float]:
    """Graph edit distance in [0, 1] between two aligned sparse topologies of one tensor; per gate too.

    ``a`` and ``b`` are bool masks ``(rows, ...)``. ``rows_ab[k]`` is the unit of ``b`` paired with unit ``k`` of
    ``a`` (see :func:`unit_count`), ``cols_ab[c]`` the input column of ``b`` paired with column ``c`` of ``a`` (the
    previous layer's units); ``rows_ba``/``cols_ba`` the other way round. None pairs by position. Returns
    ``{"all": d, <gate>: d, ...}``, each the mean of the two directions (so the distance is symmetric): 0 for
    identical topologies, 1 when no unit shares an edge with its partner.
    """
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"topology_distance needs masks with 2 or more dims, got {a.dim()} and {b.dim()}")
    forward = _one_way(a.bool(), b.bool(), gates, rows_ab, cols_ab)
    backward = _one_way(b.bool(), a.bool(), gates, rows_ba, cols_ba)
    return {key: (forward[key] + backward[key]) / 2 for key in forward}


def mask_distance(a: Tensor, b: Tensor, gates: GateLayout | None = None) -> dict[str, float]:
    """:func:`topology_distance` with units paired by position: needs no data; for one network over time."""
    if a.dim() < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    return topology_distance(a, b, gates)


def chance_distance(a: Tensor, b: Tensor, gates: GateLayout | None = None) -> dict[str, float]:
    """The distance two *unrelated* random topologies with the densities of ``a`` and ``b`` would have, per part.

    For independent random masks of densities ``p`` and ``q``, a unit with ``n`` incoming positions has
    ``r = p + q - pq`` of them in the union on average, a fraction ``s / r`` of which (``s = p + q - 2pq``) in the
    symmetric difference, and distance 0 when its union is empty (probability ``(1 - r)^n``). Its expected edit
    distance is therefore ``(s / r) * (1 - (1 - r)^n)``: ``2(1 - d) / (2 - d)`` at equal density ``d`` for long
    rows (0.80 at the paper's sparsity 0.67, 0.67 at sparsity 0.5), less for short sparse rows (0.85, not 0.97,
    at density 0.05 and 20 positions). ``n`` is the length of a unit's row: every gate's row of a hidden unit for
    ``"all"`` (:func:`unit_view`), the columns for a gate. A measured distance near it means the two topologies
    share no more than chance does.
    """

    def level(x: Tensor, y: Tensor) -> float:
        p, q = float(x.float().mean()), float(y.float().mean())
        union = p + q - p * q
        if union <= 0:
            return 0.0
        return (p + q - 2 * p * q) / union * (1.0 - (1.0 - union) ** x.shape[1])

    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    result = {"all": level(unit_view(a2, gates), unit_view(b2, gates))}
    for gate, rows in gates or []:
        result[gate] = level(a2[rows], b2[rows])
    return result


# --------------------------------------------------------------------------------------------------------------
# Unit alignment (Li et al. 2016)
# --------------------------------------------------------------------------------------------------------------


def correlation_matrix(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation ``(units of x, units of y)`` of activations ``x (samples, n1)`` and ``y (samples, n2)``.

    A unit that never varies correlates 0 with everything.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"correlation_matrix needs (samples, units) activations over the same samples, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    accumulator = CorrelationAccumulator()
    accumulator.update(x, y)
    return accumulator.correlation()


#: A unit whose spread is below this fraction of its magnitude (root mean square) is constant: float32
#: activations cannot resolve a finer spread.
CONSTANT_SPREAD = 1e-6


class CorrelationAccumulator:
    """Streams activation batches of two networks and returns their unit-by-unit Pearson correlation.

    Sums are kept in float64 on the activations' device: ``(n1, n2)`` memory, independent of the data size. They are
    taken around each unit's mean over the first batch, so a unit with a large mean and a small spread keeps its
    spread (raw sums would lose it to cancellation). A unit whose spread is below :data:`CONSTANT_SPREAD` of its
    magnitude never varies: it correlates 0 with everything.
    """

    def __init__(self) -> None:
        self.count = 0
        self._cx = self._cy = None  # the shift: each unit's mean over the first batch
        self._sx = self._sy = self._sxx = self._syy = self._sxy = None

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"activations of {x.shape[0]} and {y.shape[0]} samples: give the same samples to both")
        if self._cx is None:
            self._cx, self._cy = x.mean(0), y.mean(0)
        x, y = x - self._cx, y - self._cy
        if self._sx is None:
            self._sx, self._sy = x.sum(0), y.sum(0)
            self._sxx, self._syy, self._sxy = (x * x).sum(0), (y * y).sum(0), x.T @ y
        else:
            self._sx += x.sum(0)
            self._sy += y.sum(0)
            self._sxx += (x * x).sum(0)
            self._syy += (y * y).sum(0)
            self._sxy += x.T @ y
        self.count += x.shape[0]

    def correlation(self) -> Tensor:
        if self._sx is None or self.count < 2:
            raise ValueError("CorrelationAccumulator needs at least 2 samples")
        n = self.count
        cov = self._sxy - torch.outer(self._sx, self._sy) / n
        var_x = (self._sxx - self._sx**2 / n).clamp(min=0)
        var_y = (self._syy - self._sy**2 / n).clamp(min=0)
        varies = torch.outer(_varies(var_x, self._sx, self._cx, n), _varies(var_y, self._sy, self._cy, n))
        scale = torch.outer(var_x.sqrt(), var_y.sqrt())
        return torch.where(varies, cov / scale.clamp(min=1e-300), 0.0)


def _varies(var: Tensor, shifted_sum: Tensor, shift: Tensor, n: int) -> Tensor:
    """Units whose variance is above :data:`CONSTANT_SPREAD` squared of their mean square."""
    mean = shift + shifted_sum / n
    return var / n > CONSTANT_SPREAD**2 * (mean * mean + var / n)


def semi_matching(similarity: Tensor) -> Tensor:
    """Li et al.'s semi-matching: for each row unit, the column unit it is most similar to.

    With a correlation matrix this pairs units by maximum activation correlation; with ``-pairwise_edit_distance``
    it pairs them by the nearest topology (no data needed). Ties go to the unit's own position when it is among the
    best (so a unit that correlates with nothing, a constant one, keeps its position), else to the lowest index.
    """
    best = similarity.argmax(dim=1)
    n = min(similarity.shape)
    own = torch.arange(n, device=similarity.device)
    own_is_best = similarity[own, own] >= similarity[:n].max(dim=1).values
    best[:n] = torch.where(own_is_best, own, best[:n])
    return best


def match_quality(similarity: Tensor, matching: Tensor) -> dict[str, float]:
    """How good a semi-matching is: ``distinct`` partners (of ``units``), their fraction, the mean similarity.

    A collapsed matching (many units paired with the same few partners) cannot align two topologies: the
    distance it gives compares each unit with somebody else's edges.
    """
    units = similarity.shape[0]
    distinct = int(torch.unique(matching).numel())
    mean = float(similarity.gather(1, matching.view(-1, 1)).mean()) if units else 0.0
    return {"units": units, "distinct": distinct, "distinct_fraction": distinct / max(units, 1), "mean": mean}


# --------------------------------------------------------------------------------------------------------------
# Monitoring quantities
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def exploration_report(
    ever_active: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    initial: Mapping[str, Tensor],
    gates: Mapping[str, GateLayout] | None = None,
    shards: Mapping[str, RowShard] | None = None,
) -> dict[str, float]:
    """Exploration per tensor, per gate and overall, as logged by the topology monitor.

    * ``exploration/<name>[/<gate>]``, ``exploration/overall``: fraction of positions active at least once.
    * ``drift/<name>[/<gate>]``, ``drift/overall``: fraction of the currently active positions that were inactive in
      the initial mask (0 when nothing is active; 0 throughout for a mask that starts dense).

    ``shards`` says, of masks that are a rank's rows of a tensor split over ranks (FSDP2), which rows they are
    (:class:`~lightning_selfish.core.sharding.RowShard`; ``gates`` are row blocks of the whole tensor): the counts
    are of the whole tensors, each summed over its ranks (one small all-reduce per tensor: every rank calls this).
    Counts use ``count_nonzero`` (far faster than a bool ``sum`` on the CPU) and come back in one host sync.
    """
    gates = gates or {}
    shards = shards or {}
    blocks: list[tuple[str, str]] = []  # (report key, tensor name)
    counts: list[Tensor] = []
    numels: list[int] = []
    for name, ever in ever_active.items():
        now = current[name]
        new = now & ~initial[name]
        shard = shards.get(name)
        parts: list[Tensor] = []
        for key, rows in [(name, slice(None)), *((f"{name}/{gate}", rows) for gate, rows in gates.get(name, ()))]:
            if shard is None:
                local, numel = rows, ever[rows].numel()
            else:
                local, span = shard.block(rows)
                numel = span.numel
            blocks.append((key, name))
            parts += [torch.count_nonzero(mask[local]) for mask in (ever, now, new)]
            numels.append(numel)
        stacked = torch.stack(parts)
        counts.append(stacked if shard is None else shard.span.sum_(stacked))
    values = torch.cat(counts).view(-1, 3).tolist() if counts else []
    report: dict[str, float] = {}
    ever_total = numel_total = new_total = active_total = 0
    for (key, name), (ever_count, active, new_count), numel in zip(blocks, values, numels):
        report[f"exploration/{key}"] = ever_count / max(numel, 1)
        report[f"drift/{key}"] = new_count / active if active else 0.0
        if key == name:
            ever_total, numel_total = ever_total + ever_count, numel_total + numel
            new_total, active_total = new_total + new_count, active_total + active
    report["exploration/overall"] = ever_total / numel_total if numel_total else 0.0
    report["drift/overall"] = new_total / active_total if active_total else 0.0
    return report


@torch.no_grad()
def magnitude_above(
    params: Mapping[str, Tensor], threshold: float, spans: Mapping[str, Span] | None = None
) -> dict[str, int]:
    """Per tensor, the number of weights with ``|w| > threshold`` (the paper's Figure 3), and their ``overall`` sum.

    ``spans``: of tensors that are a rank's rows of a tensor split over ranks (FSDP2), where they lie
    (``SparseTensor.span``); their counts are summed over the ranks (every rank calls this). One host sync.
    """
    names = list(params)
    if not names:
        return {"overall": 0}
    spans = spans or {}
    counts = [torch.count_nonzero(params[name].detach().abs() > threshold).reshape(1) for name in names]
    counts = [spans[name].sum_(count) if name in spans else count for name, count in zip(names, counts)]
    result = dict(zip(names, (int(c) for c in torch.cat(counts).tolist())))
    result["overall"] = sum(result.values())
    return result


def gate_sparsity(masks: Mapping[str, Tensor], gates: Mapping[str, GateLayout]) -> dict[str, dict[str, float]]:
    """``{tensor: {gate: sparsity, ..., "all": sparsity}}`` for every tensor with a gate layout (Figure 10)."""
    table: dict[str, dict[str, float]] = {}
    for name, layout in gates.items():
        if name not in masks:
            continue
        mask = masks[name]
        row = {gate: 1.0 - float(mask[rows].float().mean()) for gate, rows in layout}
        row["all"] = 1.0 - float(mask.float().mean())
        table[name] = row
    return table


def gate_sparsity_markdown(table: Mapping[str, Mapping[str, float]], digits: int = 3) -> str:
    """The gate-sparsity breakdown as a markdown table: one row per tensor, one column per gate, then the tensor."""
    gates: list[str] = []
    for row in table.values():
        gates.extend(gate for gate in row if gate != "all" and gate not in gates)
    lines = [
        "| tensor | " + " | ".join(gates) + " | whole tensor |",
        "|---|" + "---:|" * (len(gates) + 1),
    ]
    for name, row in table.items():
        cells = [f"{row[g]:.{digits}f}" if g in row else "" for g in gates]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('all', float('nan')):.{digits}f} |")
    return "\n".join(lines) + "\n"
