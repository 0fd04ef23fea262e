"""The Selfish-RNN method as small pure functions on tensors: masks in, masks out.

Nothing here knows about Lightning, optimizers or parameter names. Every function takes a weight-shaped tensor (or a
row block of one) and returns a new bool mask (True = active) with an exact, known number of active entries, so the
engine can compose them per tensor or per gate and a new method is a new function, not a new branch.

Counts are exact everywhere: initial masks pick exactly ``round(density * numel)`` positions (not a Bernoulli draw,
which only meets the count on average), removal drops exactly ``n`` and growth adds exactly ``n``.

Every selection is "the ``n`` candidate positions with the lowest score" (:func:`lowest_positions`): magnitude
removal scores by ``|w|``, gradient and momentum growth by ``-|g|``, random growth and random masks by uniform
random scores drawn on the device from an explicit ``torch.Generator`` (the lowest ``n`` of i.i.d. uniform scores
are a uniformly random ``n``-subset). Nothing passes over every element on the host: on a GPU a selection is one
``topk``; on the CPU, where ``topk`` with a large ``k`` is slow, it is a ``kthvalue`` over the candidates' scores
and a threshold. Masks are restorable from the generator's state and identical on every DDP rank (the callback
also broadcasts rank 0's outcome); the same seed gives different masks on a CPU and on a GPU, whose generators
differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_selfish.method import shards
from lightning_selfish.method.keys import DrawStream, magnitude_keys
from lightning_selfish.method.parts import Rounding, Structure
from lightning_selfish.method.shards import Span

__all__ = [
    "adapt_threshold",
    "dense_counts",
    "erdos_renyi_counts",
    "gradient_growth",
    "lowest_positions",
    "magnitude_removal",
    "magnitude_score",
    "n_m",
    "momentum_growth",
    "negativity_removal",
    "random_growth",
    "random_mask",
    "random_score",
    "removal_count",
    "set_removal",
    "split_count",
    "uniform_block_counts",
    "threshold_removal",
    "uniform_count",
    "uniform_counts",
]


# --------------------------------------------------------------------------------------------------------------
# Initial masks and per-tensor budgets
# --------------------------------------------------------------------------------------------------------------


def uniform_count(numel: int, density: float) -> int:
    """Active weights of a tensor at the uniform density: ``round(density * numel)``, exactly."""
    return int(round(density * numel))


def random_mask(
    shape: torch.Size | Sequence[int],
    count: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """A bool mask of ``shape`` with exactly ``count`` active positions, uniformly at random.

    The random scores are drawn on the generator's device; the mask is returned on ``device`` (default: there).
    """
    numel = math.prod(shape)
    if not 0 <= count <= numel:
        raise ValueError(f"count must be in [0, {numel}] for a tensor of shape {tuple(shape)}, got {count}")
    everywhere = torch.ones(tuple(shape), dtype=torch.bool, device=generator.device)
    mask = _random_subset(everywhere, count, generator)
    return mask if device is None else mask.to(device)


def erdos_renyi_counts(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, int]:
    """Erdős–Rényi budgets: density of a tensor ∝ sum(shape) / prod(shape), total equal to the uniform total.

    The total is ``sum(round(density * numel))`` over all tensors, the same as uniform initialisation, so the two
    inits compare at the same parameter count. A tensor whose share would exceed density 1 is made dense and the
    rest is rescaled (repeated until none overflows). Fractional counts are rounded by the largest-remainder rule so
    the total is met exactly.
    """
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    target = sum(uniform_count(n, density) for n in numels.values())
    raw = {name: sum(shape) / numels[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = target - sum(numels[name] for name in dense)
        free = [name for name in numels if name not in dense]
        weight = sum(raw[name] * numels[name] for name in free)
        scale = budget / weight if weight > 0 else 0.0
        overflow = {name for name in free if scale * raw[name] > 1.0}
        if not overflow:
            break
        dense |= overflow
    exact = {name: (numels[name] if name in dense else scale * raw[name] * numels[name]) for name in numels}
    counts = {name: min(numels[name], int(math.floor(value))) for name, value in exact.items()}
    leftover = target - sum(counts.values())
    by_remainder = sorted(
        (name for name in numels if counts[name] < numels[name]),
        key=lambda name: exact[name] - counts[name],
        reverse=True,
    )
    for name in by_remainder[:leftover]:
        counts[name] += 1
    return counts


def split_count(count: int, sizes: Sequence[int]) -> list[int]:
    """Split ``count`` over blocks of the given sizes in proportion to size, exactly (largest remainder)."""
    total = sum(sizes)
    exact = [count * size / total for size in sizes]
    parts = [int(math.floor(value)) for value in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: count - sum(parts)]:
        parts[i] += 1
    return parts


# --------------------------------------------------------------------------------------------------------------
# Removal: weight and mask in, mask with exactly n fewer active positions out
# --------------------------------------------------------------------------------------------------------------


def removal_count(active: int, prune_rate: float, rounding: Rounding | str = Rounding.CEIL) -> int:
    """Weights to remove: ``ceil(prune_rate * active)``, as the authors' code does, or ``"floor"`` (RigL casts
    ``drop_fraction * active`` to an integer); see :meth:`~lightning_selfish.method.parts.Rounding.count`."""
    return Rounding(rounding).count(active, prune_rate)


def lowest_positions(score: Tensor, candidates: Tensor, n: int, span: Span | None = None) -> Tensor:
    """Bool mask of exactly ``n`` of the ``candidates`` positions: those with the lowest ``score``.

    With a ``span`` whose block is split over ranks, ``score`` and ``candidates`` are this rank's part and ``n``
    counts over all ranks: :func:`lightning_selfish.method.shards.lowest_positions` (ties to the lowest global
    position, as here on the CPU).

    Ties at the ``n``-th lowest value are broken by position (lowest flat index first) on the CPU and by ``topk``'s
    order on a GPU; NaN scores count as the highest. On a GPU this is one ``topk`` over the masked scores, without a
    host sync. On the CPU, where ``topk`` with ``k`` in the millions is slow, :func:`_lowest_on_cpu` brackets the
    answer with a sample and ranks only a narrow band of candidates.
    """
    if span is not None and span.split:
        return shards.lowest_positions(score, candidates, max(n, 0), span.start, span.collective)
    if n <= 0:
        return torch.zeros_like(candidates)
    available = int(candidates.count_nonzero())
    if n > available:
        raise ValueError(f"cannot choose {n} positions among {available} candidates")
    if n == available:
        return candidates.clone()
    if score.device.type == "cpu":
        chosen = _lowest_on_cpu(score.detach().reshape(-1), candidates.reshape(-1), n, available)
        if chosen is not None:
            return chosen.view_as(candidates)
    # topk orders NaN after every number: non-candidates become NaN, candidates' own NaN become +inf.
    flat = score.detach().flatten()
    flat = torch.where(flat.isnan(), math.inf, flat).masked_fill_(~candidates.flatten(), math.nan)
    chosen = torch.zeros_like(candidates)
    chosen.view(-1)[torch.topk(flat, n, largest=False, sorted=False).indices] = True
    return chosen


_SAMPLE = 1 << 16  # candidate scores sampled to bracket the n-th lowest one (CPU)


def _lowest_on_cpu(score: Tensor, candidates: Tensor, n: int, available: int) -> Tensor | None:
    """The ``n`` lowest-scoring candidates of flat CPU tensors, ties to the lowest index; None if NaN scores interfere.

    Selection in the style of Floyd and Rivest: the quantile ``n / available`` of a random sample of the candidates'
    scores gives a band ``[low, high)`` of six standard deviations each side, holding a few % of the candidates. Every
    candidate below the band is chosen with one comparison over the tensor; only the band's scores are gathered and
    ranked. When the sample misses (rarely) or the tensor is small, all candidates' scores are ranked instead. A few
    elementwise passes and two bool tensors, instead of a copy and a partial sort of every candidate.
    """
    chosen = torch.zeros_like(candidates)
    if score.numel() > 4 * _SAMPLE:
        picks = torch.randint(score.numel(), (_SAMPLE,), generator=torch.Generator().manual_seed(0))
        sample = score[picks][candidates[picks]].sort().values
        m = sample.numel()
        if m >= _SAMPLE // 64:
            fraction = n / available
            margin = 6.0 * math.sqrt(m * fraction * (1.0 - fraction)) + 8.0
            low_rank, high_rank = int(fraction * m - margin), int(math.ceil(fraction * m + margin))
            if low_rank >= 0:
                torch.lt(score, sample[low_rank], out=chosen).logical_and_(candidates)
            under = int(chosen.count_nonzero())
            if high_rank < m:  # (NaN sorts last: a NaN bound means no bound but the NaN scores' exclusion)
                high = sample[high_rank]
                high = high.new_tensor(math.inf) if high.isnan() else high
                band = torch.lt(score, high).logical_and_(candidates).logical_xor_(chosen)  # chosen lies inside
            else:
                band = candidates ^ chosen
            positions = band.nonzero().squeeze(1)
            if under < n <= under + positions.numel() and _choose_lowest(score, positions, n - under, chosen):
                return chosen
            chosen.zero_()
    if not _choose_lowest(score, candidates.nonzero().squeeze(1), n, chosen):
        return None
    return chosen


def _choose_lowest(score: Tensor, positions: Tensor, k: int, chosen: Tensor) -> bool:
    """Set ``chosen`` at the ``k`` of ``positions`` (ascending) with the lowest scores, ties to the earliest.

    Returns False, changing nothing, when NaN scores leave fewer than ``k`` comparable values.
    """
    values = score[positions]
    kth = torch.kthvalue(values, k).values
    below = values < kth
    ties = (values == kth).nonzero().squeeze(1)
    missing = k - int(below.count_nonzero())
    if ties.numel() < missing:  # kth is NaN
        return False
    chosen[positions[below]] = True
    chosen[positions[ties[:missing]]] = True
    return True


def _count(mask: Tensor, span: Span | None) -> int:
    """Active positions of the whole block (``mask``: its part here, or all of it)."""
    return int(mask.count_nonzero()) if span is None else span.count(mask)


def _drop_lowest(score: Tensor, mask: Tensor, n: int, span: Span | None = None) -> Tensor:
    """Deactivate the ``n`` active positions with the lowest score."""
    if n <= 0:
        return mask.clone()
    return mask & ~lowest_positions(score, mask, n, span)


def magnitude_removal(weight: Tensor, mask: Tensor, n: int, span: Span | None = None) -> Tensor:
    """Remove the ``n`` active weights of smallest magnitude (Eq. 2).

    Over a block split across ranks the selection ranks integer keys: ``|w|``'s bit patterns
    (:func:`~lightning_selfish.method.keys.magnitude_keys`, ordered as the magnitudes, NaN above every number), one
    pass instead of the keys of any float score."""
    if span is not None and span.split:
        return _drop_lowest(magnitude_keys(weight), mask, n, span)
    return _drop_lowest(weight.detach().abs(), mask, n, span)


def set_removal(weight: Tensor, mask: Tensor, n: int, span: Span | None = None) -> Tensor:
    """SET removal (Mocanu et al. 2018, ``rewireMask``): the same fraction of each sign, closest to zero.

    Of the ``n`` removals, each sign takes its share in proportion to its active weights (largest remainder, so
    exactly ``n`` go): the smallest non-negative weights and the negative weights closest to zero. Mocanu's code
    removes the fraction ζ of each sign; ``n = ceil(ζ × active)`` split this way is that rule with exact counts.
    """
    w = weight.detach()
    positive = mask & (w >= 0)
    n_positive, n_negative = _sign_counts(positive, mask, span)
    take_positive, take_negative = split_count(n, [n_positive, n_negative]) if n > 0 else (0, 0)
    kept_positive = _drop_lowest(w, positive, take_positive, span)
    kept_negative = _drop_lowest(-w, mask & (w < 0), take_negative, span)
    return kept_positive | kept_negative


def _sign_counts(positive: Tensor, mask: Tensor, span: Span | None) -> tuple[int, int]:
    """Active non-negative and negative weights of the whole block (one exchange when it is split)."""
    if span is None or not span.split:
        n_positive = int(positive.count_nonzero())
        return n_positive, int(mask.count_nonzero()) - n_positive
    counts = span.sum_(torch.stack([positive.count_nonzero(), mask.count_nonzero()]))
    n_positive, active = counts.tolist()
    return n_positive, active - n_positive


def negativity_removal(weight: Tensor, mask: Tensor, n: int, span: Span | None = None) -> Tensor:
    """SET as the Selfish-RNN authors ran it (their ``magnitude_and_negativity`` death): half of ``n``
    (``ceil(n/2)``) from the smallest non-negative weights, the rest from the *most negative* ones.

    When one sign has too few active weights the other side makes up the difference, so exactly ``n`` go.
    """
    w = weight.detach()
    positive = mask & (w >= 0)
    n_positive, n_negative = _sign_counts(positive, mask, span)
    take_positive = min(n_positive, max(n - n_negative, (n + 1) // 2))
    kept_positive = _drop_lowest(w, positive, take_positive, span)
    return kept_positive | _drop_lowest(w, mask & (w < 0), n - take_positive, span)


# --------------------------------------------------------------------------------------------------------------
# Growth: mask in, mask with exactly n more active positions out
# --------------------------------------------------------------------------------------------------------------


def _inactive(mask: Tensor, n: int, span: Span | None = None) -> Tensor:
    """The inactive positions of ``mask``, checked to number at least ``n`` (the candidates of growth)."""
    inactive = ~mask
    available = _count(inactive, span)
    if n > available:
        raise ValueError(f"cannot grow {n} weights: only {available} positions are inactive")
    return inactive


def _grow_highest(score: Tensor, mask: Tensor, n: int, span: Span | None = None) -> Tensor:
    """Activate the ``n`` inactive positions with the highest score."""
    if n <= 0:
        return mask.clone()
    return mask | lowest_positions(score.detach().neg(), _inactive(mask, n, span), n, span)


def _random_subset(candidates: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Exactly ``n`` of the candidate positions, uniformly at random: those with the ``n`` lowest of i.i.d. uniform
    scores drawn on the generator's device (so every ``n``-subset of the candidates is equally likely)."""
    if n <= 0:
        return torch.zeros_like(candidates)
    score = torch.rand(candidates.shape, generator=generator, device=generator.device).to(candidates.device)
    return lowest_positions(score, candidates, n)


