"""What one topology update reads besides the method: the signals a part names (:class:`~lightning_selfish.method.
parts.Signal`: the generator, the dense gradient, the momentum), the optimizers whose state it resets, the collective
that makes every rank take rank 0's outcome, and DSR's threshold.

A part says what it reads; :meth:`UpdateContext.read` hands it that, so the update itself never asks which signal a
part wants (a new signal is one entry in ``UpdateContext._readers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_selfish.core.masks import SparseTensor
from lightning_selfish.core.protocols import momentum_is_gradient
from lightning_selfish.core.sharding import local_tensor
from lightning_selfish.method.keys import DrawStream
from lightning_selfish.method.parts import Signal

__all__ = ["UpdateContext", "momentum_of"]


@dataclass
class UpdateContext:
    """What one update reads besides the method: the run's random generator, the optimizers (state to reset,
    momentum to read), the dense gradients of the step before (``None``: the parameters' ``.grad``), DDP's
    ``synchronize`` (overwrites a tensor in place with rank 0's; ``None`` on one process) and DSR's threshold.
    ``draws`` is the run's random stream keyed by position (random growth); ``None``: one made from the generator's
    next 63 random bits, for a caller that has only a generator."""

    generator: torch.Generator
    optimizers: Sequence[torch.optim.Optimizer] = ()
    gradients: Mapping[str, Tensor] | None = None
    synchronize: Callable[[Tensor], None] | None = None
    threshold: float | None = None
    draws: DrawStream | None = None

    def read(self, signal: Signal | None, record: SparseTensor, what: str) -> Tensor | torch.Generator | None:
        """What a part that reads ``signal`` is handed for ``record`` (``None`` for a part that reads nothing);
        ``what`` names the part in the error when the signal is missing."""
        if signal is None:
            return None
        return self._readers()[signal](record, what)

    def _readers(self) -> dict[Signal, Callable[[SparseTensor, str], Tensor | torch.Generator]]:
        return {
            Signal.GENERATOR: self._generator,
            Signal.DRAWS: self._draws,
            Signal.GRADIENT: self.gradient,
            Signal.MOMENTUM: self.momentum,
        }

    def _generator(self, record: SparseTensor, what: str) -> torch.Generator:
        if record.split:
            raise ValueError(
                f"{what} reads a torch.Generator, whose draws over the whole tensor cannot be split across the ranks "
                f"holding {record.name!r}: read Signal.DRAWS (a DrawStream keyed by position) instead"
            )
        return self.generator

    def _draws(self, record: SparseTensor, what: str) -> DrawStream:
        if self.draws is None:
            seed = int(torch.randint(2**62, (1,), generator=self.generator, device=self.generator.device))
            self.draws = DrawStream(seed)
        return self.draws

    def gradient(self, record: SparseTensor, what: str) -> Tensor:
        """The dense gradient of the step before the update (the copy kept for it, else ``.grad``)."""
        gradient = self._gradient_or_none(record)
        if gradient is None:
            raise ValueError(
                f"{what} needs the dense gradient of {record.name!r}, but it has none at the topology update (was "
                "the gradient freed by zero_grad(set_to_none=True)?)"
            )
        return gradient

    def momentum(self, record: SparseTensor, what: str) -> Tensor:
        """SNFS's momentum of the parameter (:func:`momentum_of`)."""
        return momentum_of(self.optimizers, record.owner, self._gradient_or_none(record), record.name, what)

    def _gradient_or_none(self, record: SparseTensor) -> Tensor | None:
        if self.gradients is not None and record.name in self.gradients:
            return self.gradients[record.name].to(record.param.device)
        grad = record.owner.grad
        return None if grad is None else local_tensor(grad)


def momentum_of(
    optimizers: Sequence[torch.optim.Optimizer],
    param: Tensor,
    gradient: Tensor | None,
    name: str,
    what: str = "growth='momentum'",
) -> Tensor:
    """The "momentum" of SNFS for ``param``: SGD's momentum buffer, Adam's ``exp_avg / (sqrt(exp_avg_sq) + 1e-8)``
    (the authors' and sparselearning's choice), or, under an optimizer that has none and says so
    (:class:`~lightning_selfish.core.protocols.GradientAsMomentum`:
    SNT-ASGD), the dense gradient ``gradient``, as the
    paper does for SNFS (SNT-ASGD)."""
    for optimizer in optimizers:
        state = optimizer.state.get(param, {})
        if isinstance(state.get("exp_avg"), Tensor) and isinstance(state.get("exp_avg_sq"), Tensor):
            return local_tensor(state["exp_avg"]) / (local_tensor(state["exp_avg_sq"]).sqrt() + 1e-8)
        if isinstance(state.get("momentum_buffer"), Tensor):
            return local_tensor(state["momentum_buffer"])
    holds = [opt for opt in optimizers if any(p is param for g in opt.param_groups for p in g["params"])]
    if any(momentum_is_gradient(opt) for opt in holds):
        if gradient is None:
            raise ValueError(
                f"{what} under SNT-ASGD uses the dense gradient, but {name!r} has none at the topology update"
            )
        return gradient
    raise ValueError(
        f"{what} needs a momentum buffer for {name!r} (momentum_buffer, or "
        "Adam's exp_avg and exp_avg_sq, in the optimizer state), found none: use SGD with momentum, Adam or SNTASGD"
    )
