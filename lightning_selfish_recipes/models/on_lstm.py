"""Model C: ON-LSTM (Ordered Neurons, Shen et al. 2019) on PTB (docs/models.md#model-c-on-lstm-ptb)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish_recipes.models.common import (
    GateLayout,
    LinearDropConnect,
    LMOutput,
    LockedDropout,
    embedded_dropout,
    init_embedding_and_decoder,
)

ONLSTM_GATES: tuple[str, ...] = ("mi", "mf", "o", "c", "i", "f")
"""Row-block order of ``ih``/``hh``: master-input, master-forget (C rows each), then o, ĉ, i, f (H rows each)."""


def cumsoftmax(x: Tensor, dim: int = -1) -> Tensor:
    """``cumax``: cumulative sum of a softmax, a soft monotone step from 0 to 1."""
    return torch.cumsum(F.softmax(x, dim=dim), dim=dim)


def onlstm_step(gates: Tensor, c: Tensor, n_chunk: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """One ON-LSTM step from its pre-activations ``gates`` ``(B, 2C + 4H)`` and cell ``c`` ``(B, C, K)``: the
    master gates (cumulative softmax) over the chunks, then the LSTM gates o, c, i, f; returns ``(h, c)``
    (docs/models.md, ON-LSTM). Shared by the model and its sparse-inference conversion."""
    B, C, K = gates.size(0), n_chunk, chunk_size
    cin = 1.0 - cumsoftmax(gates[:, :C])
    cforget = cumsoftmax(gates[:, C : 2 * C])
    g = gates[:, 2 * C :].view(B, 4, C, K)
    out_gate = torch.sigmoid(g[:, 0])
    cell = torch.tanh(g[:, 1])
    in_gate = torch.sigmoid(g[:, 2])
    forget_gate = torch.sigmoid(g[:, 3])
    cin = cin.unsqueeze(-1)
    cforget = cforget.unsqueeze(-1)
    overlap = cforget * cin
    forget_gate = forget_gate * overlap + (cforget - overlap)
    in_gate = in_gate * overlap + (cin - overlap)
    c = forget_gate * c + in_gate * cell
    h = (out_gate * torch.tanh(c)).view(B, C * K)
    return h, c


def onlstm_gate_layout(hidden_size: int, n_chunk: int) -> GateLayout:
    """Rows of ``ih.0.weight`` / ``hh.weight``: mi [0,C), mf [C,2C), o, c, i, f (H rows each) after 2C."""
    C, H = n_chunk, hidden_size
    return [
        ("mi", slice(0, C)),
        ("mf", slice(C, 2 * C)),
        ("o", slice(2 * C, 2 * C + H)),
        ("c", slice(2 * C + H, 2 * C + 2 * H)),
        ("i", slice(2 * C + 2 * H, 2 * C + 3 * H)),
        ("f", slice(2 * C + 3 * H, 2 * C + 4 * H)),
    ]


class ONLSTMCell(nn.Module):
    """One ON-LSTM layer: ``ih = Sequential(Linear(in, 4H+2C))`` and ``hh = LinearDropConnect(H, 4H+2C)``.

    :meth:`forward` runs the whole window: ``ih`` is applied to all time steps at once, the DropConnect weight of
    ``hh`` is drawn once (one mask per minibatch in training, ``weight·(1-p)`` in eval), then the time loop does
    one ``addmm`` per step. State: ``h`` ``(B, H)`` and ``c`` ``(B, C, chunk)``.
    """

    def __init__(self, input_size: int, hidden_size: int, chunk_size: int, dropconnect: float = 0.0) -> None:
        super().__init__()
        if hidden_size % chunk_size:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of chunk_size {chunk_size}")
        self.input_size, self.hidden_size, self.chunk_size = input_size, hidden_size, chunk_size
        self.n_chunk = hidden_size // chunk_size
        n_out = 4 * hidden_size + 2 * self.n_chunk
        self.ih = nn.Sequential(nn.Linear(input_size, n_out))
        self.hh = LinearDropConnect(hidden_size, n_out, bias=True, dropout=dropconnect)
        layout = onlstm_gate_layout(hidden_size, self.n_chunk)
        self.gate_layouts: dict[str, GateLayout] = {"ih.0.weight": layout, "hh.weight": list(layout)}

    def init_hidden(self, batch_size: int) -> tuple[Tensor, Tensor]:
        w = self.hh.weight
        return w.new_zeros(batch_size, self.hidden_size), w.new_zeros(batch_size, self.n_chunk, self.chunk_size)

    def forward(self, input: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``input`` ``(T, B, in)`` -> outputs ``(T, B, H)`` and the final ``(h, c)``."""
        h, c = hidden
        C, K = self.n_chunk, self.chunk_size
        x_gates = self.ih(input)
        if self.hh.bias is not None:
            x_gates = x_gates + self.hh.bias
        w_hh = self.hh.effective_weight().t()
        outputs = []
        for t in range(input.size(0)):
            gates = torch.addmm(x_gates[t], h, w_hh)
            h, c = onlstm_step(gates, c, C, K)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class ONLSTMStack(nn.Module):
    """The cells, with locked dropout between layers (not after the last one)."""

    def __init__(self, layer_sizes: list[int], chunk_size: int, dropout: float = 0.0, dropconnect: float = 0.0):
        super().__init__()
        self.sizes = list(layer_sizes)
        self.cells = nn.ModuleList(
            ONLSTMCell(layer_sizes[i], layer_sizes[i + 1], chunk_size, dropconnect=dropconnect)
            for i in range(len(layer_sizes) - 1)
        )
        self.lockdrop = LockedDropout(dropout)

    def init_hidden(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return [cell.init_hidden(batch_size) for cell in self.cells]

    def forward(self, input: Tensor, hidden: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Returns the last layer's raw (undropped) output ``(T, B, H_last)`` and the new per-layer states."""
        new_hidden = []
        x = input
        for k, cell in enumerate(self.cells):
            x, state = cell(x, hidden[k])
            new_hidden.append(state)
            if k < len(self.cells) - 1:
                x = self.lockdrop(x)
        return x, new_hidden


class ONLSTM(nn.Module):
    """Embedding (tied) -> embedded dropout -> locked dropout -> 3 ON-LSTM cells -> locked dropout -> decoder.

    Layer sizes ``ninp -> nhid -> … -> nhid -> ninp`` (the last layer returns to ``ninp`` for the tie), chunk
    size 10, DropConnect ``wdrop`` on every ``hh``. AR and TAR both act on the *undropped* top-layer output
    (an ON-LSTM code quirk, docs/models.md#model-c-on-lstm-ptb).

    Parameters: ``encoder.weight`` (= ``decoder.weight``), ``rnn.cells.{k}.ih.0.{weight,bias}``,
    ``rnn.cells.{k}.hh.{weight,bias}``, ``decoder.bias``. Gate layouts are declared on each
    :class:`ONLSTMCell` for ``ih.0.weight`` and ``hh.weight`` (see :func:`onlstm_gate_layout`).
    """

    def __init__(
        self,
        ntoken: int = 10000,
        ninp: int = 400,
        nhid: int = 1150,
        nlayers: int = 3,
        chunk_size: int = 10,
        dropout_e: float = 0.1,
        dropout_i: float = 0.5,
        dropout_h: float = 0.3,
        dropout_o: float = 0.45,
        wdrop: float = 0.45,
        alpha: float = 2.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.ntoken, self.ninp, self.nhid, self.nlayers = ntoken, ninp, nhid, nlayers
        self.dropout_e = float(dropout_e)
        self.alpha, self.beta = float(alpha), float(beta)
        self.sparsity_exclude: list[str] = []
        self.encoder = nn.Embedding(ntoken, ninp)
        sizes = [ninp] + [nhid] * (nlayers - 1) + [ninp]
        self.rnn = ONLSTMStack(sizes, chunk_size, dropout=dropout_h, dropconnect=wdrop)
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        self.lockdrop_i = LockedDropout(dropout_i)
        self.lockdrop_o = LockedDropout(dropout_o)
        init_embedding_and_decoder(self.encoder, self.decoder)

    def init_hidden(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(h (B, H_l), c (B, H_l/chunk, chunk))``, zeros on the model's device and dtype."""
        return self.rnn.init_hidden(batch_size)

    def forward(self, input: Tensor, hidden: list[tuple[Tensor, Tensor]]) -> LMOutput:
        """``input`` is ``(T, B)`` token ids; returns full-softmax log-probs ``(T*B, V)``; ar = tar = raw top."""
        emb = embedded_dropout(self.encoder, input, self.dropout_e if self.training else 0.0)
        emb = self.lockdrop_i(emb)
        raw_output, hidden = self.rnn(emb, hidden)
        output = self.lockdrop_o(raw_output)
        logits = self.decoder(output.view(-1, self.ninp))
        return LMOutput(F.log_softmax(logits, dim=-1), hidden, raw_output, raw_output)
