"""The inference modules: :class:`SparseLinear`, :class:`SparseRNN` and :class:`SparseRNNCell`, each weight in the
format chosen for it (dense, torch CSR, CSR16 or bit mask)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish.inference.crossover import TensorChoice
from lightning_selfish.inference.formats import FORMATS, PackedMatrix, hold, multiply, weight_bytes
from lightning_selfish.inference.kernels import load_kernels

__all__ = ["SparseLinear", "SparseRNN", "SparseRNNCell"]

_RNN_MODES = {nn.LSTM: "LSTM", nn.GRU: "GRU"}
_CELL_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}


class _InferenceOnly(nn.Module):
    def _check_eval(self) -> None:
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} is for inference only (lightning_selfish.inference.to_sparse): call "
                ".eval() on the model; train the dense model instead"
            )


class SparseLinear(_InferenceOnly):
    """``y = x W^T + b`` with ``W`` in ``format``: ``dense``, ``csr`` (torch, 32-bit indices), ``csr16`` or
    ``bitmask`` (the compiled kernels, float32 on the CPU).

    ``format`` defaults to ``choice.format`` when ``choice`` agrees with ``sparse``, else ``csr`` if ``sparse``, else
    ``dense``. One row runs as a matrix-vector product, several as one matrix product. ``choice`` records why the
    format was chosen (:func:`~lightning_selfish.inference.sparse_inference_report`).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        sparse: bool = True,
        choice: TensorChoice | None = None,
        format: str | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        if format is None:
            agrees = choice is not None and choice.sparse == bool(sparse)
            format = choice.format if agrees else ("csr" if sparse else "dense")
        if format not in FORMATS:
            raise ValueError(f"SparseLinear: format must be one of {FORMATS}, got {format!r}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.format = format
        self.sparse = format != "dense"
        self.choice = choice
        held = hold(weight, format, load_kernels() if format in ("csr16", "bitmask") else None)
        if isinstance(held, PackedMatrix):
            self.weight = held  # (a plain attribute: its tensors are the kernels', on the CPU)
        else:
            self.register_buffer("weight", held, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, sparse: bool = True, choice: TensorChoice | None = None, format: str | None = None
    ) -> SparseLinear:
        return cls(linear.weight, linear.bias, sparse=sparse, choice=choice, format=format)

    def forward(self, input: Tensor) -> Tensor:
        self._check_eval()
        if self.format == "dense":
            return F.linear(input, self.weight, self.bias)
        rows = input.reshape(-1, self.in_features)
        if self.format == "csr" and rows.size(0) == 1:
            flat = rows[0]
            out = torch.mv(self.weight, flat) if self.bias is None else torch.addmv(self.bias, self.weight, flat)
            return out.reshape(*input.shape[:-1], self.out_features)
        if self.format == "csr" and self.bias is not None:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, rows.t()).t()
        elif self.format == "csr16" and rows.size(0) > 1:
            out = self.weight.mm(rows, self.bias)  # (the kernel adds the bias as it stores)
        else:
            out = multiply(self.weight, rows)  # a new tensor: the bias is added in place
            if self.bias is not None:
                out.add_(self.bias)
        return out.contiguous().view(*input.shape[:-1], self.out_features)  # contiguous, as F.linear's

    def addmm(self, base: Tensor, rows: Tensor) -> Tensor:
        """``base + rows W^T`` (``base`` ``(N, out)``, ``rows`` ``(N, in)``; the bias is not added)."""
        if self.format == "dense":
            return torch.addmm(base, rows, self.weight.t())
        if self.format == "csr" and rows.size(0) == 1:
            return torch.addmv(base[0], self.weight, rows[0]).unsqueeze(0)
        return multiply(self.weight, rows).add_(base)  # (a new tensor: added in place)

    def weight_bytes(self) -> int:
        """Bytes of the weight as held (what one product reads of it)."""
        return weight_bytes(self.weight)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, {self.format}"


def _cell_step(mode: str, gi: Tensor, h: Tensor, c: Tensor | None, hh: SparseLinear) -> tuple[Tensor, Tensor | None]:
    """One time step from the input part ``gi`` (with every bias that can be folded into it) and the state."""
    if mode == "LSTM":
        gates = hh.addmm(gi, h)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        gh = hh(h)  # its bias is b_hn only (inside the reset gate's product)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None
    pre = hh.addmm(gi, h)
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def _split_biases(
    mode: str, b_ih: Tensor | None, b_hh: Tensor | None, hidden_size: int
) -> tuple[Tensor | None, Tensor | None]:
    """The bias of the input product and of the recurrent product: ``b_hh`` folds into the input side, except GRU's
    ``b_hn``, which sits inside the reset gate's product."""
    if b_ih is None:
        return None, None
    b_ih, b_hh = b_ih.detach(), b_hh.detach()
    if mode != "GRU":
        return b_ih + b_hh, None
    H = hidden_size
    folded = b_ih.clone()
    folded[: 2 * H] += b_hh[: 2 * H]
    recurrent = torch.zeros_like(b_hh)
    recurrent[2 * H :] = b_hh[2 * H :]
    return folded, recurrent


