"""lightning_selfish.analysis: topology distances against a slow reference, alignment, exploration, bit-packing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selfish import analysis

H, IN, GATES = 6, 5, [("i", slice(0, 6)), ("f", slice(6, 12)), ("g", slice(12, 18)), ("o", slice(18, 24))]


def random_mask(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


# ------------------------------------------------------------------------------------------ slow reference


def reference_unit_edges(mask, gates, unit_rows, cols):
    """Edges into each unit as Python sets of (gate, input) pairs, after mapping units/columns; no tensors ops."""
    rows_total, width = mask.shape
    equal = gates and len({r.stop - r.start for _, r in gates}) == 1 and len(gates) > 1
    units = (gates[0][1].stop - gates[0][1].start) if equal else rows_total
    unit_rows = list(range(units)) if unit_rows is None else [int(r) for r in unit_rows]
    cols = list(range(width)) if cols is None else [int(c) for c in cols]
    edges = []
    for k in range(units):
        source = unit_rows[k]
        rows = [(g, rows.start + source) for g, rows in gates] if equal else [("", source)]
        edges.append({(g, c) for g, row in rows for c in range(width) if mask[row, cols[c]]})
    return edges


def reference_gate_edges(mask, gate_rows, units_map, gates, cols):
    equal = gates and len({r.stop - r.start for _, r in gates}) == 1 and len(gates) > 1
    width = mask.shape[1]
    cols = list(range(width)) if cols is None else [int(c) for c in cols]
    out = []
    for local in range(gate_rows.stop - gate_rows.start):
        if units_map is None:
            row = gate_rows.start + local
        elif equal:
            row = gate_rows.start + int(units_map[local])
        else:
            row = int(units_map[gate_rows.start + local])
        out.append({c for c in range(width) if mask[row, cols[c]]})
    return out


def reference_ged(sets_a, sets_b):
    values = []
    for a, b in zip(sets_a, sets_b):
        union = a | b
        values.append(len(a ^ b) / len(union) if union else 0.0)
    return sum(values) / len(values)


def reference_distance(a, b, gates, rows_ab, cols_ab, rows_ba, cols_ba):
    result = {}
    identity = None
    ab = reference_ged(reference_unit_edges(a, gates, identity, None), reference_unit_edges(b, gates, rows_ab, cols_ab))
    ba = reference_ged(reference_unit_edges(b, gates, identity, None), reference_unit_edges(a, gates, rows_ba, cols_ba))
    result["all"] = (ab + ba) / 2
    for gate, rows in gates:
        ab = reference_ged(
            reference_gate_edges(a, rows, None, gates, None), reference_gate_edges(b, rows, rows_ab, gates, cols_ab)
        )
        ba = reference_ged(
            reference_gate_edges(b, rows, None, gates, None), reference_gate_edges(a, rows, rows_ba, gates, cols_ba)
        )
        result[gate] = (ab + ba) / 2
    return result


# ------------------------------------------------------------------------------------------ distances


def test_identical_topologies_are_at_distance_zero():
    a = random_mask((24, IN), 0.4, 0)
    assert analysis.mask_distance(a, a.clone(), GATES) == {"all": 0.0, "i": 0.0, "f": 0.0, "g": 0.0, "o": 0.0}


def test_disjoint_topologies_are_at_distance_one():
    a = random_mask((24, IN), 0.5, 1)
    a[:, 0], a[:, 1] = True, False  # every row of a and of ~a has an edge
    assert analysis.mask_distance(a, ~a, GATES) == {"all": 1.0, "i": 1.0, "f": 1.0, "g": 1.0, "o": 1.0}
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert analysis.mask_distance(empty, empty)["all"] == 0.0  # no edges on either side: nothing to edit


def lstm_layer(seed):
    ih = random_mask((4 * H, IN), 0.4, seed)
    hh = random_mask((4 * H, H), 0.4, seed + 1)
    acts = torch.randn(200, H, generator=torch.Generator().manual_seed(seed + 2))
    return ih, hh, acts


def permuted(ih, hh, acts, perm):
    """The same network with its hidden units renumbered: unit k of the result is unit perm[k] of the original."""
    ih2 = ih.view(4, H, IN)[:, perm].reshape(4 * H, IN)
    hh2 = hh.view(4, H, H)[:, perm][:, :, perm].reshape(4 * H, H)
    return ih2, hh2, acts[:, perm]


def test_a_permutation_of_units_is_at_distance_zero_after_alignment_and_not_before():
    ih, hh, acts = lstm_layer(3)
    perm = torch.randperm(H, generator=torch.Generator().manual_seed(4))
    ih2, hh2, acts2 = permuted(ih, hh, acts, perm)
    assert analysis.mask_distance(ih, ih2, GATES)["all"] > 0.2
    assert analysis.mask_distance(hh, hh2, GATES)["all"] > 0.2

    rows_ab = analysis.semi_matching(analysis.correlation_matrix(acts, acts2))
    rows_ba = analysis.semi_matching(analysis.correlation_matrix(acts2, acts))
    assert torch.equal(perm[rows_ab], torch.arange(H))  # the semi-matching finds the renumbering
    aligned_ih = analysis.topology_distance(ih, ih2, GATES, rows_ab=rows_ab, rows_ba=rows_ba)
    aligned_hh = analysis.topology_distance(
        hh, hh2, GATES, rows_ab=rows_ab, cols_ab=rows_ab, rows_ba=rows_ba, cols_ba=rows_ba
    )
    assert all(v == 0.0 for v in aligned_ih.values()) and all(v == 0.0 for v in aligned_hh.values())

    # the data-free alignment by nearest topology finds it too when every unit's edges are distinct
    by_mask = analysis.semi_matching(
        -analysis.pairwise_edit_distance(analysis.unit_view(ih, GATES), analysis.unit_view(ih2, GATES))
    )
    if len({tuple(r.tolist()) for r in analysis.unit_view(ih, GATES)}) == H:
        assert torch.equal(perm[by_mask], torch.arange(H))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    density=st.floats(0.05, 0.95),
    equal_gates=st.booleans(),
    aligned=st.booleans(),
)
def test_distance_matches_the_slow_reference_and_is_symmetric(seed, density, equal_gates, aligned):
    gates = GATES if equal_gates else [("m", slice(0, 4)), ("c", slice(4, 24))]
    a = random_mask((24, IN), density, seed)
    b = random_mask((24, IN), density, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    units = H if equal_gates else 24
    if aligned:  # semi-matchings need not be permutations: draw with repetition
        rows_ab, rows_ba = (
            torch.randint(0, units, (units,), generator=g),
            torch.randint(0, units, (units,), generator=g),
        )
        cols_ab, cols_ba = torch.randint(0, IN, (IN,), generator=g), torch.randint(0, IN, (IN,), generator=g)
    else:
        rows_ab = rows_ba = cols_ab = cols_ba = None
    fast = analysis.topology_distance(a, b, gates, rows_ab=rows_ab, cols_ab=cols_ab, rows_ba=rows_ba, cols_ba=cols_ba)
    slow = reference_distance(a, b, gates, rows_ab, cols_ab, rows_ba, cols_ba)
    assert fast.keys() == slow.keys()
    for key in fast:
        assert fast[key] == pytest.approx(slow[key], abs=1e-12)
        assert 0.0 <= fast[key] <= 1.0
    swapped = analysis.topology_distance(
        b, a, gates, rows_ab=rows_ba, cols_ab=cols_ba, rows_ba=rows_ab, cols_ba=cols_ab
    )
    assert swapped == pytest.approx(fast, abs=1e-12)


def test_pairwise_edit_distance_is_the_row_distance_of_every_pair():
    a, b = random_mask((7, 9), 0.3, 5), random_mask((5, 9), 0.6, 6)
    a[0] = False
    b[0] = False
    matrix = analysis.pairwise_edit_distance(a, b)
    for i in range(7):
        for j in range(5):
            expected = reference_ged([set(a[i].nonzero().flatten().tolist())], [set(b[j].nonzero().flatten().tolist())])
            assert matrix[i, j].item() == pytest.approx(expected, abs=1e-12)


def test_correlation_streams_and_matches_corrcoef():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 4, generator=g), torch.randn(300, 3, generator=g)
    y[:, 1] = 2 * x[:, 2] + 1
    y[:, 2] = 0.1  # constant unit (not exactly representable, so its raw sums round): correlates with nothing
    accumulator = analysis.CorrelationAccumulator()
    for chunk in range(3):
        accumulator.update(x[chunk * 100 : (chunk + 1) * 100], y[chunk * 100 : (chunk + 1) * 100])
    streamed = accumulator.correlation()
    expected = torch.corrcoef(torch.cat([x, y[:, :2]], 1).T.double())[:4, 4:]
    assert torch.allclose(streamed[:, :2], expected, atol=1e-10)
    assert torch.equal(streamed[:, 2], torch.zeros(4, dtype=torch.float64))
    assert analysis.semi_matching(streamed.T)[1] == 2  # y's unit 1 is x's unit 2
    assert torch.allclose(analysis.correlation_matrix(x, y), streamed)
    with pytest.raises(ValueError, match="same samples"):
        analysis.correlation_matrix(x, y[:10])


# ------------------------------------------------------------------------------------------ monitoring quantities


def test_exploration_report_is_exact_and_monotone_on_a_scripted_sequence():
    g = torch.Generator().manual_seed(0)
    gates = {"w": [("a", slice(0, 2)), ("b", slice(2, 4))]}
    initial = {"w": torch.zeros(4, 5, dtype=torch.bool)}
    initial["w"][0, :3] = True
    initial["w"][3, :2] = True
    sequence = [initial["w"]]
    for _ in range(6):  # exactly 5 active positions each time, anywhere
        mask = torch.zeros(20, dtype=torch.bool)
        mask[torch.randperm(20, generator=g)[:5]] = True
        sequence.append(mask.view(4, 5))
    ever = initial["w"].clone()
    previous = 0.0
    for mask in sequence:
        ever |= mask
        report = analysis.exploration_report({"w": ever}, {"w": mask}, initial, gates)
        expected = {
            "exploration/w": sum(bool(ever[r, c]) for r in range(4) for c in range(5)) / 20,
            "exploration/w/a": sum(bool(ever[r, c]) for r in range(2) for c in range(5)) / 10,
            "exploration/w/b": sum(bool(ever[r, c]) for r in range(2, 4) for c in range(5)) / 10,
            "drift/w": sum(bool(mask[r, c] and not initial["w"][r, c]) for r in range(4) for c in range(5)) / 5,
        }
        for key, value in expected.items():
            assert report[key] == pytest.approx(value)
        assert report["exploration/overall"] == report["exploration/w"] >= previous
        previous = report["exploration/w"]


def test_magnitude_above_and_gate_sparsity():
    w = torch.tensor([[0.05, -0.2], [0.3, 0.1]])
    assert analysis.magnitude_above({"w": w, "v": torch.ones(3)}, 0.1) == {"w": 2, "v": 3, "overall": 5}
    mask = torch.tensor([[True, False], [True, True], [False, False], [True, False]])
    table = analysis.gate_sparsity({"m": mask}, {"m": [("x", slice(0, 2)), ("y", slice(2, 4))]})
    assert table == {"m": {"x": 0.25, "y": 0.75, "all": 0.5}}
    markdown = analysis.gate_sparsity_markdown(table)
    assert markdown.splitlines()[0] == "| tensor | x | y | whole tensor |"
    assert markdown.splitlines()[2] == "| m | 0.250 | 0.750 | 0.500 |"


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 13), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_bit_packing_round_trips(shape, seed):
    mask = random_mask(tuple(shape), 0.5, seed)
    packed = analysis.pack_mask(mask)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(analysis.unpack_mask(packed), mask)


@pytest.mark.parametrize(("p", "q"), [(0.33, 0.33), (0.5, 0.5), (0.2, 0.6)])
def test_chance_distance_is_the_distance_of_unrelated_random_topologies(p, q):
    a, b = random_mask((64, 4000), p, 11), random_mask((64, 4000), q, 12)
    measured = analysis.mask_distance(a, b)["all"]
    assert analysis.chance_distance(a, b)["all"] == pytest.approx(measured, abs=0.005)
    if p == q == 0.33:
        assert measured == pytest.approx(0.80, abs=0.01)  # the paper's "very high value 0.8" at sparsity 0.67


def test_chance_distance_of_short_sparse_rows_counts_the_units_with_no_edge():
    """Density 0.05, 20 positions per row: many units have no edge in either mask (distance 0), so chance is 0.85."""
    a, b = random_mask((20_000, 20), 0.05, 21), random_mask((20_000, 20), 0.05, 22)
    measured = analysis.mask_distance(a, b)["all"]
    assert measured == pytest.approx(0.848, abs=0.01)  # far below the long-row level (0.974)
    assert analysis.chance_distance(a, b)["all"] == pytest.approx(measured, abs=0.01)
    # per gate, a gate's rows are the units: short rows of 5 columns; "all": 4 gates x 5 columns per hidden unit
    gates = [(name, slice(k * 5000, (k + 1) * 5000)) for k, name in enumerate("ifgo")]
    a, b = random_mask((20_000, 5), 0.05, 23), random_mask((20_000, 5), 0.05, 24)
    measured, chance = analysis.mask_distance(a, b, gates), analysis.chance_distance(a, b, gates)
    assert chance["i"] == pytest.approx(measured["i"], abs=0.02) and chance["i"] < 0.5
    assert chance["all"] == pytest.approx(measured["all"], abs=0.01)


def test_a_unit_with_a_large_mean_and_a_small_spread_is_not_constant():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = x.clone()
    y[:, 0] = 1000.0 + 0.01 * x[:, 0]  # spread 1e-5 of its magnitude: far above float32's resolution
    y[:, 1] = 7.0  # constant
    accumulator = analysis.CorrelationAccumulator()
    for chunk in range(4):
        accumulator.update(x[chunk * 100 : (chunk + 1) * 100], y[chunk * 100 : (chunk + 1) * 100])
    correlation = accumulator.correlation()
    assert correlation[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(correlation[:, 1], torch.zeros(3, dtype=torch.float64))
    assert correlation[2, 2].item() == pytest.approx(1.0, abs=1e-12)


def test_semi_matching_prefers_the_own_position_on_ties_and_reports_its_quality():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # a constant unit: correlates with nothing
            [0.0, 0.0, 0.0, 0.0],
            [0.8, 0.0, 0.0, 0.3],  # collapses onto unit 0
        ]
    )
    matching = analysis.semi_matching(similarity)
    assert matching.tolist() == [0, 1, 2, 0]  # the constant units keep their positions, not all unit 0
    quality = analysis.match_quality(similarity, matching)
    assert quality == {"units": 4, "distinct": 3, "distinct_fraction": 0.75, "mean": pytest.approx(1.7 / 4)}
    wide = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.2, 0.9]])  # more columns than rows: ties to the own position
    assert analysis.semi_matching(wide).tolist() == [0, 2]
