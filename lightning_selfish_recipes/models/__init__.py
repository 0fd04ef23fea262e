"""The four language models of Selfish-RNN (ICML 2021) as plain ``torch.nn.Module``\\ s.

Every model takes ``(T, B)`` token ids and a hidden state from ``init_hidden(B)`` and returns an
:class:`LMOutput` ``(log_probs (T*B, V), hidden, ar, tar)``. See ``docs/models.md``.
"""

from lightning_selfish_recipes.models.awd_lstm_mos import AWDLSTMMoS
from lightning_selfish_recipes.models.common import (
    GateLayout,
    LinearDropConnect,
    LMOutput,
    LockedDropout,
    WeightDrop,
    embedded_dropout,
    stacked_gate_layout,
)
from lightning_selfish_recipes.models.on_lstm import ONLSTM, ONLSTMCell, ONLSTMStack, cumsoftmax, onlstm_gate_layout
from lightning_selfish_recipes.models.rhn import RHN, HighwayBlock
from lightning_selfish_recipes.models.stacked_lstm import StackedLSTM

__all__ = [
    "AWDLSTMMoS",
    "GateLayout",
    "HighwayBlock",
    "LMOutput",
    "LinearDropConnect",
    "LockedDropout",
    "ONLSTM",
    "ONLSTMCell",
    "ONLSTMStack",
    "RHN",
    "StackedLSTM",
    "WeightDrop",
    "cumsoftmax",
    "embedded_dropout",
    "onlstm_gate_layout",
    "stacked_gate_layout",
]
