"""Model A: the stacked ("Zaremba-large") LSTM of the PyTorch word_language_model .

See docs/models.md#model-a-stacked-lstm-ptb.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfish_recipes.models.common import LMOutput, init_embedding_and_decoder


class StackedLSTM(nn.Module):
    """Embedding -> Dropout -> cuDNN ``nn.LSTM`` (dropout between layers) -> Dropout -> Linear, untied.

    The single ``dropout`` rate acts at three places, exactly as the Selfish-RNN code does: standard
    (per-element, per-step) dropout on the embeddings, the LSTM's built-in dropout between layers, and standard
    dropout on the top output. No AR/TAR, no weight drop, no embedding dropout.

    Parameters: ``encoder.weight``, ``rnn.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}``, ``decoder.weight``,
    ``decoder.bias``. Gate layout of the LSTM tensors is the PyTorch order i|f|g|o (auto-detected on
    ``nn.LSTM``, so nothing is declared here).
    """

    def __init__(
        self,
        ntoken: int = 10000,
        ninp: int = 1500,
        nhid: int = 1500,
        nlayers: int = 2,
        dropout: float = 0.65,
        alpha: float = 0.0,
        beta: float = 0.0,
    ) -> None:
        super().__init__()
        self.ntoken, self.ninp, self.nhid, self.nlayers = ntoken, ninp, nhid, nlayers
        self.alpha, self.beta = float(alpha), float(beta)
        self.sparsity_exclude: list[str] = []
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        self.drop = nn.Dropout(dropout)
        init_embedding_and_decoder(self.encoder, self.decoder)

    def init_hidden(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Zero ``(h, c)``, each ``(nlayers, B, nhid)``, on the model's device and dtype."""
        w = self.encoder.weight
        return (
            w.new_zeros(self.nlayers, batch_size, self.nhid),
            w.new_zeros(self.nlayers, batch_size, self.nhid),
        )

    def forward(self, input: Tensor, hidden: tuple[Tensor, Tensor]) -> LMOutput:
        """``input`` is ``(T, B)`` token ids; returns full-softmax log-probs ``(T*B, V)``."""
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        logits = self.decoder(output.view(-1, self.nhid))
        return LMOutput(F.log_softmax(logits, dim=-1), hidden, None, None)