def random_growth(mask: Tensor, n: int, draws: DrawStream | torch.Generator, span: Span | None = None) -> Tensor:
    """Activate ``n`` inactive positions uniformly at random (Eq. 3).

    From a run's :class:`~lightning_selfish.method.keys.DrawStream` (what the update hands it): the inactive
    positions with the lowest keys of one draw, keys of (seed, draw, global position), so the outcome is the same
    on one process and on any number of ranks holding parts of the tensor (``span``), and on a CPU and a GPU. From a
    ``torch.Generator`` (one process only): the lowest of uniform scores drawn on its device.
    """
    if isinstance(draws, DrawStream):
        if n <= 0:
            draws.take()  # (every update takes as many draws, whatever it grows)
            return mask.clone()
        keys = draws.keys(0 if span is None else span.start, mask.shape, mask.device)
        return mask | lowest_positions(keys, _inactive(mask, n, span), n, span)
    if span is not None and span.split:
        raise ValueError("random growth over a tensor split across ranks draws from a DrawStream, not a Generator")
    if n <= 0:
        return mask.clone()
    return mask | _random_subset(_inactive(mask, n), n, draws)


def gradient_growth(mask: Tensor, n: int, grad: Tensor, span: Span | None = None) -> Tensor:
    """RigL growth: activate the ``n`` inactive positions with the largest dense-gradient magnitude."""
    return _grow_highest(grad.detach().abs(), mask, n, span)


