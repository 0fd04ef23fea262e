"""Gate layouts: detection, declaration, overrides and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_selfish.core.gates import detect_gate_layouts, normalize_layout


def test_pytorch_rnns_are_detected():
    model = nn.ModuleDict(
        {
            "lstm": nn.LSTM(3, 5, num_layers=2, bidirectional=True),
            "gru": nn.GRU(3, 4),
            "rnn": nn.RNN(3, 2),
            "cell": nn.LSTMCell(3, 6),
            "gcell": nn.GRUCell(3, 7),
        }
    )
    layouts = detect_gate_layouts(model)
    assert layouts["lstm.weight_hh_l1_reverse"] == [
        ("i", slice(0, 5)),
        ("f", slice(5, 10)),
        ("g", slice(10, 15)),
        ("o", slice(15, 20)),
    ]
    assert [g for g, _ in layouts["gru.weight_ih_l0"]] == ["r", "z", "n"]
    assert layouts["rnn.weight_hh_l0"] == [("h", slice(0, 2))]
    assert layouts["cell.weight_ih"][1] == ("f", slice(6, 12))
    assert layouts["gcell.weight_hh"][2] == ("n", slice(14, 21))
    assert not any("bias" in name for name in layouts)


def test_projected_lstm_keeps_weight_hr_ungated():
    layouts = detect_gate_layouts(nn.LSTM(3, 8, proj_size=2))
    assert "weight_hr_l0" not in layouts and layouts["weight_hh_l0"][3] == ("o", slice(24, 32))


class Highway(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.R = nn.Linear(4, 8)
        self.gate_layouts = {"R.weight": [("H", slice(0, 4)), ("T", (4, 8))]}


def test_declared_layouts_and_overrides():
    model = nn.Sequential(Highway(), nn.Linear(8, 6))
    layouts = detect_gate_layouts(model)
    assert layouts == {"0.R.weight": [("H", slice(0, 4)), ("T", slice(4, 8))]}
    layouts = detect_gate_layouts(model, {"1.weight": ["a", "b", "c"], "0.R.weight": [("T", (2, 8)), ("H", (0, 2))]})
    assert layouts["1.weight"] == [("a", slice(0, 2)), ("b", slice(2, 4)), ("c", slice(4, 6))]
    assert layouts["0.R.weight"] == [("H", slice(0, 2)), ("T", slice(2, 8))]  # sorted by row


@pytest.mark.parametrize(
    "spec,error,match",
    [
        (
            [],
            ValueError,
            r"gate_layouts\['w'\] must be a non-empty list of gate names or \(gate, rows\) pairs, got \[\]",
        ),
        (5, TypeError, r"gate_layouts\['w'\] must be a non-empty list of gate names or \(gate, rows\) pairs, got 5"),
        (
            [("a", 0, 5)],
            TypeError,
            r"gate_layouts\['w'\] entries must be \(gate, slice\) or \(gate, \(start, stop\)\), got",
        ),
        ([("a", slice(0, 10, 2))], ValueError, r"gate_layouts\['w'\] gate 'a': row slices must have step 1"),
        (
            [("a", (0, 5)), ("b", 7)],
            TypeError,
            r"gate_layouts\['w'\] gate 'b': rows must be a slice or \(start, stop\), got 7",
        ),
        (
            [("a", (0, 5)), ("b", (5, 12))],
            ValueError,
            r"does not tile the tensor's 10 rows: the gates cover rows \[0, 12\)",
        ),
        (
            [("a", (0, 5)), ("b", (5, 5)), ("c", (5, 10))],
            ValueError,
            r"gate 'b' covers rows \[5, 5\) but the next gate must",
        ),
    ],
)
def test_bad_gate_layouts(spec, error, match):
    with pytest.raises(error, match=match):
        normalize_layout(spec, 10, "w")


def test_override_for_unknown_parameter_names_the_candidates():
    with pytest.raises(ValueError, match=r"'nope'.*weight_hh_l0"):
        detect_gate_layouts(nn.LSTM(2, 3), {"nope": ["a"]})


def test_layout_rows_line_up_with_lstm_gate_order():
    """Zero the forget-gate rows of weight_hh and bias: the cell state is then never carried over."""
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3)
    rows = dict(detect_gate_layouts(lstm)["weight_hh_l0"])["f"]
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0"):
            getattr(lstm, name)[rows] = 0
        lstm.bias_ih_l0[rows] = -100.0  # sigmoid(f) = 0
    x = torch.randn(2, 1, 2)
    _, (_, c_two_steps) = lstm(x)
    _, (_, c_last_only) = lstm(x[1:], (lstm(x[:1])[1][0], torch.zeros(1, 1, 3)))
    assert torch.allclose(c_two_steps, c_last_only, atol=1e-6)


def test_a_declaration_for_a_shared_weight_is_its_layout_and_detection_goes_on() -> None:
    """A tied weight is named once (its first name); a layout declared under its other name is that tensor's (it was
    passed over silently: issue 25.6), and the stacked weights after it are still detected."""
    model = nn.Module()
    model.first = nn.Linear(4, 8)
    model.tied = nn.Linear(4, 8)
    model.tied.weight = model.first.weight
    model.tied.gate_layouts = {"weight": ["a", "b"]}
    model.rnn = nn.LSTM(4, 2)
    layouts = detect_gate_layouts(model)
    assert sorted(layouts) == ["first.weight", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert layouts["first.weight"] == [("a", slice(0, 4)), ("b", slice(4, 8))]


def test_a_bad_override_names_its_parameter() -> None:
    with pytest.raises(ValueError) as error:
        detect_gate_layouts(nn.LSTM(4, 2), {"weight_hh_l0": ["i", "i"]})
    assert str(error.value).startswith("gate_layouts['weight_hh_l0'] names a gate twice")


def test_the_gate_layout_type_and_the_rnn_gate_names_are_defined_once() -> None:
    """One GateLayout (the library's), one table of PyTorch's gate names: the analysis and the recipes use them."""
    from torch import nn

    from lightning_selfish.analysis import masks, plots
    from lightning_selfish.core import gates
    from lightning_selfish_recipes import models
    from lightning_selfish_recipes.models.common import WeightDrop

    assert masks.GateLayout is plots.GateLayout is models.GateLayout is gates.GateLayout
    dropped = WeightDrop(nn.GRU(3, 4), dropout=0.1)
    assert [gate for gate, _ in dropped.gate_layouts["weight_hh_l0_raw"]] == list(gates.RNN_GATES[nn.GRU])
    assert (
        gates.rnn_gate_names(nn.LSTMCell(2, 2)) == ("i", "f", "g", "o")
        and gates.rnn_gate_names(nn.Linear(2, 2)) is None
    )
