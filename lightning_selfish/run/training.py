"""``SparseTraining``: sparse training in a loop of your own, without Lightning (plain, DDP or FSDP2's ``fully_shard``).

What :class:`~lightning_selfish.callbacks.sparsity.SelfishSparsityCallback` does through Lightning's hooks, as calls
a loop makes: :meth:`SparseTraining.start` before the first step, :meth:`~SparseTraining.before_optimizer_step` and
:meth:`~SparseTraining.after_optimizer_step` around every optimizer step, :meth:`~SparseTraining.after_epoch` at an
epoch's end, and :meth:`~SparseTraining.state_dict` / :meth:`~SparseTraining.load_state_dict` for
``torch.distributed.checkpoint``. The hooks only delegate: to the run controller (when, and the run's state), the
run's set-up (:mod:`lightning_selfish.run.setup`) and the engine (the masks). docs/distributed.md has a whole loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.gates import GateLayoutSpec
from lightning_selfish.core.sharding import as_sharded_like
from lightning_selfish.core.types import UpdateStats
from lightning_selfish.method import catalogue
from lightning_selfish.method.parts import MethodConfig, UpdateAmount
from lightning_selfish.method.schedules import check_run
from lightning_selfish.run.collective import Collective, collective_for
from lightning_selfish.run.controller import SparsityController
from lightning_selfish.run.selection import chosen_parameters
from lightning_selfish.run.setup import fresh_engine, restored_engine

__all__ = ["SparseTraining"]

log = logging.getLogger(__name__)

#: The keys of :meth:`SparseTraining.state_dict` besides the controller's.
_OWN_KEYS = ("masks", "gradients", "step", "sparsity", "method", "gate_redistribution", "parts")


class SparseTraining:
    """Train ``module``'s weights sparse in your own loop: the masks, their enforcement and the topology updates.

    Args:
        module: the model (plain, wrapped by DDP, or with ``fully_shard`` applied: parameters that are ``DTensor``\\ s
            sharded by rows keep each rank's rows of their masks, and updates count over every rank's part).
        optimizers: the optimizers that step the sparsified weights (their state is re-zeroed and reset with the
            masks).
        sparsity: fraction of the sparsified weights that is zero, in (0, 1).
        total_steps: the run's length in optimizer steps (the schedules anneal over it).
        seed: seed of the run's draws (initial masks, random growth); every rank must pass the same.
        method: the preset (``"selfish"``, ``"rigl"``, ``"set"``, ...: docs/methods.md).
        include, exclude: fnmatch patterns of the parameters to sparsify / keep dense (as the callback's).
        gate_layouts: stacked weights that are not detected (as the callback's).
        steps_per_epoch: the optimizer steps of an epoch, for a method updated at epoch ends (``update_every=
            "epoch"``): its updates are counted before the run, and a gradient-reading method keeps the gradient of
            an epoch's last step only. ``None``: unknown (the gradient is then copied at every step).
        growth_seed: seed of random growth alone; default derived from ``seed``.
        mask_gradients: zero the inactive weights' gradients in :meth:`before_optimizer_step` (before clipping).
        **method_parts: the method's overrides, as :func:`lightning_selfish.methods.resolve` takes them
            (``prune_rate``, ``update_every``, ``growth``, ...).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        sparsity: float,
        total_steps: int,
        seed: int,
        method: str = "selfish",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        gate_layouts: Mapping[str, GateLayoutSpec] | None = None,
        steps_per_epoch: int | None = None,
        growth_seed: int | None = None,
        mask_gradients: bool = False,
        **method_parts: Any,
    ) -> None:
        config = catalogue.resolve(method, sparsity, **method_parts)
        _check_arguments(optimizers, total_steps, seed, growth_seed, steps_per_epoch, include, exclude)
        if not isinstance(mask_gradients, bool):
            raise TypeError(f"mask_gradients must be a bool, got {mask_gradients!r}")
        self.module = module
        self.optimizers = list(optimizers)
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.gate_layouts = dict(gate_layouts or {})
        self.steps_per_epoch = steps_per_epoch
        self.mask_gradients = mask_gradients
        self.controller = SparsityController(config, seed, growth_seed, total_steps)
        self.engine: SparseEngine | None = None
        self.step = 0  # the last optimizer step this run has seen (after_optimizer_step)
        self._params: dict[str, Tensor] = {}
        self._layouts: dict = {}
        self._collective: Collective | None = None

    @property
    def config(self) -> MethodConfig:
        """The method as this run runs it (the controller's: the cadence scaled to the run, or restored)."""
        return self.controller.config

    @property
    def num_updates(self) -> int:
        return self.controller.num_updates

    @property
    def masks(self) -> dict[str, Tensor]:
        """The live masks (of a sharded parameter, this rank's rows)."""
        return self._started("masks").masks

    # ----------------------------------------------------------------------------------------------------------
    # the loop's calls
    # ----------------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Before the first step: the run's cadence, the masks (drawn, or the weights' own zero pattern when they
        are already sparse at the asked-for counts) applied, and their enforcement attached to the optimizers."""
        if self.engine is not None:
            raise RuntimeError("SparseTraining.start() was already called: call it once, before the first step")
        controller = self.controller
        check_run(controller.total_steps, controller.requested)
        notice = controller.plan(controller.total_steps, epoch_ends=self._epoch_ends())
        if notice is not None:
            log.info(notice)
        self._params, self._layouts = chosen_parameters(self.module, self.include, self.exclude, self.gate_layouts)
        self._collective = collective_for(_world_size())
        assert controller.seed is not None
        engine, adopted = fresh_engine(controller, self._params, self._layouts, self._device, controller.seed)
        if adopted:
            log.info(
                "SparseTraining: the weights are already sparse at the asked-for counts: their zero pattern is "
                "the initial masks"
            )
        self._attach(engine)

    def before_optimizer_step(self, step: int) -> None:
        """Before optimizer step ``step`` (counted from 1) and before gradient clipping: keep the dense gradient
        when the update after this step reads it; with ``mask_gradients``, zero the inactive weights'."""
        engine = self._started("before_optimizer_step")
        self._check_step(step, "before_optimizer_step")
        last_batch = self.steps_per_epoch is not None and step % self.steps_per_epoch == 0
        self.controller.keep_gradients(engine, step - 1, last_batch)
        if self.mask_gradients:
            engine.mask_gradients_()

    def after_optimizer_step(self, step: int) -> UpdateStats | None:
        """After optimizer step ``step`` (counted from 1): the topology update due then (step cadence), run; its
        statistics, or ``None`` when none was due."""
        self._started("after_optimizer_step")
        self._check_step(step, "after_optimizer_step")
        self.step = step
        return self._run(self.controller.update_due_after_step(step), step, cadence_by_epoch=False)

    def after_epoch(self, epoch: int) -> UpdateStats | None:
        """At the end of epoch ``epoch`` (counted from 0; after its validation, before its checkpoint and the next
        epoch's first step): the update due then (``update_every="epoch"``), run; its statistics, or ``None``."""
        self._started("after_epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"after_epoch(epoch) takes the number of the epoch that ended, from 0; got {epoch!r}")
        return self._run(self.controller.update_due_at_epoch_start(epoch, self.step), self.step, cadence_by_epoch=True)

    def stop(self) -> None:
        """Remove the enforcement hooks from the optimizers (the masks stay readable)."""
        if self.engine is not None:
            self.engine.detach()

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run's state for ``torch.distributed.checkpoint``: the masks (and kept dense gradients) as copies,
        ``DTensor``\\ s placed like their parameters when these are sharded (each rank saves its rows; nothing is
        gathered), whole tensors otherwise; the controller's state (plain values, the same on every rank).

        It is also the template ``dcp.load`` reads into: take it after :meth:`start`, load, and hand it to
        :meth:`load_state_dict`."""
        engine = self._started("state_dict")
        gradients = self.controller.gradients
        if gradients is not None and not self.controller.running_gradient:
            raise RuntimeError(
                f"SparseTraining.state_dict() while a dense gradient is kept for an update not yet run (kept at "
                f"before_optimizer_step for the update of after_optimizer_step, or at an epoch's last step for "
                f"after_epoch; last step {self.step}): save the checkpoint after that call"
            )
        owners = {name: t.owner for name, t in engine.tensors.items()}
        state = self.controller.state_dict()
        state.update(
            masks={name: as_sharded_like(t.mask.clone(), t.owner) for name, t in engine.tensors.items()},
            gradients=None
            if gradients is None
            else {name: as_sharded_like(g.clone(), owners[name]) for name, g in gradients.items()},
            step=self.step,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s contents (read by ``dcp.load``, or ``torch.load`` of a saved one): the
        saved masks placed into this run's sharding (any number of ranks; whole tensors or ``DTensor``\\ s), the
        schedule, the random streams and the step go on."""
        engine = self._started("load_state_dict")
        missing = [key for key in (*_OWN_KEYS, "generator", "num_updates") if key not in state]
        if missing:
            raise ValueError(f"not a SparseTraining state: it lacks {missing} (got keys {sorted(state)})")
        restored = restored_engine(self.controller, state, self._params, self._layouts, self._device)  # (checks first)
        engine.detach()
        self.step = int(state["step"])
        self._attach(restored)

    # ----------------------------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def _attach(self, engine: SparseEngine) -> None:
        """Enforce ``engine``'s masks after every step of the optimizers; decide which gradients updates keep."""
        config = self.config
        for optimizer in self.optimizers:
            # Momentum growth ranks inactive positions by their momentum, which must keep accumulating there.
            engine.attach(optimizer, mask_state=not config.reads_momentum, grown_state=config.grown_optimizer_state)
        self.engine = engine
        unknown_epoch_end = config.by_epoch and self.steps_per_epoch is None
        self.controller.prepare_gradients(self.optimizers, unknown_epoch_end)
        if self.controller.running_gradient and self.controller.gradients is None:
            # (buffers from the start, so that a checkpoint's template always has them: see state_dict)
            self.controller.gradients = {name: torch.zeros_like(t.param) for name, t in engine.tensors.items()}

    def _run(self, amount: UpdateAmount | None, step: int, cadence_by_epoch: bool) -> UpdateStats | None:
        """The update due (``amount``) at a point of the method's cadence; the gradient kept for it is dropped
        after it (none may be due: the run's last step, NT-ASGD's skip), unless it is refreshed at every step."""
        assert self.engine is not None
        controller = self.controller
        stats = (
            None
            if amount is None
            else controller.run_update(self.engine, amount, step, self.optimizers, self._collective)
        )
        if cadence_by_epoch == self.config.by_epoch and not controller.running_gradient:
            controller.gradients = None
        return stats

    def _started(self, call: str) -> SparseEngine:
        if self.engine is None:
            raise RuntimeError(f"SparseTraining.{call}() before start(): call start() once, before the first step")
        return self.engine

    def _check_step(self, step: int, call: str) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step <= self.step:
            raise ValueError(
                f"{call}(step) takes the number of the optimizer step, counted from 1 and growing: after step "
                f"{self.step} it must be an int greater than {self.step}, got {step!r}"
            )

    def _epoch_ends(self) -> range | None:
        every, total = self.steps_per_epoch, self.controller.total_steps
        return None if every is None else range(every, total, every)


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _check_arguments(
    optimizers: Any,
    total_steps: Any,
    seed: Any,
    growth_seed: Any,
    steps_per_epoch: Any,
    include: Any,
    exclude: Any,
) -> None:
    """The arguments of the run (the method's are checked by ``catalogue.resolve``)."""
    if isinstance(optimizers, torch.optim.Optimizer) or not all(
        isinstance(o, torch.optim.Optimizer) for o in optimizers
    ):
        raise TypeError(f"optimizers must be a list of torch.optim.Optimizer, got {optimizers!r}")
    for arg, value, allowed in (
        ("total_steps", total_steps, "a positive int"),
        ("steps_per_epoch", steps_per_epoch, "a positive int or None"),
    ):
        if value is None and arg == "steps_per_epoch":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be {allowed}, got {value!r}")
    for arg, value in (("seed", seed), ("growth_seed", growth_seed)):
        if (value is not None or arg == "seed") and (isinstance(value, bool) or not isinstance(value, int)):
            allowed = "an int, the same on every rank" if arg == "seed" else "an int or None"
            raise TypeError(f"{arg} must be {allowed}, got {value!r}")
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{arg} must be a list of name patterns (str), got {patterns!r}")
