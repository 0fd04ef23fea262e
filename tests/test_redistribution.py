"""The exact shares of ``redistribution.py``: ``allocate_counts`` (exact, capped, largest remainder first) and
the signals the shares are computed from (mean active magnitude, SNFS's momentum under SGD, Adam and SNT-ASGD)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_selfish import SNTASGD
from lightning_selfish.core.signals import momentum_of
from lightning_selfish.method.redistribution import allocate_counts, mean_active_magnitude

# --------------------------------------------------------------------------------------------------------------
# allocate_counts
# --------------------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    caps=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    scores=st.lists(st.floats(0, 10, allow_nan=False), min_size=8, max_size=8),
    fraction=st.floats(0, 1),
)
def test_allocate_counts_is_exact_and_capped(caps, scores, fraction):
    scores = scores[: len(caps)]
    total = int(fraction * sum(caps))
    counts = allocate_counts(total, scores, caps)
    assert sum(counts) == total and all(0 <= c <= cap for c, cap in zip(counts, caps))
    # proportional where no cap binds: every count within 1 of its exact share among the uncapped parts
    free = [i for i, (c, cap) in enumerate(zip(counts, caps)) if c < cap]
    left = total - sum(counts[i] for i in range(len(caps)) if i not in free)
    weight = sum(scores[i] for i in free)
    if free and weight > 0:
        for i in free:
            assert abs(counts[i] - left * scores[i] / weight) < 1 + 1e-9


def test_allocate_counts_edges():
    assert allocate_counts(10, [1, 1, 1], [5, 5, 5]) == [4, 3, 3]  # ties go to the lower index
    assert allocate_counts(10, [10, 1, 1], [3, 10, 10]) == [3, 4, 3]  # the capped part's excess is shared again
    assert allocate_counts(7, [0, 0], [3, 4]) == [3, 4]  # no score: by free room
    assert allocate_counts(5, [float("nan"), 2], [5, 5]) == [0, 5]
    with pytest.raises(ValueError, match=r"total must be in \[0, 6\]"):
        allocate_counts(7, [1, 1], [3, 3])


def test_allocate_counts_rounds_by_the_largest_remainder() -> None:
    # shares 5, 3.33, 1.67: floors 5, 3, 1, and the one left over goes to the largest remainder (0.67)
    assert allocate_counts(10, [3, 2, 1], [10, 10, 10]) == [5, 3, 2]
    assert allocate_counts(10, [1, 2, 3], [10, 10, 10]) == [2, 3, 5]
    assert allocate_counts(10, [float("inf"), 1, 1], [10, 10, 10]) == [0, 5, 5]  # a non-finite score counts as 0


def test_allocate_counts_messages() -> None:
    with pytest.raises(ValueError) as error:
        allocate_counts(1, [1.0, 2.0], [3])
    assert str(error.value) == "allocate_counts: 2 scores for 1 caps"
    with pytest.raises(ValueError) as error:
        allocate_counts(1, [1.0, 2.0], [3, -1])
    assert str(error.value) == "allocate_counts: caps must be >= 0, got [3, -1]"


# --------------------------------------------------------------------------------------------------------------
# the signals
# --------------------------------------------------------------------------------------------------------------


def test_mean_active_magnitude() -> None:
    values = torch.tensor([[-2.0, 1.0], [4.0, -8.0]])
    assert mean_active_magnitude(values, torch.tensor([[True, False], [True, True]])) == pytest.approx(14 / 3)
    assert mean_active_magnitude(values, torch.zeros(2, 2, dtype=torch.bool)) == 0.0


def test_momentum_is_normalised_under_adam_and_the_gradient_under_sntasgd():
    w = nn.Parameter(torch.randn(4, 4))
    adam = torch.optim.Adam([w])
    w.grad = torch.randn(4, 4)
    adam.step()
    state = adam.state[w]
    expected = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    assert torch.equal(momentum_of([adam], w, None, "w"), expected)
    grad = torch.randn(4, 4)
    assert momentum_of([SNTASGD([w], lr=1.0)], w, grad, "w") is grad
    with pytest.raises(ValueError, match="needs a momentum buffer for 'w'"):
        momentum_of([torch.optim.SGD([w], lr=1.0)], w, grad, "w")


def test_an_optimizer_with_only_a_first_moment_has_no_snfs_momentum() -> None:
    """Adam's normalised momentum needs both moments; a state with ``exp_avg`` alone (e.g. Lion) is not Adam."""
    weight = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    optimizer.state[weight] = {"exp_avg": torch.randn(3, 3)}
    with pytest.raises(ValueError, match="growth='momentum' needs a momentum buffer for 'w'"):
        momentum_of([optimizer], weight, None, "w")
