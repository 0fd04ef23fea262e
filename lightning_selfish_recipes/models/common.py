"""Building blocks shared by the four language models (docs/models.md#shared-regularisers-and-initialisation).

Everything here is a plain ``torch.nn`` module or function; no Lightning. The regularisers reproduce the
published awd-lstm-lm / Ordered-Neurons / Selfish-RNN code, except that :class:`WeightDrop` does not rely on the
old ``_parameters`` deletion hack at call time (it breaks on torch >= 1.4): the raw weight is the trainable
Parameter and the wrapped RNN is called through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_selfish.core.gates import GateLayout, rnn_gate_names
from lightning_selfish_recipes.compat import forget_rnn_weights


class LMOutput(NamedTuple):
    """What every model's ``forward`` returns.

    ``log_probs`` is ``(T*B, V)`` time-major log-probabilities, ready for ``F.nll_loss`` against the flattened
    targets. ``hidden`` is the new recurrent state (not detached: truncating BPTT is the caller's job). ``ar`` and
    ``tar`` are the tensors the activation / temporal-activation penalties act on (``None`` when the model uses
    none): the caller adds ``alpha * ar.pow(2).mean() + beta * (tar[1:] - tar[:-1]).pow(2).mean()``.
    """

    log_probs: Tensor
    hidden: Any
    ar: Tensor | None
    tar: Tensor | None


def stacked_gate_layout(names: tuple[str, ...] | list[str], size: int) -> GateLayout:
    """Equal-size contiguous row blocks, one per gate, in the given order (PyTorch RNN convention)."""
    return [(name, slice(k * size, (k + 1) * size)) for k, name in enumerate(names)]


def embedded_dropout(embed: nn.Embedding, words: Tensor, dropout: float) -> Tensor:
    """Embedding lookup with whole word types dropped (awd-lstm-lm ``dropoute``).

    One Bernoulli(1-p) mask over vocabulary rows, scaled by 1/(1-p), sampled per call. Mathematically identical
    to masking the full ``(V, E)`` matrix and then looking up (values and gradients), but only the looked-up rows
    are multiplied, which avoids a ``V x E`` temporary every step. Call with ``dropout=0`` in eval.
    """
    emb = F.embedding(
        words,
        embed.weight,
        embed.padding_idx,
        embed.max_norm,
        embed.norm_type,
        embed.scale_grad_by_freq,
        embed.sparse,
    )
    if not dropout:
        return emb
    mask = embed.weight.new_empty(embed.weight.size(0), 1).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
    return emb * F.embedding(words, mask)


class LockedDropout(nn.Module):
    """Variational dropout: one ``(1, B, F)`` mask per call, shared by every time step of the window."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` is ``(T, B, F)``; identity in eval or when ``p == 0``."""
        if not self.training or not self.p:
            return x
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LinearDropConnect(nn.Linear):
    """``nn.Linear`` with DropConnect on the weight, as in the ON-LSTM code (``wdrop``).

    Training: each call to :meth:`effective_weight` draws a fresh element mask with P(drop) = p and zeroes the
    dropped entries; kept entries are *not* rescaled. Eval: ``weight * (1 - p)``. The bias is never dropped.
    The ON-LSTM cell calls :meth:`effective_weight` once per forward (one mask per minibatch, shared over time);
    calling the module directly resamples on every call.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dropout: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.dropout = float(dropout)

    def effective_weight(self) -> Tensor:
        """The weight to multiply by for this forward (masked in training, scaled by 1-p in eval)."""
        if not self.dropout:
            return self.weight
        if self.training:
            drop = torch.empty_like(self.weight, dtype=torch.bool).bernoulli_(self.dropout)
            return self.weight.masked_fill(drop, 0.0)
        return self.weight * (1.0 - self.dropout)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


class WeightDrop(nn.Module):
    """DropConnect on an RNN's recurrent weight (awd-lstm-lm / MoS ``wdrop``), without the parameter hack.

    At construction the wrapped RNN's ``weight_hh_l0`` Parameter is *moved* out of it and registered here as
    ``weight_hh_l0_raw`` (same tensor, same initialisation): it is the trainable, sparsifiable, averaged tensor,
    and the RNN no longer owns a separate ``weight_hh_l0``. Each forward computes
    ``F.dropout(raw, p, training)`` (element-wise, inverted scaling, shared over time and batch within the call;
    identity in eval) and runs the RNN with it through :func:`torch.func.functional_call`.

    The other RNN parameters (``weight_ih_l0`` and the biases) stay on the child ``module``, where a sparsity
    callback auto-detects their ``nn.LSTM`` gate layout. The raw weights are declared in :attr:`gate_layouts`.
    On CUDA, cuDNN warns that the weights are not one contiguous chunk; that copy is the price of the dropout.
    """

    def __init__(self, module: nn.RNNBase, weights: tuple[str, ...] = ("weight_hh_l0",), dropout: float = 0.0):
        super().__init__()
        self.module = module
        self.weights = tuple(weights)
        self.dropout = float(dropout)
        self.gate_layouts: dict[str, GateLayout] = {}
        # The raw weights are multiplied once per token, like the RNN weights they stand for
        # (lightning_selfish.analysis.flops).
        self.flops_uses_per_token = {f"{name}_raw": 1 for name in self.weights}
        gates = rnn_gate_names(module)
        for name in self.weights:
            param = dict(module.named_parameters(recurse=False)).get(name)
            if param is None:
                raise ValueError(f"{type(module).__name__} has no parameter {name!r}")
            delattr(module, name)
            self.register_parameter(f"{name}_raw", param)
            if gates is not None:
                self.gate_layouts[f"{name}_raw"] = stacked_gate_layout(gates, module.hidden_size)
        if isinstance(module, nn.RNNBase):
            forget_rnn_weights(module, self.weights)  # the moved tensors

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Same call signature and return value as the wrapped RNN."""
        weights = {name: F.dropout(getattr(self, f"{name}_raw"), self.dropout, self.training) for name in self.weights}
        try:
            return functional_call(self.module, weights, args, kwargs)
        finally:
            if isinstance(self.module, nn.RNNBase):
                # nn.RNNBase caches the per-call tensors; drop them so the module holds no non-leaf tensor
                # between calls (that would break deepcopy and keep the last graph alive).
                forget_rnn_weights(self.module, self.weights)

    def extra_repr(self) -> str:
        return f"weights={list(self.weights)}, dropout={self.dropout}"


def init_embedding_and_decoder(encoder: nn.Embedding, decoder: nn.Linear, initrange: float = 0.1) -> None:
    """The convention shared by all four repos: embedding and decoder U(-0.1, 0.1), decoder bias 0."""
    with torch.no_grad():
        encoder.weight.uniform_(-initrange, initrange)
        if decoder.weight is not encoder.weight:
            decoder.weight.uniform_(-initrange, initrange)
        if decoder.bias is not None:
            decoder.bias.zero_()
