"""How a topology change reaches an optimizer.

After every topology update (and once when masks are first attached) the sparsity engine

1. multiplies every optimizer state tensor shaped like a sparsified parameter (momentum buffers, Adam moments,
   averages, counters) by ``update.kept``: removed positions are zeroed and grown positions start from a fresh
   (zero) state, whatever the optimizer;
2. then, if the optimizer defines ``on_mask_update(param, update)``, calls it with a :class:`MaskUpdate`, so an
   optimizer that needs the topology itself (``SNTASGD`` averages each weight over its own lifetime) can react.

That method is the whole protocol (:class:`~lightning_selfish.core.protocols.MaskAwareOptimizer`); it is optional and
any ``torch.optim.Optimizer`` works without it. An optimizer whose own step already leaves its state zero at
inactive positions (``SNTASGD``) may also set the class attribute ``keeps_inactive_state_zero = True``
(:class:`~lightning_selfish.core.protocols.KeepsInactiveStateZero`): the engine then skips re-zeroing its state after
every step (weights are still re-zeroed), which saves two passes over each sparse tensor per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from lightning_selfish.core.protocols import MaskAwareOptimizer
from lightning_selfish.core.sharding import local_tensor
from lightning_selfish.core.types import MaskUpdate
from lightning_selfish.method.parts import GrownState
from lightning_selfish.method.shards import Span

#: The moments of the Adam family (Adam, AdamW, NAdam, RAdam, Adamax keep these names); ``grown_optimizer_state``
#: decides what a grown weight's moments are.
ADAM_MOMENTS: frozenset[str] = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf"})
#: Second moments: the per-weight scale of Adam's step (``tensor_mean`` starts a grown weight's at its tensor's mean).
SECOND_MOMENTS: frozenset[str] = frozenset({"exp_avg_sq", "max_exp_avg_sq", "exp_inf"})

#: The rules of ``grown_optimizer_state`` (:class:`~lightning_selfish.method.parts.GrownState`; evidence in
#: docs/methods.md, "Adam and grown weights"):
#:
#: * ``ZERO``: every state tensor is zero at inactive positions (re-zeroed after every step) and a grown weight
#:   starts with zero state (RigL's code; with Adam its first steps are ~1/sqrt(1 - beta2^t) times larger).
#: * ``DENSE``: Adam's moments are never masked: they keep accumulating the dense gradient at inactive positions,
#:   and a grown weight starts with them (the Selfish-RNN authors' code, which masks only SGD's momentum).
#: * ``TENSOR_MEAN``: as ``ZERO``, but a grown weight's second moment starts at the mean second moment of its
#:   tensor's surviving weights, so its first steps are as large as theirs.
#:
#: The state entries each rule never masks:
NEVER_MASKED: dict[GrownState, frozenset[str]] = {GrownState.DENSE: ADAM_MOMENTS}
#: The state entries a grown weight starts at its tensor's mean of, under each rule:
STARTS_AT_TENSOR_MEAN: dict[GrownState, frozenset[str]] = {GrownState.TENSOR_MEAN: SECOND_MOMENTS}


def state_items_like(optimizer: torch.optim.Optimizer, param: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Every ``(key, tensor)`` in ``optimizer.state[param]`` whose tensor has the parameter's shape; for a sharded
    parameter (a ``DTensor``), the local shard of each (a view: in-place changes reach the state)."""
    for key, value in optimizer.state.get(param, {}).items():
        if isinstance(value, Tensor) and value.shape == param.shape:
            yield key, local_tensor(value)


def dense_state_keys(grown_optimizer_state: GrownState | str) -> frozenset[str]:
    """The state entries that are never masked under ``grown_optimizer_state``."""
    return NEVER_MASKED.get(GrownState(grown_optimizer_state), frozenset())


def reset_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer],
    param: Tensor,
    update: MaskUpdate,
    grown_state: GrownState | str = GrownState.ZERO,
    keep_dense: bool = False,
    span: Span | None = None,
) -> None:
    """Zero state at removed and grown positions (as ``grown_state`` says), then notify mask-aware optimizers.

    ``keep_dense`` (SNFS: growth reads the momentum, which must keep accumulating where weights are inactive)
    leaves the state untouched; mask-aware optimizers are told either way. ``param`` is the parameter the optimizer
    holds; the masks of ``update`` are its local part (``span``: where it lies, for a tensor mean over every
    rank's part).
    """
    dense_keys = dense_state_keys(grown_state)
    mean_keys = STARTS_AT_TENSOR_MEAN.get(GrownState(grown_state), frozenset())
    for optimizer in optimizers:
        if not any(p is param for group in optimizer.param_groups for p in group["params"]):
            continue
        if not keep_dense:
            for key, state in state_items_like(optimizer, param):
                if key in dense_keys:
                    continue
                if key in mean_keys and update.old is not None:
                    kept = update.kept.to(state.dtype)
                    # (on the device, no host sync; in float64, where sums of float32 values of a tensor's range are
                    # exact, so that a tensor split over ranks gets one process's mean: tests/test_sharded_update.py)
                    sums = torch.stack([(state * kept).sum(dtype=torch.float64), kept.sum(dtype=torch.float64)])
                    if span is not None:
                        span.sum_(sums)
                    mean = (sums[0] / sums[1].clamp(min=1.0)).to(state.dtype)
                    state.mul_(kept).add_(update.grown.to(state.dtype) * mean)
                    continue
                state.mul_(update.kept)
        if isinstance(optimizer, MaskAwareOptimizer):
            optimizer.on_mask_update(param, update)
