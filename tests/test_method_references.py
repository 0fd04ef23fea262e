"""One full update of every preset against a reference written here from its own paper's rule (docs/methods.md,
"Each preset against its paper"), under SGD with momentum and under Adam, on small tensors.

The reference is naive on purpose: Python sorts over (score, position) pairs, the counts by the rule's own formula,
the optimizer state by the rule the preset follows. Random growth is "the n candidates with the lowest keys of one
draw of the run's DrawStream, tensor by tensor", a key being the hash of (seed, draw, position) that
lightning_selfish.method.keys.position_keys documents, computed here on Python integers one position at a time.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lightning_selfish.core.engine import SparseEngine, UpdateContext
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.keys import DrawStream
from lightning_selfish.method.parts import UpdateAmount

SHAPES = {"a": (6, 5), "b": (4, 5)}
RATE, THRESHOLD, TARGET = 0.3, 0.5, 0.4


# --------------------------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------------------------


def lowest(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> set[int]:
    """The n candidate positions (flat) with the lowest scores, ties to the lower position."""
    ranked = sorted((float(scores.flatten()[i]), i) for i in range(candidates.numel()) if candidates.flatten()[i])
    return {i for _, i in ranked[:n]}


def largest_remainder(total: int, scores: list[float]) -> list[int]:
    exact = [Fraction(total) * Fraction(s) / sum(Fraction(x) for x in scores) for s in scores]
    parts = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (-(exact[i] - parts[i]), i))[: total - sum(parts)]:
        parts[i] += 1
    return parts


def reference_removal(method: str, w: torch.Tensor, mask: torch.Tensor, n: int) -> set[int]:
    """The flat positions a preset's removal takes (count-based presets)."""
    flat_w, active = w.flatten(), mask.flatten()
    if method in ("set", "set_selfish_rnn"):
        pos = [i for i in range(w.numel()) if active[i] and flat_w[i] >= 0]
        neg = [i for i in range(w.numel()) if active[i] and flat_w[i] < 0]
        if method == "set":  # Mocanu: the same fraction of each sign, closest to zero
            take_pos, take_neg = largest_remainder(n, [len(pos), len(neg)]) if n else (0, 0)
            neg_order = sorted(neg, key=lambda i: (-float(flat_w[i]), i))
        else:  # the authors': ceil(n/2) smallest non-negative, the rest most negative
            take_pos = min(len(pos), max(n - len(neg), (n + 1) // 2))
            take_neg = n - take_pos
            neg_order = sorted(neg, key=lambda i: (float(flat_w[i]), i))
        pos_order = sorted(pos, key=lambda i: (float(flat_w[i]), i))
        return set(pos_order[:take_pos]) | set(neg_order[:take_neg])
    return lowest(w.abs(), mask, n)


_MASK64, _MASK32 = 2**64 - 1, 2**32 - 1


def _splitmix64(value: int) -> int:
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _murmur_finaliser(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def naive_position_key(seed: int, draw: int, position: int) -> int:
    """The documented key: a Weyl step of the position plus the draw's first offset, MurmurHash3's finaliser, xor
    the second offset, the finaliser again; as a signed 32-bit integer."""
    offsets = _splitmix64(_splitmix64(seed) ^ _splitmix64(draw ^ 0x5851F42D4C957F2D))
    first, second = offsets & _MASK32, (offsets >> 32) & _MASK32
    x = _murmur_finaliser((position * 0x9E3779B9 + first) & _MASK32) ^ second
    x = _murmur_finaliser(x)
    return x - 2**32 if x >= 2**31 else x


def naive_keys(seed: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([naive_position_key(seed, draw, i) for i in range(math.prod(shape))]).view(shape)


def reference_update(method, optimizer_name, weights, masks, grads, state, draw_seed) -> tuple[dict, dict, dict]:
    """(new masks, new weights, new optimizer state) of one update of ``method`` at RATE (GMP: to TARGET)."""
    new_masks, new_weights, new_state = {}, {}, {}
    removed, kept = {}, {}
    for name, w in weights.items():
        active = int(masks[name].sum())
        if method == "dsr":  # every active weight below one global threshold
            gone = {i for i in range(w.numel()) if masks[name].flatten()[i] and abs(float(w.flatten()[i])) < THRESHOLD}
        elif method == "gmp":  # down to round(density * numel) by magnitude
            gone = lowest(w.abs(), masks[name], active - round(TARGET * w.numel()))
        elif method == "rigl":  # floor(drop_fraction * active)
            gone = reference_removal(method, w, masks[name], math.floor(RATE * active + 1e-9))
        else:  # ceil(p * active), the authors' count
            gone = reference_removal(method, w, masks[name], math.ceil(RATE * active - 1e-9))
        removed[name] = gone
        k = masks[name].clone().flatten()
        k[list(gone)] = False
        kept[name] = k.view_as(w)
    names = list(weights)
    total = sum(len(removed[n]) for n in names)
    if method == "gmp":
        budgets = dict.fromkeys(names, 0)
    elif method == "dsr":  # shared by surviving weights (none of the caps binds in these tensors)
        budgets = dict(zip(names, largest_remainder(total, [int(kept[n].sum()) for n in names])))
    elif method == "snfs":  # shared by the mean momentum magnitude of each tensor's active weights
        momentum = {n: snfs_momentum(optimizer_name, state[n], grads[n]) for n in names}
        scores = [float(momentum[n].abs()[masks[n]].mean()) for n in names]
        budgets = dict(zip(names, largest_remainder(total, scores)))
    else:
        budgets = {n: len(removed[n]) for n in names}
    for draw, name in enumerate(names):
        w, mask = weights[name], masks[name]
        candidates = ~mask if method == "dsr" else ~kept[name]  # DSR grows only where weights were inactive
        n = budgets[name]
        if method in ("rigl",):
            grown = {i for i in lowest(-grads[name].abs(), candidates, n)}
        elif method == "snfs":
            grown = {i for i in lowest(-momentum[name].abs(), candidates, n)}
        elif n > 0:
            grown = lowest(naive_keys(draw_seed, draw, w.shape), candidates, n)
        else:
            grown = set()
        new_mask = kept[name].clone().flatten()
        new_mask[list(grown)] = True
        new_masks[name] = new_mask.view_as(w)
        restart = set(removed[name]) | grown  # positions whose value and state restart at zero
        if method == "rigl":  # RigL keeps a weight dropped and regrown in the same update as it was
            restart -= set(removed[name]) & grown
        value = w.clone().flatten()
        value[list(restart)] = 0.0
        new_weights[name] = value.view_as(w)
        new_state[name] = {}
        for key, tensor in state[name].items():
            t = tensor.clone().flatten()
            if method != "snfs":  # SNFS's momentum is never reset: it ranks the inactive positions
                t[list(restart)] = 0.0
            new_state[name][key] = t.view_as(w)
    return new_masks, new_weights, new_state


def snfs_momentum(optimizer_name: str, state: dict, grad: torch.Tensor) -> torch.Tensor:
    if optimizer_name == "adam":  # sparselearning's and the authors' momentum under Adam
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    return state["momentum_buffer"]


# --------------------------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_name", ["momentum", "adam"])
@pytest.mark.parametrize("method", ["selfish", "set", "set_selfish_rnn", "dsr", "snfs", "rigl", "gmp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_update_of_each_preset_equals_its_reference(method: str, optimizer_name: str, seed: int) -> None:
    config = resolve(method, 0.5, grown_optimizer_state="zero")
    torch.manual_seed(seed)
    params = {name: nn.Parameter(torch.randn(shape)) for name, shape in SHAPES.items()}
    sparsity = 0.0 if method == "gmp" else 0.5
    engine = SparseEngine.initialize(params, sparsity, torch.Generator().manual_seed(seed), config.init)
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(params.values(), lr=0.1)
    else:
        optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    engine.attach(optimizer, mask_state=not config.reads_momentum, grown_state=config.grown_optimizer_state)
    for _ in range(2):  # state to reset and momentum to read
        for p in params.values():
            p.grad = torch.randn_like(p)
        optimizer.step()
    for p in params.values():
        p.grad = torch.randn_like(p)  # the dense gradient of the step before the update (RigL)
    weights = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: m.clone() for n, m in engine.masks.items()}
    grads = {n: p.grad.clone() for n, p in params.items()}
    state = {
        n: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
        for n, p in params.items()
    }
    amount = UpdateAmount(target_density=TARGET) if method == "gmp" else UpdateAmount(RATE)
    context = UpdateContext(torch.Generator(), [optimizer], threshold=THRESHOLD, draws=DrawStream(99 + seed))
    engine.update(amount, config, context)
    expected_masks, expected_weights, expected_state = reference_update(
        method, optimizer_name, weights, masks, grads, state, 99 + seed
    )
    for name, p in params.items():
        assert torch.equal(engine.masks[name], expected_masks[name]), name
        assert torch.equal(p.detach(), expected_weights[name]), name
        for key, expected in expected_state[name].items():
            assert torch.equal(optimizer.state[p][key], expected), (name, key)
    if method != "gmp":  # sparse-to-sparse: the total is kept exactly
        assert sum(int(m.sum()) for m in engine.masks.values()) == sum(int(m.sum()) for m in masks.values())


def test_snfs_momentum_accumulates_across_updates_as_if_never_reset() -> None:
    """Two SNFS updates with SGD momentum: the momentum at inactive positions is the plain running sum of the dense
    gradients (beta * buf + g), exactly as if the optimizer state were never touched (sparselearning)."""
    config = resolve("snfs", 0.5)
    torch.manual_seed(0)
    params = {name: nn.Parameter(torch.randn(shape)) for name, shape in SHAPES.items()}
    engine = SparseEngine.initialize(params, 0.5, torch.Generator().manual_seed(0), config.init)
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    engine.attach(optimizer, mask_state=not config.reads_momentum)
    buffers = {n: torch.zeros_like(p) for n, p in params.items()}
    for round_ in range(2):
        for _ in range(3):
            for name, p in params.items():
                p.grad = torch.randn_like(p)
                buffers[name] = (
                    p.grad.clone() if round_ == 0 and not buffers[name].any() else 0.9 * buffers[name] + p.grad
                )
            optimizer.step()
        for name, p in params.items():
            assert torch.allclose(optimizer.state[p]["momentum_buffer"], buffers[name], atol=1e-6), name
        engine.update(UpdateAmount(0.3), config, UpdateContext(torch.Generator(), [optimizer]))
