"""How a run finds its masks, without Lightning: drawn for a fresh run, continued from a previous fit, or restored
from a checkpoint. The sparsity callback decides which (its hooks know the trainer); these build the engine over
the run's parameters and set the controller's state to match."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.gates import GateLayout
from lightning_selfish.core.sharding import as_sharded_like, rows_for
from lightning_selfish.run.controller import SparsityController
from lightning_selfish.run.selection import adopt_existing_masks

__all__ = ["check_masks_fit", "continued_engine", "fresh_engine", "restored_engine"]


def fresh_engine(
    controller: SparsityController,
    params: Mapping[str, Tensor],
    layouts: Mapping[str, GateLayout],
    device: torch.device,
    seed: int,
) -> tuple[SparseEngine, bool]:
    """A fresh run seeded ``seed``: the weights' own zero pattern when they are already sparse at the asked-for
    counts (returns ``True`` then), else random masks from the mask stream; then the generator moves to the growth
    stream."""
    config = controller.config
    generator = controller.seed_run(seed, controller.growth_seed, device)
    budgets = config.init.budgets({name: p.shape for name, p in params.items()}, 1.0 - config.sparsity)
    adopted = adopt_existing_masks(params, budgets)
    if adopted is not None:
        engine = SparseEngine(params, adopted, layouts, config.gate_redistribution)
    else:
        engine = SparseEngine.initialize(
            params, config.sparsity, generator, config.init, layouts, config.gate_redistribution, config.structure
        )
    controller.start_growth_stream()
    engine.apply_masks_()
    return engine, adopted is not None


def continued_engine(
    controller: SparsityController,
    previous: SparseEngine,
    params: Mapping[str, Tensor],
    layouts: Mapping[str, GateLayout],
    restart_cadence: bool,
) -> SparseEngine:
    """A later fit: the previous fit's masks go on over these parameters; ``restart_cadence`` (a new trainer that
    counts from step 0) restarts the schedule over the new run."""
    masks = {name: as_sharded_like(t.mask, t.owner) for name, t in previous.tensors.items()}  # (whole shapes)
    previous.detach()
    check_masks_fit(masks, params, "the previous fit")
    masks = {name: rows_for(mask, params[name]) for name, mask in masks.items()}
    if restart_cadence:
        controller.restart_cadence()
    controller.gradients = None
    engine = SparseEngine(
        params, {name: mask.clone() for name, mask in masks.items()}, layouts, controller.config.gate_redistribution
    )
    engine.apply_masks_()
    return engine


def restored_engine(
    controller: SparsityController,
    state: Mapping[str, Any],
    params: Mapping[str, Tensor],
    layouts: Mapping[str, GateLayout],
    device: torch.device,
) -> SparseEngine:
    """A run resumed from a checkpoint's state (the callback's ``state_dict``): its masks, its schedule state."""
    config = controller.config
    masks: dict[str, Tensor] = state["masks"]
    check_masks_fit(masks, params, "the checkpoint")
    if state.get("sparsity", config.sparsity) != config.sparsity:
        raise ValueError(
            f"the checkpoint was trained with sparsity={state['sparsity']}, this callback has "
            f"sparsity={config.sparsity}: resume with the same sparsity"
        )
    if state.get("method", "selfish") != config.name:
        raise ValueError(
            f"the checkpoint was trained with method={state.get('method', 'selfish')!r}, this callback has "
            f"method={config.name!r}: resume with the same method"
        )
    controller.load_state_dict(dict(state), device)
    if controller.gradients is not None:  # (whole tensors: this rank's rows of each)
        controller.gradients = {name: rows_for(g, params[name]) for name, g in controller.gradients.items()}
    masks = {name: rows_for(mask, params[name]) for name, mask in masks.items()}
    engine = SparseEngine(params, masks, layouts, controller.config.gate_redistribution)
    engine.apply_masks_()
    return engine


def check_masks_fit(masks: Mapping[str, Tensor], params: Mapping[str, Tensor], source: str) -> None:
    """Refuse masks (of ``source``) that do not name the same parameters with the same shapes."""
    if set(masks) != set(params):
        raise ValueError(
            f"{source}'s sparsity masks do not match the parameters chosen for sparsification: "
            f"only in {source}: {sorted(set(masks) - set(params))}; "
            f"only in the model: {sorted(set(params) - set(masks))}"
        )
    for name, mask in masks.items():
        if mask.shape != params[name].shape:
            raise ValueError(
                f"{source}'s mask for {name!r} has shape {tuple(mask.shape)}, the parameter has "
                f"{tuple(params[name].shape)}"
            )
