"""The optimizers of the paper's Table 4 (SNT-ASGD, standard NT-ASGD, SGD, momentum SGD, Adam), built by name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_selfish.core.optim_state import MaskUpdate
from lightning_selfish.optim.sntasgd import SNTASGD

OptimizerName = Literal["sntasgd", "ntasgd", "sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sntasgd", "ntasgd", "sgd", "momentum", "adam")
AVERAGING_OPTIMIZERS: tuple[str, ...] = ("sntasgd", "ntasgd")

#: Table 4's learning-rate drops "(A x, B)": divide by A after B epochs without improvement of ``val_loss``.
PLATEAU_DEFAULTS: dict[str, tuple[float, int]] = {"adam": (0.5, 2), "momentum": (1.0 / 1.33, 1)}


class MaskBlindNTASGD(SNTASGD):
    """Standard NT-ASGD on a sparse model: the ablation "without SNT-ASGD" (Table 5).

    Every weight is averaged over the whole averaging phase, whatever its lifetime. The sparsity engine still
    multiplies the average by the mask after every step (it does so for every optimizer state tensor), so the
    averaged model has exactly the current topology, but a weight grown after the trigger has been zero for most
    of the window and its average stays near zero: the failure mode SNT-ASGD removes. On a dense model this is
    identical to :class:`~lightning_selfish.optim.sntasgd.SNTASGD`.
    """

    #: Unlike SNT-ASGD, the step does write averages at inactive positions: the engine re-zeroes them.
    keeps_inactive_state_zero = False

    def on_mask_update(self, param: Tensor, update: MaskUpdate) -> None:
        """Ignore topology changes: the average of every tensor is the dense running mean since the trigger."""


def build_optimizer(
    params: Iterable[Tensor],
    name: str,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    adam_betas: tuple[float, float],
    adam_eps: float,
    plateau_factor: float,
    plateau_patience: int,
) -> Any:
    """What ``configure_optimizers`` returns for the optimizer ``name`` (one of :data:`OPTIMIZERS`): the optimizer,
    and for momentum SGD and Adam with Table 4's ReduceLROnPlateau on ``val_loss``."""
    params = list(params)
    if name == "sntasgd":
        return SNTASGD(params, lr=lr, weight_decay=weight_decay)
    if name == "ntasgd":
        return MaskBlindNTASGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, betas=adam_betas, eps=adam_eps, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=plateau_factor, patience=plateau_patience, threshold=0.0
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch", "frequency": 1},
    }
