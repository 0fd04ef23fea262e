"""Token-weighted mean cross-entropy over a whole split: perplexity is ``exp`` of it.

See docs/models.md#loss-and-perplexity.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TokenWeightedCrossEntropy(Metric):
    """``Σ tokens · CE / Σ tokens`` over the windows of a split, summed over DDP ranks.

    ``torchmetrics.MeanMetric`` computes the same mean, but checks every update for NaN with a data-dependent branch,
    a host-device sync per training step on a GPU. Here an update is two in-place additions on the device and
    nothing is read back until :meth:`compute` (a NaN loss still shows, as a NaN perplexity).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, cross_entropy: Tensor, tokens: int) -> None:
        """Add one window: its mean cross-entropy and the number of target tokens it was averaged over."""
        self.total += cross_entropy.detach() * tokens
        self.tokens += tokens

    def compute(self) -> Tensor:
        return self.total / self.tokens
