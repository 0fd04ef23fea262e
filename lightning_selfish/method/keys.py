"""Integer keys that order positions for a selection, computed elementwise: the same at a position whatever else a
rank holds, so a selection over a tensor split across ranks can agree on them (:mod:`lightning_selfish.run.collective`).

Every selection of the method is "the ``n`` candidate positions with the lowest score, ties to the lowest flat
index". :func:`order_keys` turns any float scores into signed integers of the same order; :func:`magnitude_keys` does
it for ``|w|`` without a pass (the bit patterns of non-negative floats are ordered as their values). Random
selections rank :func:`position_keys`: pseudo-random keys that are a function of a seed, a draw number and the global
position alone, so that the lowest ``n`` of them are a uniformly random ``n``-subset however the tensor is split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DrawStream", "key_value", "magnitude_keys", "order_keys", "position_keys"]

_FLOAT32_INF_BITS = 0x7F800000
_FLOAT64_INF_BITS = 0x7FF0000000000000


def order_keys(score: Tensor) -> Tensor:
    """Signed integer keys ordered as ``score``'s values: int32 for float32 and narrower floats (widened to float32,
    exactly), int64 for float64; int32 and int64 scores are their own keys.

    A float's key is its magnitude's bit pattern, negated for negative numbers, so ``-0.0`` and ``+0.0`` share a
    key; NaN, of either sign, is above every number.
    """
    if score.dtype in (torch.int32, torch.int64):
        return score
    if score.dtype == torch.float64:
        as_int, inf_bits = torch.int64, _FLOAT64_INF_BITS
    elif score.is_floating_point():
        as_int, inf_bits = torch.int32, _FLOAT32_INF_BITS
        score = score.float()
    else:
        raise TypeError(f"scores must be floating point, int32 or int64, got {score.dtype}")
    pattern = score.view(as_int)
    bits = 8 * pattern.element_size()
    keys = pattern.bitwise_and(inf_bits | (inf_bits - 1))  # the magnitude's bits (a NaN's: above inf's)
    sign = torch.bitwise_right_shift(pattern, bits - 1)  # -1 where the sign bit is set, else 0
    sign.bitwise_and_(torch.bitwise_right_shift(keys - (inf_bits + 1), bits - 1))  # ... and the value is not NaN
    return keys.bitwise_xor_(sign).sub_(sign)  # two's complement negation where sign is -1


def key_value(key: int, dtype: torch.dtype) -> Tensor:
    """The number of ``dtype`` whose :func:`order_keys` key is ``key`` (``+0.0`` for the key of zero)."""
    if not dtype.is_floating_point:
        return torch.tensor(key, dtype=dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    as_int, bits = (torch.int64, 64) if wide == torch.float64 else (torch.int32, 32)
    pattern = abs(key) | ((1 << (bits - 1)) if key < 0 else 0)
    pattern -= (1 << bits) if pattern >= 1 << (bits - 1) else 0
    return torch.tensor(pattern, dtype=as_int).view(wide).to(dtype)


def magnitude_keys(tensor: Tensor, largest_first: bool = False) -> Tensor:
    """Keys of ``|tensor|`` without a pass of :func:`order_keys`: the bit patterns of non-negative floats are ordered
    as their values (NaN above every number). ``largest_first`` negates them, so the lowest keys are the largest
    magnitudes (growth by the largest gradient or momentum), ties still to the lowest position."""
    magnitude = tensor.detach().abs()
    if magnitude.dtype not in (torch.float32, torch.float64):
        magnitude = magnitude.float()
    keys = magnitude.view(torch.int32 if magnitude.dtype == torch.float32 else torch.int64)
    return keys.neg_() if largest_first else keys


_WEYL32 = 0x9E3779B9  # odd: position -> position * _WEYL32 is a bijection modulo 2**32
_FMIX1, _FMIX2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3's 32-bit finaliser
_MASK64 = 2**64 - 1


def _signed32(value: int) -> int:
    value &= 2**32 - 1
    return value - 2**32 if value >= 2**31 else value


def _mix64(value: int) -> int:
    """SplitMix64's finaliser on a Python int (from (seed, draw) to a draw's two 32-bit offsets)."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _finalise32_(x: Tensor, scratch: Tensor) -> Tensor:
    """MurmurHash3's finaliser, in place on int32 (a bijection of 32-bit values; logical shifts by masking)."""
    for shift, multiplier in ((16, _FMIX1), (13, _FMIX2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(scratch)
        if multiplier is not None:
            x.mul_(_signed32(multiplier))  # (int32 arithmetic wraps modulo 2**32)
    return x


def position_keys(
    seed: int, draw: int, start: int, shape: Sequence[int] | torch.Size, device: torch.device | str | None = None
) -> Tensor:
    """Pseudo-random int32 keys of the global flat positions ``start ...`` (a tensor of ``shape``) for one draw.

    A key is a function of ``(seed, draw, position)`` alone: a shard computes its own keys and they equal the whole
    tensor's keys at those positions. Two rounds of MurmurHash3's finaliser over a Weyl sequence, each a bijection,
    so no two positions of one draw below 2**32 share a key (ties, beyond, go to the lower position).
    """
    offsets = _mix64(_mix64(seed) ^ _mix64(draw ^ 0x5851F42D4C957F2D))
    first, second = _signed32(offsets), _signed32(offsets >> 32)
    numel = math.prod(shape)
    keys = torch.arange(start, start + numel, dtype=torch.int64, device=device).to(torch.int32)
    keys.mul_(_signed32(_WEYL32)).add_(first)
    scratch = torch.empty_like(keys)
    _finalise32_(keys, scratch).bitwise_xor_(second)
    return _finalise32_(keys, scratch).view(tuple(shape))


class DrawStream:
    """The random stream of a run's random selections (random growth): a seed and the number of the next draw.

    Each selection takes one draw and ranks its candidates by :func:`position_keys` of (seed, draw, global position),
    so the positions it picks are a uniformly random subset of the candidates, the same on one process and on any
    number of ranks holding parts of the tensor, on a CPU and on a GPU. The state is two integers: a run that moves
    to another number of devices carries it in its checkpoint and goes on drawing the same positions.
    """

    def __init__(self, seed: int, next_draw: int = 0) -> None:
        self.seed = int(seed)
        self.next_draw = int(next_draw)

    def take(self) -> int:
        """The number of a new draw (every rank takes draws in the same order)."""
        draw = self.next_draw
        self.next_draw += 1
        return draw

    def keys(self, start: int, shape: Sequence[int] | torch.Size, device: torch.device | str | None = None) -> Tensor:
        """The keys of a new draw over the global positions ``start ...`` (a tensor of ``shape``)."""
        return position_keys(self.seed, self.take(), start, shape, device)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "next_draw": self.next_draw}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.next_draw = int(state["seed"]), int(state["next_draw"])

    def __repr__(self) -> str:
        return f"DrawStream(seed={self.seed}, next_draw={self.next_draw})"
