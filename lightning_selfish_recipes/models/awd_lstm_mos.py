"""Model D: AWD-LSTM with a Mixture-of-Softmaxes output (Yang et al. 2018) on WikiText-2.

See docs/models.md#model-d-awd-lstm-mos-wikitext-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish_recipes.models.common import (
    LMOutput,
    LockedDropout,
    WeightDrop,
    embedded_dropout,
    init_embedding_and_decoder,
)


class AWDLSTMMoS(nn.Module):
    """Embedding (tied) -> 3 WeightDrop single-layer LSTMs -> latent tanh projection -> K-expert softmax mixture.

    Forward (docs/models.md#model-d-awd-lstm-mos-wikitext-2): embedded dropout, locked dropout ``dropout_i``; LSTMs
    with locked dropout ``dropout_h`` between them; locked dropout ``dropout_o`` on the top output (``output``,
    ``(T, B, nhidlast)``);
    ``latent = tanh(Linear(nhidlast, K·ninp)(output))`` with locked dropout ``dropout_l`` over the ``K·ninp``
    features; per-expert logits ``decoder(latent.view(-1, ninp))``; mixture weights
    ``softmax(prior(output))`` (``prior`` has no bias and reads the *dropped* output); log-probs are
    ``log(Σ_k π_k softmax_k + 1e-8)``. AR acts on the dropped output, TAR on the raw last-layer output.

    Every LSTM is wrapped in :class:`WeightDrop` (also when ``wdrop == 0``, so parameter names never change).
    Parameters: ``encoder.weight`` (= ``decoder.weight``), ``rnns.{k}.module.{weight_ih_l0,bias_ih_l0,
    bias_hh_l0}``, ``rnns.{k}.weight_hh_l0_raw``, ``prior.weight``, ``latent.0.{weight,bias}``, ``decoder.bias``.
    ``prior.weight`` stays dense (``sparsity_exclude``).
    """

    def __init__(
        self,
        ntoken: int = 33278,
        ninp: int = 300,
        nhid: int = 1150,
        nhidlast: int = 650,
        nlayers: int = 3,
        n_experts: int = 15,
        dropout_e: float = 0.1,
        dropout_i: float = 0.55,
        dropout_h: float = 0.2,
        dropout_o: float = 0.4,
        dropout_l: float = 0.29,
        wdrop: float = 0.5,
        alpha: float = 2.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.ntoken, self.ninp, self.nhid, self.nhidlast = ntoken, ninp, nhid, nhidlast
        self.nlayers, self.n_experts = nlayers, n_experts
        self.dropout_e = float(dropout_e)
        self.alpha, self.beta = float(alpha), float(beta)
        self.sparsity_exclude: list[str] = ["prior.weight"]
        # The decoder is applied to each of the K expert latents: K uses per token (lightning_selfish.analysis.flops).
        self.flops_uses_per_token = {"decoder.weight": n_experts}
        self.encoder = nn.Embedding(ntoken, ninp)
        self.hidden_sizes = [nhid if k != nlayers - 1 else nhidlast for k in range(nlayers)]
        self.rnns = nn.ModuleList(
            WeightDrop(nn.LSTM(ninp if k == 0 else nhid, self.hidden_sizes[k], 1), dropout=wdrop)
            for k in range(nlayers)
        )
        self.prior = nn.Linear(nhidlast, n_experts, bias=False)
        self.latent = nn.Sequential(nn.Linear(nhidlast, n_experts * ninp), nn.Tanh())
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        self.lockdrop_i = LockedDropout(dropout_i)
        self.lockdrop_h = LockedDropout(dropout_h)
        self.lockdrop_o = LockedDropout(dropout_o)
        self.lockdrop_l = LockedDropout(dropout_l)
        init_embedding_and_decoder(self.encoder, self.decoder)

    def init_hidden(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Per LSTM ``(h, c)``, each ``(1, B, H_l)``, zeros on the model's device and dtype."""
        w = self.encoder.weight
        return [(w.new_zeros(1, batch_size, size), w.new_zeros(1, batch_size, size)) for size in self.hidden_sizes]

    def forward(self, input: Tensor, hidden: list[tuple[Tensor, Tensor]]) -> LMOutput:
        """``input`` is ``(T, B)`` token ids; returns mixture log-probs ``(T*B, V)``."""
        emb = embedded_dropout(self.encoder, input, self.dropout_e if self.training else 0.0)
        raw_output = self.lockdrop_i(emb)
        new_hidden = []
        for k, rnn in enumerate(self.rnns):
            raw_output, state = rnn(raw_output, hidden[k])
            new_hidden.append(state)
            if k != self.nlayers - 1:
                raw_output = self.lockdrop_h(raw_output)
        output = self.lockdrop_o(raw_output)

        latent = self.lockdrop_l(self.latent(output))
        logits = self.decoder(latent.view(-1, self.ninp))  # (T*B*K, V)
        n_rows = output.size(0) * output.size(1)
        probs = F.softmax(logits, dim=-1).view(n_rows, self.n_experts, self.ntoken)
        del logits
        prior = F.softmax(self.prior(output).view(n_rows, self.n_experts), dim=-1)
        mixture = torch.bmm(prior.unsqueeze(1), probs).squeeze(1)  # Σ_k π_k p_k, (T*B, V)
        log_probs = torch.log(mixture.add_(1e-8))
        return LMOutput(log_probs, new_hidden, output, raw_output)