def _rnn_mode(module: nn.Module) -> str:
    if type(module) in _RNN_MODES:
        return _RNN_MODES[type(module)]
    if type(module) in _CELL_MODES:
        return _CELL_MODES[type(module)]
    return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"


class SparseRNN(_InferenceOnly):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (unidirectional, no projection) with each weight CSR or dense.

    Same call and return as the original: ``(input, hx)`` with ``input`` ``(T, B, F)`` (``(B, T, F)`` when
    ``batch_first``, ``(T, F)`` unbatched) -> ``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM. Per layer,
    the input product runs once over all ``T·B`` rows, then the recurrent product once per step over ``B`` rows;
    gate order and formulas are PyTorch's (LSTM ``i, f, g, o``; GRU ``r, z, n``). No dropout (inference).
    """

    def __init__(
        self, rnn: nn.RNNBase, sparse: Mapping[str, bool], choices: Mapping[str, TensorChoice] | None = None
    ) -> None:
        super().__init__()
        if type(rnn) not in (nn.LSTM, nn.GRU, nn.RNN):
            raise TypeError(f"SparseRNN: rnn must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}")
        if rnn.bidirectional or getattr(rnn, "proj_size", 0):
            raise ValueError("SparseRNN: bidirectional RNNs and LSTMs with proj_size are not supported")
        choices = choices or {}
        self.mode = _rnn_mode(rnn)
        self.input_size, self.hidden_size, self.num_layers = rnn.input_size, rnn.hidden_size, rnn.num_layers
        self.batch_first = rnn.batch_first
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()
        for k in range(self.num_layers):
            b_ih, b_hh = (getattr(rnn, f"bias_{w}_l{k}") if rnn.bias else None for w in ("ih", "hh"))
            bias_in, bias_rec = _split_biases(self.mode, b_ih, b_hh, self.hidden_size)
            w_ih, w_hh = f"weight_ih_l{k}", f"weight_hh_l{k}"
            self.ih.append(SparseLinear(getattr(rnn, w_ih), bias_in, sparse[w_ih], choices.get(w_ih)))
            self.hh.append(SparseLinear(getattr(rnn, w_hh), bias_rec, sparse[w_hh], choices.get(w_hh)))

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        self._check_eval()
        lstm = self.mode == "LSTM"
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)
            if hx is not None:
                hx = tuple(s.unsqueeze(1) for s in hx) if lstm else hx.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        steps, batch = input.size(0), input.size(1)
        if hx is None:
            zeros = input.new_zeros(self.num_layers, batch, self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h0, c0 = hx if lstm else (hx, None)
        x = input
        last_h, last_c = [], []
        for k in range(self.num_layers):
            gi = self.ih[k](x.reshape(steps * batch, -1)).reshape(steps, batch, -1)
            h, c = h0[k], c0[k] if lstm else None
            outputs = []
            for t in range(steps):
                h, c = _cell_step(self.mode, gi[t], h, c, self.hh[k])
                outputs.append(h)
            x = torch.stack(outputs)
            last_h.append(h)
            last_c.append(c)
        h_n = torch.stack(last_h)
        state = (h_n, torch.stack(last_c)) if lstm else h_n
        if unbatched:
            return x.squeeze(1), (tuple(s.squeeze(1) for s in state) if lstm else state.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), state

    def extra_repr(self) -> str:
        layouts = ", ".join(f"l{k}: ih {ih.format}, hh {hh.format}" for k, (ih, hh) in enumerate(zip(self.ih, self.hh)))
        return f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers} ({layouts})"


class SparseRNNCell(_InferenceOnly):
    """An ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` with each weight CSR or dense; same call and return."""

    def __init__(
        self, cell: nn.RNNCellBase, sparse: Mapping[str, bool], choices: Mapping[str, TensorChoice] | None = None
    ) -> None:
        super().__init__()
        if type(cell) not in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
            raise TypeError(
                f"SparseRNNCell: cell must be an nn.LSTMCell, nn.GRUCell or nn.RNNCell, got {type(cell).__name__}"
            )
        choices = choices or {}
        self.mode = _rnn_mode(cell)
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        bias_in, bias_rec = _split_biases(self.mode, cell.bias_ih, cell.bias_hh, self.hidden_size)
        self.ih = SparseLinear(cell.weight_ih, bias_in, sparse["weight_ih"], choices.get("weight_ih"))
        self.hh = SparseLinear(cell.weight_hh, bias_rec, sparse["weight_hh"], choices.get("weight_hh"))

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        self._check_eval()
        lstm = self.mode == "LSTM"
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = tuple(s.unsqueeze(0) for s in hx) if lstm else hx.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h, c = hx if lstm else (hx, None)
        h, c = _cell_step(self.mode, self.ih(input), h, c, self.hh)
        if unbatched:
            h, c = h.squeeze(0), (c.squeeze(0) if lstm else None)
        return (h, c) if lstm else h