def momentum_growth(mask: Tensor, n: int, momentum: Tensor, span: Span | None = None) -> Tensor:
    """SNFS growth: activate the ``n`` inactive positions with the largest momentum magnitude."""
    return _grow_highest(momentum.detach().abs(), mask, n, span)


# --------------------------------------------------------------------------------------------------------------
# Per-tensor budgets (initial masks), and DSR's global adaptive threshold
# --------------------------------------------------------------------------------------------------------------


def uniform_counts(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, int]:
    """Every tensor at the same density: ``round(density * numel)`` each (Selfish-RNN, DSR, SNFS)."""
    return {name: uniform_count(math.prod(shape), density) for name, shape in shapes.items()}


def uniform_block_counts(count: int, sizes: Sequence[int], density: float) -> list[int]:
    """The uniform init's blocks: each at its own uniform count, so every gate starts at exactly the density."""
    return [uniform_count(size, density) for size in sizes]


def dense_counts(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, int]:
    """Every tensor fully active, whatever ``density`` (dense-to-sparse methods such as GMP start here)."""
    return {name: math.prod(shape) for name, shape in shapes.items()}


def threshold_removal(weight: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """DSR removal: deactivate every active weight with ``|w| < threshold`` (one threshold for all tensors)."""
    return mask & (weight.detach().abs() >= threshold)


def adapt_threshold(threshold: float, removed: int, expected: int, tolerance: float) -> float:
    """DSR's threshold rule: double it when fewer than ``(1 - tolerance) * expected`` weights fell below it, halve it
    when more than ``(1 + tolerance) * expected`` did, keep it otherwise (Mostafa & Wang 2019, Algorithm 1)."""
    if removed < (1.0 - tolerance) * expected:
        return threshold * 2.0
    if removed > (1.0 + tolerance) * expected:
        return threshold * 0.5
    return threshold


# --------------------------------------------------------------------------------------------------------------
# Growth scores (what a structure ranks candidates by) and the N:M structure
# --------------------------------------------------------------------------------------------------------------


def magnitude_score(mask: Tensor, signal: Tensor) -> Tensor:
    """Gradient and momentum growth rank positions by the signal's magnitude."""
    return signal.detach().abs()


def random_score(mask: Tensor, draws: DrawStream | torch.Generator, span: Span | None = None) -> Tensor:
    """Random growth ranks positions by a draw's keys (highest first: the negated keys, so that the positions it
    would grow first rank first), or by uniform draws from a generator."""
    if isinstance(draws, DrawStream):
        return draws.keys(0 if span is None else span.start, mask.shape, mask.device).float().neg_()
    return torch.rand(mask.shape, generator=draws, device=draws.device).to(mask.device)


def _check_groups(shape: Sequence[int], m: int) -> None:
    if len(shape) < 1 or shape[-1] % m:
        raise ValueError(f"an N:M structure with M={m} needs a last dimension divisible by {m}, got {tuple(shape)}")


def _in_groups(tensor: Tensor, m: int) -> Tensor:
    _check_groups(tensor.shape, m)
    return tensor.reshape(*tensor.shape[:-1], tensor.shape[-1] // m, m)


def _rank_in_group(score: Tensor) -> Tensor:
    """Each position's rank inside its group by ``score``, highest first (ties: lowest position first)."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return torch.argsort(order, dim=-1)


def n_m_initial_mask(n: int, m: int, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Exactly ``n`` active positions in every group of ``m``, uniformly at random."""
    _check_groups(shape, m)
    scores = torch.rand((*shape[:-1], shape[-1] // m, m), generator=generator, device=generator.device)
    return (_rank_in_group(scores) < n).reshape(tuple(shape))


def n_m_allowed(n: int, m: int, kept: Tensor, score: Tensor) -> Tensor:
    """The inactive positions growth may take: in every group of ``m``, the best-scored ``n - active`` of its
    inactive ones (so the best-scored candidates overall are the best set that keeps every group at most ``n``)."""
    groups = _in_groups(kept, m)
    scores = score.detach().reshape(groups.shape).float().masked_fill(groups, -math.inf)
    room = (n - groups.sum(dim=-1, keepdim=True)).clamp(min=0)
    return (~groups & (_rank_in_group(scores) < room)).reshape(kept.shape)


def n_m(n: int, m: int) -> Structure:
    """N:M sparsity along the last dimension (rows of a weight matrix): at most ``n`` active weights in every group of
    ``m`` consecutive ones, at density ``n / m`` (2:4 is what sparse tensor cores run)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"an N:M structure needs whole numbers 0 < N < M, got N={n!r}, M={m!r}")
    return Structure(
        f"{n}:{m}",
        n / m,
        initial_mask=lambda shape, generator: n_m_initial_mask(n, m, shape, generator),
        allowed=lambda kept, score: n_m_allowed(n, m, kept, score),
    )
