"""AWD-LSTM-MoS's ``small_batch_size``: a batch's columns in groups, whose gradients add up to one step's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def group_sizes(batch_size: int, small_batch_size: int) -> list[int]:
    """The number of columns of each group: ``small_batch_size``, the last one what is left."""
    return [min(small_batch_size, batch_size - start) for start in range(0, batch_size, small_batch_size)]


class GroupGradients:
    """The summed gradients of the groups whose backward the training step ran itself (all but the last).

    :meth:`accumulate` runs one group's backward as ``torch.autograd.grad`` into a buffer, which frees its graph
    before the next group's forward (the point of the split: memory); :meth:`add_to_grads` adds the buffer to the
    parameters' ``.grad`` after Lightning's backward of the last group (Lightning zeroes ``.grad`` between
    ``training_step`` and its backward).
    """

    def __init__(self) -> None:
        self._grads: dict[Tensor, Tensor | None] | None = None

    def accumulate(self, loss: Tensor, params: Sequence[Tensor], pre_backward: Callable[[Tensor], Tensor]) -> None:
        """Add the gradient of ``loss`` (scaled by ``pre_backward``: mixed precision's loss scale)."""
        grads = torch.autograd.grad(pre_backward(loss), params, allow_unused=True)
        if self._grads is None:
            self._grads = dict(zip(params, grads))
            return
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            held = self._grads.get(param)
            self._grads[param] = grad if held is None else held.add_(grad)

    def add_to_grads(self) -> None:
        """Add the held gradients to ``.grad`` and forget them (nothing when none are held)."""
        groups, self._grads = self._grads, None
        if not groups:
            return
        with torch.no_grad():
            for param, grad in groups.items():
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
