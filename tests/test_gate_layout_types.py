"""A gate layout of the wrong *type* is a ``TypeError`` naming the tensor, the entry and what is allowed
(docs/callback.md, "Errors"); the wrong *values* of the right types stay ``ValueError``s (tests/test_errors.py,
tests/test_gates.py). Row bounds are ints: a float or a str is refused, never truncated or parsed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_selfish.core.gates import normalize_layout

ROWS = r"gate_layouts\['w'\] gate 'a': rows must be a slice or \(start, stop\), got "
ENTRY = r"gate_layouts\['w'\] entries must be \(gate, slice\) or \(gate, \(start, stop\)\), got "
BOUNDS = r"gate_layouts\['w'\] gate 'a': row bounds must be ints, got "


@pytest.mark.parametrize(
    "spec,match",
    [
        ("ifgo", r"gate_layouts\['w'\] must be a non-empty list of gate names or \(gate, rows\) pairs, got 'ifgo'$"),
        ({"a": (0, 10)}, r"must be a non-empty list of gate names or \(gate, rows\) pairs, got \{'a': \(0, 10\)\}$"),
        ([("a", "rows")], ROWS + "'rows'$"),
        ([("a", (0, 5, 10))], ROWS + r"\(0, 5, 10\)$"),
        ([(1, (0, 10))], ENTRY + r"\(1, \(0, 10\)\)$"),
        ([("a", (0, 5)), "b"], ENTRY + "'b'$"),
        ([("a", (0, 5)), "bc"], ENTRY + "'bc'$"),
        ([("a", ("0", "10"))], BOUNDS + r"\('0', '10'\)$"),
        ([("a", (0.0, 10))], BOUNDS + r"\(0.0, 10\)$"),
        ([("a", (False, 10))], BOUNDS + r"\(False, 10\)$"),
        ([("a", slice(0, 10.0))], BOUNDS + r"slice\(0, 10.0, None\)$"),
        ([("a", slice(0, None))], BOUNDS + r"slice\(0, None, None\)$"),
    ],
)
def test_a_layout_entry_of_the_wrong_type_is_a_type_error(spec, match) -> None:
    with pytest.raises(TypeError, match=match):
        normalize_layout(spec, 10, "w")


def test_int_like_row_bounds_are_ints() -> None:
    spec = [("b", (np.int64(4), torch.tensor(10))), ("a", slice(None, 4))]
    assert normalize_layout(spec, 10, "w") == [("a", slice(0, 4)), ("b", slice(4, 10))]
