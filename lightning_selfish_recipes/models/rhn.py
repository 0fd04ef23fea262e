"""Model B: Recurrent Highway Network, one layer of depth 10, coupled carry gate (docs/models.md#model-b-rhn-ptb)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish_recipes.models.common import (
    GateLayout,
    LMOutput,
    LockedDropout,
    embedded_dropout,
    init_embedding_and_decoder,
)

RHN_GATES: tuple[str, ...] = ("H", "T")


class HighwayBlock(nn.Module):
    """One micro-layer: ``R`` (recurrent transform) and, for the first block only, ``W`` (input transform).

    Both are ``Linear(·, 2H)`` whose rows ``[0:H]`` are the candidate ``H`` (tanh) and ``[H:2H]`` the transform
    gate ``T`` (sigmoid); the carry is coupled (``c = 1 - t``) so there is no C matrix. The recurrence itself is
    run by :class:`RHN` (vectorised over the batch, ``W x`` precomputed over the whole window).
    """

    def __init__(self, in_features: int, hidden_size: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.hidden_size = hidden_size
        if first:
            self.W = nn.Linear(in_features, 2 * hidden_size)
        self.R = nn.Linear(hidden_size, 2 * hidden_size)
        layout: GateLayout = [("H", slice(0, hidden_size)), ("T", slice(hidden_size, 2 * hidden_size))]
        self.gate_layouts: dict[str, GateLayout] = {"R.weight": list(layout)}
        if first:
            self.gate_layouts["W.weight"] = list(layout)


class RHN(nn.Module):
    """Embedding (tied to ``fc1``) -> embedded dropout -> locked dropout -> RHN -> locked dropout -> ``fc1``.

    Per time step, starting from ``s = s_{t-1}`` and for each block ``l``:
    ``[ĥ; t̂] = [W x_t + b_W if l == 0] + R_l(s ⊙ m) + b_Rl``, ``s ← tanh(ĥ) ⊙ σ(t̂) + s ⊙ (1 - σ(t̂))``.
    The hidden-dropout mask ``m`` (``(B, H)``, Bernoulli(1-p)/(1-p)) is drawn once per forward call and shared
    by all time steps and all micro-layers; the carry uses the undropped ``s``. No AR/TAR.

    Parameters: ``embedding.weight`` (= ``fc1.weight``), ``highways.0.W.{weight,bias}``,
    ``highways.{0..depth-1}.R.{weight,bias}``, ``fc1.bias``. (The Selfish-RNN code nests these one level deeper,
    as ``rnns.0.highways.…``; there is only one RHN layer, so the prefix is dropped.)
    """

    def __init__(
        self,
        ntoken: int = 10000,
        ninp: int = 830,
        nhid: int = 830,
        depth: int = 10,
        dropout_e: float = 0.2,
        dropout_i: float = 0.65,
        dropout_h: float = 0.25,
        dropout_o: float = 0.65,
        tie_weights: bool = True,
        alpha: float = 0.0,
        beta: float = 0.0,
    ) -> None:
        super().__init__()
        if tie_weights and ninp != nhid:
            raise ValueError("tie_weights requires ninp == nhid")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.ntoken, self.ninp, self.nhid, self.depth = ntoken, ninp, nhid, depth
        self.dropout_e, self.dropout_h = float(dropout_e), float(dropout_h)
        self.alpha, self.beta = float(alpha), float(beta)
        self.sparsity_exclude: list[str] = []
        self.embedding = nn.Embedding(ntoken, ninp)
        self.highways = nn.ModuleList(HighwayBlock(ninp, nhid, first=(k == 0)) for k in range(depth))
        self.fc1 = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.fc1.weight = self.embedding.weight
        self.lockdrop_i = LockedDropout(dropout_i)
        self.lockdrop_o = LockedDropout(dropout_o)
        init_embedding_and_decoder(self.embedding, self.fc1)

    def init_hidden(self, batch_size: int) -> Tensor:
        """Zero state ``(B, nhid)`` on the model's device and dtype."""
        return self.embedding.weight.new_zeros(batch_size, self.nhid)

    def sample_hidden_mask(self, reference: Tensor) -> Tensor | None:
        """The per-window hidden-dropout mask ``(B, H)``, or ``None`` (no dropout) in eval or when p == 0."""
        if not self.training or not self.dropout_h:
            return None
        p = self.dropout_h
        return reference.new_empty(reference.shape).bernoulli_(1.0 - p).div_(1.0 - p)

    def recurrence(self, x: Tensor, s: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Run the highway recurrence over ``x`` ``(T, B, ninp)`` from state ``s`` with a fixed hidden mask.

        Returns the outputs ``(T, B, H)`` (the state after the last micro-layer at each step) and the final state.
        """
        first = self.highways[0]
        # x enters only block 0; its transform (and block 0's R bias) is computed for the whole window at once.
        wx = F.linear(x, first.W.weight, first.W.bias + first.R.bias)
        weights = [blk.R.weight.t() for blk in self.highways]
        biases = [blk.R.bias for blk in self.highways]
        H = self.nhid
        outputs = []
        for t in range(x.size(0)):
            for k in range(self.depth):
                sm = s if mask is None else s * mask
                pre = torch.addmm(wx[t] if k == 0 else biases[k], sm, weights[k])
                h = torch.tanh(pre[:, :H])
                gate = torch.sigmoid(pre[:, H:])
                s = torch.lerp(s, h, gate)  # h * t + s * (1 - t)
            outputs.append(s)
        return torch.stack(outputs), s

    def forward(self, input: Tensor, hidden: Tensor) -> LMOutput:
        """``input`` is ``(T, B)`` token ids; returns full-softmax log-probs ``(T*B, V)`` and the new state."""
        emb = embedded_dropout(self.embedding, input, self.dropout_e if self.training else 0.0)
        x = self.lockdrop_i(emb)
        mask = self.sample_hidden_mask(hidden)
        output, hidden = self.recurrence(x, hidden, mask)
        output = self.lockdrop_o(output)
        logits = self.fc1(output.view(-1, self.nhid))
        return LMOutput(F.log_softmax(logits, dim=-1), hidden, None, None)
