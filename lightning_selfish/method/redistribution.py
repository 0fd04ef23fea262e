"""Redistribution: how many weights each tensor (across layers) or each gate (inside a tensor) regrows.

Sparse-to-sparse methods regrow exactly as many weights as they removed. Without redistribution every tensor (and
under the per-gate ablation every gate) regrows its own removals. With it, the total is shared out by a score:

* across layers: ``"nonzeros"`` (DSR: in proportion to each tensor's surviving weights after removal) and
  ``"momentum"`` (SNFS: in proportion to the mean momentum magnitude of each tensor's active weights);
* across the gates of a stacked recurrent tensor (the paper's Table 6 variants of cell-gate redistribution):
  ``"magnitude"`` (mean |w| of each gate's active weights) and ``"gradient"`` (mean |grad| of the same).

Shares are exact (:func:`allocate_counts`): integer counts that add up to the total, proportional to the scores by
the largest-remainder rule, none above its tensor's free room. The authors' code instead iterates ``ceil(score x
total)`` with a 0.99 cap and an exponentially smoothed residual, which only meets the total approximately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from lightning_selfish.method.shards import Span

__all__ = [
    "allocate_counts",
    "gate_gradient_score",
    "gate_magnitude_score",
    "mean_active_magnitude",
    "momentum_score",
    "nonzeros_score",
]


def allocate_counts(total: int, scores: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``scores``, each at most its ``cap``, summing to ``total``.

    Water-filling: a part whose proportional share reaches its cap gets the cap and the rest is shared again among
    the others; the final shares are rounded by the largest remainder (ties to the lower index). Arithmetic is in
    exact fractions, so the result depends only on the inputs. Scores that are negative, NaN or infinite count as
    0; when every part still open has score 0, the rest is shared in proportion to the free room (``caps``).
    """
    if len(scores) != len(caps):
        raise ValueError(f"allocate_counts: {len(scores)} scores for {len(caps)} caps")
    if any(cap < 0 for cap in caps):
        raise ValueError(f"allocate_counts: caps must be >= 0, got {list(caps)}")
    if not 0 <= total <= sum(caps):
        raise ValueError(f"allocate_counts: total must be in [0, {sum(caps)}] (the sum of the caps), got {total}")
    weights = [Fraction(s) if math.isfinite(s) and s > 0 else Fraction(0) for s in scores]
    counts = [0] * len(caps)
    open_parts = [i for i, cap in enumerate(caps) if cap > 0]
    remaining = total
    shares: dict[int, Fraction] = {}
    while open_parts and remaining > 0:
        basis = weights if sum(weights[i] for i in open_parts) > 0 else [Fraction(c) for c in caps]
        weight_sum = sum(basis[i] for i in open_parts)
        shares = {i: remaining * basis[i] / weight_sum for i in open_parts}
        full = [i for i in open_parts if shares[i] >= caps[i]]
        if not full:
            break
        for i in full:
            counts[i] = caps[i]
            remaining -= caps[i]
        open_parts = [i for i in open_parts if i not in full]
        shares = {}
    if remaining > 0 and shares:
        floors = {i: math.floor(share) for i, share in shares.items()}
        for i, value in floors.items():
            counts[i] = value
        leftover = remaining - sum(floors.values())
        for i in sorted(shares, key=lambda i: (-(shares[i] - floors[i]), i))[:leftover]:
            counts[i] += 1
    return counts


# --------------------------------------------------------------------------------------------------------------
# Signals: what a score or a growth criterion reads
# --------------------------------------------------------------------------------------------------------------


def mean_active_magnitude(values: Tensor, mask: Tensor, span: Span | None = None) -> float:
    """Mean of ``|values|`` over the active positions of ``mask`` (0 when none is active). One host read; over a
    block split across ranks (``span``), of the sums and counts of every rank's part."""
    if span is None or not span.split:
        active = int(mask.sum())
        if active == 0:
            return 0.0
        return float((values.detach().abs() * mask).sum()) / active
    sums = torch.stack([(values.detach().abs() * mask).sum().double(), mask.sum().double()])
    total, active = span.sum_(sums).tolist()
    return total / active if active else 0.0


# --------------------------------------------------------------------------------------------------------------
# Scores (the parts that use them are registered in lightning_selfish.method.catalogue)
# --------------------------------------------------------------------------------------------------------------


def nonzeros_score(old: Tensor, kept: Tensor, signal: Tensor | None, span: Span | None = None) -> float:
    """DSR across layers: a tensor's surviving weights after removal."""
    return float(int(kept.sum()) if span is None else span.count(kept))


def momentum_score(old: Tensor, kept: Tensor, signal: Tensor | None, span: Span | None = None) -> float:
    """SNFS across layers: the mean momentum magnitude of a tensor's active weights (before removal)."""
    assert signal is not None  # (the part reads "momentum": the engine hands it in)
    return mean_active_magnitude(signal, old, span)


def gate_magnitude_score(weight: Tensor, old: Tensor, gradient: Tensor | None, span: Span | None = None) -> float:
    """Table 6 across gates: the mean |w| of a gate's active weights."""
    return mean_active_magnitude(weight, old, span)


def gate_gradient_score(weight: Tensor, old: Tensor, gradient: Tensor | None, span: Span | None = None) -> float:
    """Table 6 across gates: the mean |dense gradient| of a gate's active weights."""
    assert gradient is not None  # (the part reads "gradient": the engine hands it in)
    return mean_active_magnitude(gradient, old, span)
