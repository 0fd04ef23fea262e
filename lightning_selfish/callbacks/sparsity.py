"""``SelfishSparsityCallback``: Selfish-RNN's dynamic sparse training as a Lightning callback.

Thin glue: the hooks only say *when*. The resolved method (:mod:`lightning_selfish.method.catalogue`) says *what*;
the run controller (:mod:`lightning_selfish.run.controller`) holds the schedule state and answers whether an update
is due; the engine (:mod:`lightning_selfish.core.engine`) holds the masks, enforces them after every optimizer step
through a step post-hook and runs updates; :mod:`lightning_selfish.run.selection` picks the parameters and checks
what it finds in them. Masks are created at ``on_fit_start`` and updated after validation and checkpointing of an
epoch (epoch cadence) or after an optimizer step (step cadence).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_selfish.callbacks.compat import lightning_classes, tensor_parallel_size
from lightning_selfish.callbacks.protocols import TopologyListener
from lightning_selfish.core.engine import SparseEngine, update_summary
from lightning_selfish.core.gates import GateLayoutSpec
from lightning_selfish.core.types import UpdateStats
from lightning_selfish.method import catalogue
from lightning_selfish.method.parts import (
    GateRedistribution,
    GrownState,
    Growth,
    Init,
    LayerRedistribution,
    MethodConfig,
    Removal,
    RemovedAndRegrown,
    Schedule,
    UpdateAmount,
)
from lightning_selfish.method.schedules import check_run
from lightning_selfish.run import sharded_checkpoint
from lightning_selfish.run.collective import collective_for
from lightning_selfish.run.controller import SparsityController
from lightning_selfish.run.selection import chosen_parameters
from lightning_selfish.run.setup import continued_engine, fresh_engine, restored_engine

#: The method's settings, readable on the callback under their own names (from ``config``; never set there).
_METHOD_SETTINGS = frozenset(
    f for f in MethodConfig.__dataclass_fields__ if f not in ("name", "update_every_given", "min_updates")
)


class SelfishSparsityCallback(Callback):
    r"""Train the chosen weights of any LightningModule sparse, with Selfish-RNN or any method it is compared with.

    (A long class for a reason: a third of it is this docstring, the reference of every argument, and a fifth the
    read-only views of the run's method and state; the code is hooks that delegate to the run controller, the run's
    set-up (:mod:`lightning_selfish.run.setup`: masks drawn, continued or restored) and the engine.)

    Every sparsified tensor starts with a mask with an exact number of active weights. After every optimizer step
    the inactive weights, and every optimizer state tensor shaped like them, are re-zeroed. At each topology update
    a method removes and regrows weights. ``method`` picks a preset (:data:`lightning_selfish.method.catalogue.METHODS`,
    table in ``docs/methods.md``): ``"selfish"`` (the default) removes the fraction ``p`` of each tensor's active
    weights with the smallest magnitude once per epoch and regrows as many at random, starting at zero, ``p``
    cosine-annealed from ``prune_rate`` to ``min_prune_rate``, with the gates of a stacked recurrent weight ranked
    jointly (cell-gate redistribution); ``"static"``, ``"set"``, ``"dsr"``, ``"snfs"``, ``"rigl"`` and ``"gmp"``
    are the paper's baselines.

    Every argument below that defaults to ``None`` means "the preset's value"; an explicit value replaces the
    preset's part (e.g. ``method="rigl", update_every="epoch"`` is RigL as the authors' code ran it); a part may be
    a registered name or a part object (:mod:`lightning_selfish.method.parts`). ``config`` is the resolved method, the
    one source of truth; the method's settings read as attributes of the same names and cannot be set afterwards.

    A later ``fit`` with the same callback continues from its current masks (the schedule follows the trainer's
    step count: the same Trainer continues it, a new Trainer restarts it over the new run). A new callback on a
    model whose weights are already sparse adopts their zero pattern when it has the asked-for counts, and refuses
    otherwise; weights pruned by ``torch.nn.utils.prune``/``parametrize`` or ``ModelPruning`` are refused.

    Args:
        sparsity: fraction of the sparsified weights that is zero, in (0, 1) (GMP: the final sparsity).
        prune_rate: initial fraction of active weights replaced at an update, in [0, 1] (RigL: its α).
        init: ``"uniform"`` (every tensor at ``sparsity``), ``"er"`` / ``"erk"`` (Erdős–Rényi(-Kernel), same total
            count) or ``"dense"`` (GMP: all weights active at the start).
        removal: ``"magnitude"`` (smallest |w|), ``"set"`` (smallest positive and largest negative),
            ``"threshold"`` (DSR: every weight below one global adaptive threshold) or ``"none"``.
        growth: ``"random"``, ``"gradient"`` (RigL, largest dense |grad|), ``"momentum"`` (SNFS) or ``"none"``.
        gate_redistribution: ``True``/``"joint"``: rank removal and growth jointly over all gates of a stacked
            tensor (the method); ``False``/``"none"``: every gate keeps its own count (the paper's ablation);
            ``"magnitude"`` / ``"gradient"``: remove per gate, share the tensor's regrowth over its gates by the mean
            |w| / mean |grad| of their active weights (the paper's Table 6 variants).
        include: fnmatch patterns of parameter names to sparsify, chosen among parameters with 2 or more
            dimensions (weight matrices, embeddings); default all of them. Biases, norm layers and other 1-d
            tensors always stay dense.
        exclude: fnmatch patterns of parameter names to keep dense (e.g. ``["*prior*"]`` for the MoS prior). A
            pattern of ``include``/``exclude`` matches a tied weight by any of its names.
        gate_layouts: ``{param_name: [(gate, rows), ...]}`` for stacked weights that are not detected; see
            :mod:`lightning_selfish.core.gates`. Every entry must name a sparsified parameter (by any of its names).
        update_every: ``"epoch"`` (after each training epoch, after validation) or a number of optimizer steps
            (RigL's ΔT; GMP's pruning frequency Δt).
        seed: seed of the callback's random draws (initial masks, random growth); ``None`` draws one on rank 0 and
            shares it with every rank. It is mixed into independent streams (initial masks, growth), so it may equal
            the global seed of ``seed_everything`` without the masks replaying the weights' initialisation.
        growth_seed: seed of random growth alone; default derived from ``seed``. Two runs with the same ``seed``
            and different ``growth_seed`` start from the same masks and grow differently (Figure 4, right).
        mask_gradients: also zero the gradients of inactive weights in ``on_before_optimizer_step``, i.e. before
            gradient clipping. ``False`` (default) clips the dense gradient, as the authors' code does (clipping
            over the masked gradient makes every clipped step about 1/sqrt(density) times larger).
        min_prune_rate: where the cosine schedule ends (the authors' ``eta_min``, 0.005; RigL: 0).
        total_steps: length of the run in optimizer steps for the schedules: an int, or a function of the trainer
            returning one (``None``: the estimate); default the trainer's ``estimated_stepping_batches``. Give it
            when that is unknown (an iterable without a length, such as variable-length BPTT: the authors use
            ``epochs * train_rows // bptt``) or when the trainer stops on a time limit (``max_time``, which is
            warned about without it).
        verbose: print a per-tensor, per-gate summary at every update (through the progress bar when there is one).
        method: the preset: ``"selfish"``, ``"static"``, ``"set"``, ``"set_selfish_rnn"``, ``"dsr"``, ``"snfs"``,
            ``"rigl"``, ``"gmp"``.
        redistribution: across layers: ``"none"``, ``"nonzeros"`` (DSR: by surviving weights) or ``"momentum"``
            (SNFS: by mean momentum magnitude); counts move between tensors, the total stays exact.
        schedule: ``"cosine"``, ``"gmp"`` (Zhu & Gupta's cubic sparsity, pruning only) or ``"never"`` (static).
        update_until: fraction of the run after which no update happens (RigL: 0.75); the cosine then ends there.
        pruning_start, pruning_end: GMP's first and last pruning step (int) or fraction of the run (float).
        removed_and_regrown: a weight removed and regrown in the same update ``"restart"``\ s at zero with fresh
            optimizer state (the paper, default) or ``"keep"``\ s its value and state, including its SNT-ASGD
            averaging window (the authors' code; RigL).
        grown_optimizer_state: the optimizer state of a grown weight: ``"zero"``, ``"dense"`` (Adam's moments
            never masked) or ``"tensor_mean"`` (its second moment starts at its tensor's mean); see
            :mod:`lightning_selfish.core.optim_state` and docs/methods.md for the measurements behind the defaults.
        threshold, threshold_tolerance: DSR's initial global threshold and the relative miss of the expected
            removal count beyond which it is doubled or halved.

    Monitors (:class:`~lightning_selfish.callbacks.monitor.TopologyMonitor`,
    :class:`~lightning_selfish.callbacks.history.MaskHistory`) hear about the masks as
    :class:`~lightning_selfish.callbacks.protocols.TopologyListener`\ s: at fit start (``stats=None``) and after every
    topology update. The run's schedule state lives in :attr:`controller`
    (:class:`~lightning_selfish.run.controller.SparsityController`), the masks in :attr:`engine`.
    """

    def __init__(
        self,
        sparsity: float,
        prune_rate: float | None = None,
        init: str | Init | None = None,
        removal: str | Removal | None = None,
        growth: str | Growth | None = None,
        gate_redistribution: bool | str | GateRedistribution | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        gate_layouts: Mapping[str, GateLayoutSpec] | None = None,
        update_every: str | int | None = None,
        seed: int | None = None,
        mask_gradients: bool = False,
        min_prune_rate: float | None = None,
        total_steps: int | Callable[[pl.Trainer], int | None] | None = None,
        verbose: bool = False,
        *,
        method: str = "selfish",
        redistribution: str | LayerRedistribution | None = None,
        schedule: str | Schedule | None = None,
        update_until: float | None = None,
        pruning_start: int | float | None = None,
        pruning_end: int | float | None = None,
        removed_and_regrown: str | RemovedAndRegrown | None = None,
        threshold: float | None = None,
        threshold_tolerance: float | None = None,
        grown_optimizer_state: str | GrownState | None = None,
        growth_seed: int | None = None,
    ) -> None:
        config = catalogue.resolve(
            method,
            sparsity,
            prune_rate=prune_rate,
            init=init,
            removal=removal,
            growth=growth,
            gate_redistribution=gate_redistribution,
            update_every=update_every,
            min_prune_rate=min_prune_rate,
            redistribution=redistribution,
            schedule=schedule,
            update_until=update_until,
            pruning_start=pruning_start,
            pruning_end=pruning_end,
            removed_and_regrown=removed_and_regrown,
            threshold=threshold,
            threshold_tolerance=threshold_tolerance,
            grown_optimizer_state=grown_optimizer_state,
        )
        _check_arguments(total_steps, seed, growth_seed, include, exclude, gate_layouts, mask_gradients, verbose)
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.gate_layouts = dict(gate_layouts or {})
        self.mask_gradients = mask_gradients
        self.verbose = verbose
        self._total_steps_given = total_steps  # an int, a function of the trainer, or None: Lightning's estimate
        given_length = total_steps if isinstance(total_steps, int) else 0
        self.controller = SparsityController(config, seed, growth_seed, given_length)
        self.engine: SparseEngine | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._restored = False  # this fit resumed from a checkpoint (until its training starts)
        self._awaiting_state = False  # a checkpoint the strategy restores after on_fit_start (ModelParallelStrategy)
        self._batch_idx = -1

    def __getattr__(self, name: str) -> Any:
        controller = self.__dict__.get("controller")  # (absent while unpickling)
        if controller is not None and name in _METHOD_SETTINGS:
            return getattr(controller.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _METHOD_SETTINGS and "controller" in self.__dict__:
            raise AttributeError(
                f"SelfishSparsityCallback.{name} is a setting of the resolved method (callback.config), which is "
                f"read-only: pass {name}=... to SelfishSparsityCallback(...)"
            )
        super().__setattr__(name, value)

    # ----------------------------------------------------------------------------------------------------------
    # public surface
    # ----------------------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # One sparsity callback per Trainer, and its state must be found again even if an argument changed:
        # otherwise a resumed run would silently draw fresh random masks over trained weights.
        return type(self).__qualname__

    @property
    def config(self) -> MethodConfig:
        """The method as this run runs it (:attr:`SparsityController.config`): the resolved method, with the cadence
        scaled to a short run or restored from a checkpoint; read-only."""
        return self.controller.config

    @property
    def seed(self) -> int | None:
        """The seed of the run's draws: the one given, or the one drawn on rank 0 at fit start (``None`` until)."""
        return self.controller.seed

    @property
    def growth_seed(self) -> int | None:
        """The seed of random growth alone, when given apart from :attr:`seed`."""
        return self.controller.growth_seed

    @property
    def total_steps(self) -> int:
        """The run's length in optimizer steps: the one given, or the one read at train start (0 until)."""
        return self.controller.total_steps

    @property
    def method(self) -> str:
        """The preset's name (``config.name``)."""
        return self.config.name

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name (as in ``named_parameters()``) to live bool mask, True = active (of a parameter sharded
        by FSDP2, this rank's rows: :meth:`whole_masks` gathers the whole ones)."""
        if self.engine is None:
            raise RuntimeError("masks exist once fitting has started (SelfishSparsityCallback.on_fit_start)")
        return self.engine.masks

    def whole_masks(self) -> dict[str, Tensor]:
        """Copies of the whole masks on the CPU, keyed like :attr:`masks`: what an export takes
        (:func:`lightning_selfish.export.save_compressed`). With parameters sharded by FSDP2 the masks are each
        rank's rows, gathered here: every rank calls this."""
        if self.engine is None:
            raise RuntimeError("masks exist once fitting has started (SelfishSparsityCallback.on_fit_start)")
        return self.engine.whole_masks()

    @property
    def num_updates(self) -> int:
        """How many times the masks were updated so far (topology updates, GMP pruning steps)."""
        return self.controller.num_updates

    @property
    def dense_gradient_every(self) -> int | str | None:
        """When the method needs the dense weight gradient: ``1`` (every step, SNFS), the update cadence (RigL),
        or ``None``; see :attr:`lightning_selfish.method.parts.MethodConfig.dense_gradient_every`."""
        return self.config.dense_gradient_every

    def scheduled_sparsity(self, step: int) -> float:
        """The overall target sparsity after optimizer step ``step`` (GMP's cubic; ``sparsity`` otherwise)."""
        return self.controller.scheduled_sparsity(step)

    def current_prune_rate(self, step: int) -> float:
        """The fraction of active weights an update at optimizer step ``step`` replaces (GMP: prunes)."""
        return self.controller.prune_rate(step)

    def update_at(self, step: int) -> UpdateAmount | None:
        """What the schedule does at optimizer step ``step`` (``None``: no update), for a candidate point of the
        update cadence (every ``update_every`` steps, or an epoch boundary)."""
        config = self.controller.config
        return config.schedule.amount(step, self.controller.total_steps, config)

    def skip_next_update(self) -> None:
        """Skip the next scheduled topology update
        (:class:`~lightning_selfish.callbacks.protocols.SkipsTopologyUpdates`: ``NonMonotonicTrigger`` calls it when
        averaging starts, as the authors' code skips that epoch's update)."""
        self.controller.skip_next = True

    # ----------------------------------------------------------------------------------------------------------
    # hooks: only delegate
    # ----------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse, before any work, a strategy that shards weights, a second pruning system, weight averaging across
        topology updates and a run of no step."""
        if stage != "fit":
            return
        _check_strategy(trainer)  # (Lightning itself refuses two callbacks with the same state_key)
        _check_no_pruning_callback(trainer)
        if self.config.schedule.updates:
            _check_no_weight_averaging(trainer)
        if trainer.max_epochs == 0 or trainer.max_steps == 0:  # (Lightning then skips on_fit_start: refuse here)
            self._run_length(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Masks from the checkpoint, from the previous fit, from already-sparse weights, or drawn; then attached.

        A strategy that restores checkpoints after ``on_fit_start`` (``ModelParallelStrategy``; the path to resume
        from is not even known yet) hands the callback its state later: the masks are then set up at
        ``on_train_start``, after the restore and before the first step (the sanity check's validation, in between,
        sees the weights as they are).
        """
        if _restores_after_fit_start(trainer):
            self._awaiting_state = True
            return
        self._set_up_masks(trainer, pl_module)

    def _set_up_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._awaiting_state = False
        params, layouts = chosen_parameters(pl_module, self.include, self.exclude, self.gate_layouts)
        device = next(iter(params.values())).device
        self._restored = self._loaded_state is not None
        if self._restored:
            self.engine = self._restore_engine(trainer, params, layouts, device)
        elif self.engine is not None:
            self.engine = self._continue_engine(trainer, params, layouts)
        else:
            self.engine = self._start_engine(trainer, params, layouts, device)
        for optimizer in trainer.optimizers:
            # Momentum growth ranks inactive positions by their momentum, which must keep accumulating there.
            self.engine.attach(
                optimizer, mask_state=not self.config.reads_momentum, grown_state=self.config.grown_optimizer_state
            )
        self._log_sparsity(trainer, extra={})
        _notify_topology_update(trainer, pl_module, self.engine, None)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The run's length and cadence, refused if they cannot work, before the first step.

        Read here, not at fit start: by now Lightning has loaded the train dataloader *after* restoring a
        checkpoint's loop state, so a stateful loader got its saved position (reading the length earlier makes
        Lightning load and iterate it before the restore: Lightning issue #20550).
        """
        if self._awaiting_state:  # (the checkpoint's state arrived after on_fit_start)
            self._set_up_masks(trainer, pl_module)
        total_steps = self._run_length(trainer)
        check_run(total_steps, self.controller.requested)
        notice = self.controller.plan(total_steps, epoch_ends=_epoch_ends(trainer))
        if notice is not None and trainer.is_global_zero:
            rank_zero_info(notice)
        self.controller.prepare_gradients(trainer.optimizers, math.isinf(trainer.num_training_batches))
        # A resume from a checkpoint written after an epoch's last batch (before that epoch's end) starts the next
        # epoch without on_train_epoch_start: the update of that boundary is due here (at most once).
        if self._restored:
            self._restored = False
            self._epoch_boundary_update(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Keep the dense, unclipped gradient for an update right after this step (Lightning calls this before
        clipping); with ``mask_gradients`` zero the inactive weights' gradients."""
        assert self.engine is not None
        last_batch = self._batch_idx + 1 >= trainer.num_training_batches
        self.controller.keep_gradients(self.engine, trainer.global_step, last_batch)
        if self.mask_gradients:
            self.engine.mask_gradients_()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Step cadence: the update due after this optimizer step."""
        amount = self.controller.update_due_after_step(trainer.global_step)
        if amount is not None:
            self._update(trainer, amount)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch cadence: the update of the previous epoch's end.

        It belongs after that epoch's validation *and* checkpointing (docs/callback.md, "When exactly is once per
        epoch?"): a checkpoint then holds the weights that were validated, and resuming from it replays the update.
        No step happens in between, so this is the same point in training as the end of the previous epoch.
        """
        self._epoch_boundary_update(trainer)

    def _epoch_boundary_update(self, trainer: pl.Trainer) -> None:
        amount = self.controller.update_due_at_epoch_start(trainer.current_epoch - 1, trainer.global_step)
        if amount is not None:
            self._update(trainer, amount)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say when the trainer's time limit stopped the run before its schedule's end."""
        left, step, total = _time_left(trainer), trainer.global_step, self.controller.total_steps
        if left is None or left > 0 or step >= total or not self.config.schedule.updates:
            return
        if trainer.is_global_zero:
            rank_zero_info(
                f"SelfishSparsityCallback: the run stopped at its time limit (max_time) after optimizer step {step} "
                f"of the schedule's {total}: the prune rate reached {self.controller.prune_rate(step):.3f}, not "
                f"min_prune_rate={self.config.min_prune_rate}, after {self.controller.num_updates} topology updates. "
                "Give total_steps=... (or max_steps=...) that the time allows for a complete schedule"
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:
            self.engine.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.engine is not None:
            self.engine.detach()

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """The run's state; with parameters sharded over ranks the masks are put in by :meth:`on_save_checkpoint`,
        where the checkpoint's format is known (:mod:`lightning_selfish.run.sharded_checkpoint`)."""
        if self.engine is None:
            return {}
        return {
            "masks": None if self.engine.sharded else self.engine.whole_masks(),
            **self.controller.state_dict(),
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Sharded parameters: each rank's rows of the masks into the distributed checkpoint's model state (nothing
        gathered), or the whole masks into this callback's state in a full checkpoint."""
        if self.engine is None or not self.engine.sharded:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            sharded_checkpoint.store(self.engine, self.controller.gradients, state, checkpoint["state_dict"])

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if "masks" not in state_dict or "generator" not in state_dict:
            raise ValueError(
                f"not a SelfishSparsityCallback state: expected keys 'masks' and 'generator', got {sorted(state_dict)}"
            )
        self._loaded_state = state_dict

    # ----------------------------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------------------------

    def _start_engine(
        self, trainer: pl.Trainer, params: dict[str, Tensor], layouts: dict, device: torch.device
    ) -> SparseEngine:
        """A fresh run (:func:`~lightning_selfish.run.setup.fresh_engine`), seeded on rank 0."""
        if trainer.ckpt_path is not None:
            raise ValueError(
                f"resuming from {trainer.ckpt_path!r}, which holds no SelfishSparsityCallback state: its masks "
                "are unknown. Load the weights in the LightningModule instead of passing ckpt_path to fit()."
            )
        engine, adopted = fresh_engine(self.controller, params, layouts, device, self._shared_seed(trainer))
        if adopted:
            rank_zero_info(
                "SelfishSparsityCallback: the weights are already sparse at the asked-for counts: their "
                "zero pattern is the initial masks"
            )
        return engine

    def _continue_engine(self, trainer: pl.Trainer, params: dict[str, Tensor], layouts: dict) -> SparseEngine:
        """A later fit with this callback (a new Trainer counts from step 0: the schedule restarts)."""
        assert self.engine is not None
        return continued_engine(self.controller, self.engine, params, layouts, trainer.global_step == 0)

    def _restore_engine(
        self, trainer: pl.Trainer, params: dict[str, Tensor], layouts: dict, device: torch.device
    ) -> SparseEngine:
        state, self._loaded_state = self._loaded_state, None
        assert state is not None
        if state.get("masks") == sharded_checkpoint.IN_MODEL_STATE:
            assert trainer.ckpt_path is not None
            state = sharded_checkpoint.read_from_model_state(state, trainer.ckpt_path, params)
        return restored_engine(self.controller, state, params, layouts, device)

    def _update(self, trainer: pl.Trainer, amount: UpdateAmount) -> None:
        assert self.engine is not None
        step = trainer.global_step
        collective = collective_for(trainer.world_size)
        stats = self.controller.run_update(self.engine, amount, step, trainer.optimizers, collective)
        if stats is None:
            _say(trainer, f"SelfishSparsityCallback: topology update skipped at step {step}")
            return
        extra = stats.metrics()
        if amount.target_density is not None:
            extra["topology/target_sparsity"] = 1.0 - amount.target_density
        if self.config.removal.by_threshold:
            extra["topology/threshold"] = self.controller.threshold
        self._log_sparsity(trainer, extra=extra)
        if self.verbose:
            _say(trainer, update_summary(self.engine, stats, self.controller.num_updates))
        _notify_topology_update(trainer, trainer.lightning_module, self.engine, stats)

    def _log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float]) -> None:
        assert self.engine is not None
        if not self.engine.sharded and (not trainer.is_global_zero or not trainer.loggers):
            return
        report = self.engine.sparsity_report()  # (sharded: every rank sums its counts in)
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {f"sparsity/{key}": value for key, value in report.items()}
        metrics.update(extra)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _run_length(self, trainer: pl.Trainer) -> int:
        source = self._total_steps_given
        given = source(trainer) if callable(source) else source
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int):
                raise TypeError(f"total_steps(trainer) must return a positive int or None, got {given!r}")
            if given < 1:
                raise ValueError(f"total_steps(trainer) must return a positive int or None, got {given!r}")
            return given
        trains_nothing = trainer.max_epochs == 0 or trainer.max_steps == 0
        total = 0 if trains_nothing else trainer.estimated_stepping_batches
        time_left = _time_left(trainer)
        # Lightning gives inf without max_epochs/max_steps, -1 (its max_steps default) for max_epochs with a
        # train dataloader that has no length, and a whole epoch for max_epochs=0: no schedule fits any of them.
        if not (math.isfinite(total) and total >= 1):
            if trains_nothing:
                cause = f"max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps} trains no step"
            elif trainer.max_epochs == -1 and time_left is not None:
                cause = (
                    f"max_time={_duration(time_left)} without max_epochs or max_steps (Lightning then sets "
                    "max_epochs=-1 and stops on time) gives no length in steps"
                )
            elif trainer.max_epochs == -1:  # (Lightning then loads no dataloader: its batch count means nothing yet)
                cause = "max_epochs=-1 without max_steps trains for ever"
            elif math.isinf(trainer.num_training_batches):
                cause = (
                    "the train dataloader has no length (an IterableDataset without __len__), so Lightning cannot "
                    "count the steps of an epoch"
                )
            else:
                cause = "Lightning estimates no positive, finite number of optimizer steps for this run"
            raise ValueError(
                "SelfishSparsityCallback anneals the prune rate over the whole run, which needs a finite length in "
                f"optimizer steps: {cause} (estimated_stepping_batches={total}, max_epochs={trainer.max_epochs}, "
                f"max_steps={trainer.max_steps}). Give SelfishSparsityCallback(total_steps=...), or set "
                "Trainer(max_steps=...), or use a sized train dataloader with Trainer(max_epochs=...)"
            )
        if time_left is not None:  # (the estimate assumes the step/epoch limit; the clock may come first)
            rank_zero_warn(_time_limit_warning(trainer, int(total), time_left))
        return int(total)

    def _shared_seed(self, trainer: pl.Trainer) -> int:
        if self.seed is not None:
            return self.seed
        seed = int(torch.randint(0, 2**62, (1,)).item()) if trainer.is_global_zero else 0
        return int(trainer.strategy.broadcast(seed, src=0))


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _check_arguments(
    total_steps: Any,
    seed: Any,
    growth_seed: Any,
    include: Any,
    exclude: Any,
    gate_layouts: Any,
    mask_gradients: Any,
    verbose: Any,
) -> None:
    """The callback's own arguments (the method's are checked by ``catalogue.resolve``)."""
    if total_steps is not None and not callable(total_steps):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(
                f"total_steps must be a positive int, a function of the trainer or None, got {total_steps!r}"
            )
        if total_steps < 1:
            raise ValueError(
                f"total_steps must be a positive int, a function of the trainer or None, got {total_steps!r}"
            )
    for arg, value in (("seed", seed), ("growth_seed", growth_seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{arg} must be an int or None, got {type(value).__name__}")
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{arg} must be a list of name patterns (str), got {patterns!r}")
    if gate_layouts is not None and not isinstance(gate_layouts, Mapping):
        raise TypeError(f"gate_layouts must be a mapping of parameter name to layout, got {gate_layouts!r}")
    if not isinstance(mask_gradients, bool):
        raise TypeError(f"mask_gradients must be a bool, got {mask_gradients!r}")
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {verbose!r}")


def _time_left(trainer: pl.Trainer) -> float | None:
    """Seconds of training the trainer's time limit (``Trainer(max_time=...)`` or a ``Timer`` callback, of either
    Lightning package) leaves, or ``None`` without one."""
    timers = lightning_classes("callbacks", "Timer")
    for callback in trainer.callbacks:
        if isinstance(callback, timers):
            left = callback.time_remaining()
            if left is not None:
                return float(left)
    return None


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _time_limit_warning(trainer: pl.Trainer, total_steps: int, left: float) -> str:
    return (
        f"SelfishSparsityCallback: the trainer has a time limit (max_time, or a Timer callback: {_duration(left)} "
        f"left), which the schedule cannot foresee: it plans its prune rate over the {total_steps} optimizer steps "
        f"of max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}. A run the time limit stops earlier ends "
        "with its schedule unfinished (the prune rate not annealed, late updates regrowing weights at zero). Give "
        "SelfishSparsityCallback(total_steps=...) with the number of steps the time allows (or "
        "Trainer(max_steps=...))"
    )


def _epoch_ends(trainer: pl.Trainer) -> range | None:
    """The optimizer steps at which the trainer's epochs end, the run's last end excluded (``None`` when the train
    dataloader has no length or the run has no finite length): where the epoch cadence can update."""
    batches, run = trainer.num_training_batches, trainer.estimated_stepping_batches
    if not (math.isfinite(batches) and batches >= 1 and math.isfinite(run) and run >= 1):
        return None
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    return range(per_epoch, int(run), per_epoch)


def _restores_after_fit_start(trainer: pl.Trainer) -> bool:
    """Whether the strategy restores a checkpoint after ``on_fit_start`` (Lightning's public
    ``restore_checkpoint_after_setup``; ``ModelParallelStrategy`` loads the sharded weights into its set-up model)."""
    return bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))


def _check_strategy(trainer: pl.Trainer) -> None:
    """The single-device and DDP strategies, and ``ModelParallelStrategy`` for FSDP2 (data parallel only)."""
    strategy = trainer.strategy
    kind = type(strategy)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(strategy, lightning_classes("strategies", "ModelParallelStrategy")):
        tensor_parallel = tensor_parallel_size(strategy)
        if tensor_parallel != 1:
            raise ValueError(
                f"SelfishSparsityCallback under ModelParallelStrategy supports data parallelism (FSDP2's fully_shard, "
                f"parameters sharded by rows), got tensor_parallel_size={tensor_parallel} (the default 'auto' makes "
                "every device tensor parallel): tensor parallelism splits weights by columns too. Use "
                "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)"
            )
        return
    supported = lightning_classes("strategies", "SingleDeviceStrategy", "DDPStrategy")
    sharded = lightning_classes("strategies", "DeepSpeedStrategy")  # (a DDPStrategy subclass that shards weights)
    if isinstance(strategy, sharded) or not isinstance(strategy, supported):
        raise ValueError(
            f"SelfishSparsityCallback supports the single-device and DDP strategies ('auto', 'ddp', 'ddp_spawn', "
            f"...) and, for parameters sharded across devices, ModelParallelStrategy (FSDP2: fully_shard in "
            f"configure_model); got {name}. FSDPStrategy (FSDP1) and DeepSpeedStrategy flatten parameters into "
            "buffers whose slices do not follow the weights' rows: use ModelParallelStrategy"
        )


def _check_no_pruning_callback(trainer: pl.Trainer) -> None:
    pruning = lightning_classes("callbacks", "ModelPruning")
    for callback in trainer.callbacks:
        if isinstance(callback, pruning):
            raise ValueError(
                f"SelfishSparsityCallback and {type(callback).__name__} are both in the trainer's callbacks: "
                "ModelPruning's masks would multiply with this callback's, so the model would be sparser than "
                "reported (e.g. 0.66-0.68 zero at sparsity=0.5 with amount=0.3). Use one of the two"
            )


def _check_no_weight_averaging(trainer: pl.Trainer) -> None:
    averaging = lightning_classes("callbacks", "WeightAveraging", "StochasticWeightAveraging")
    for callback in trainer.callbacks:
        if isinstance(callback, averaging):
            raise ValueError(
                f"SelfishSparsityCallback and {type(callback).__name__} are both in the trainer's callbacks: "
                f"{type(callback).__name__} averages weights across topology updates, so the averaged model is not "
                "sparse (a removed weight keeps its average, a grown one starts from another's). Use "
                "lightning_selfish.SNTASGD with NonMonotonicTrigger, which averages every weight over its own "
                "lifetime (the paper's SNT-ASGD), or method='static', whose masks never change"
            )


def _notify_topology_update(
    trainer: pl.Trainer, pl_module: pl.LightningModule, engine: SparseEngine, stats: UpdateStats | None
) -> None:
    """Tell every :class:`TopologyListener` among the trainer's callbacks (monitors) that the masks are set: at fit
    start (``stats=None``: initial or restored masks) and after every topology update."""
    for callback in trainer.callbacks:
        if isinstance(callback, TopologyListener):
            callback.on_topology_update(trainer, pl_module, engine, stats)


def _say(trainer: pl.Trainer, text: str) -> None:
    """Rank zero's output as Lightning writes it: through the progress bar when there is one (so it is not glued to
    the bar), else Lightning's rank-zero INFO line."""
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if bar is not None and bar.is_enabled:
        bar.print(text)
    else:
        rank_zero_info(text)
