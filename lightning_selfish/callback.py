"""``SelfishSparsityCallback``: Selfish-RNN's dynamic sparse training as a Lightning callback.

The hooks only decide *when*: masks are created at ``on_fit_start``, enforced after every optimizer step through a
step post-hook, and updated (magnitude removal, random growth, cell-gate redistribution) at the end of every
training epoch, after validation. *What* happens lives in :mod:`lightning_selfish.engine` and
:mod:`lightning_selfish.topology`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from lightning_selfish import methods, topology
from lightning_selfish.engine import SparseEngine, UpdateStats
from lightning_selfish.gates import GateLayoutSpec, detect_gate_layouts
from lightning_selfish.schedules import SCHEDULES, UpdateAmount, check_run
from lightning_selfish.sntasgd import SNTASGD

log = logging.getLogger(__name__)


class SelfishSparsityCallback(Callback):
    r"""Train the chosen weights of any LightningModule sparse, with Selfish-RNN or any method it is compared with.

    Every sparsified tensor starts with a mask with an exact number of active weights. After every optimizer step
    the inactive weights, and every optimizer state tensor shaped like them, are re-zeroed. At each topology update
    a method removes and regrows weights. ``method`` picks a preset (:data:`lightning_selfish.methods.METHODS`,
    table in ``docs/methods.md``): ``"selfish"`` (the default) removes the fraction ``p`` of each tensor's active
    weights with the smallest magnitude once per epoch and regrows as many at random, starting at zero, ``p``
    cosine-annealed from ``prune_rate`` to ``min_prune_rate``, with the gates of a stacked recurrent weight ranked
    jointly (cell-gate redistribution); ``"static"``, ``"set"``, ``"dsr"``, ``"snfs"``, ``"rigl"`` and ``"gmp"``
    are the paper's baselines.

    Every argument below that defaults to ``None`` means "the preset's value"; an explicit value replaces the
    preset's part (e.g. ``method="rigl", update_every="epoch"`` is RigL as the authors' code ran it). After
    ``__init__`` the attributes of the same names hold the resolved values, ``config`` the whole composition.

    Args:
        sparsity: fraction of the sparsified weights that is zero, in [0, 1) (GMP: the final sparsity).
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
        exclude: fnmatch patterns of parameter names to keep dense (e.g. ``["*prior*"]`` for the MoS prior).
        gate_layouts: ``{param_name: [(gate, rows), ...]}`` for stacked weights that are not detected; see
            :mod:`lightning_selfish.gates`.
        update_every: ``"epoch"`` (after each training epoch, after validation) or a number of optimizer steps
            (RigL's ΔT; GMP's pruning frequency Δt).
        seed: seed of the masks' random generator; ``None`` draws one on rank 0 and shares it with every rank.
        mask_gradients: also zero the gradients of inactive weights in ``on_before_optimizer_step``, i.e. before
            gradient clipping. ``False`` (default) clips the dense gradient, as the authors' code does (clipping
            over the masked gradient makes every clipped step about 1/sqrt(density) times larger).
        min_prune_rate: where the cosine schedule ends (the authors' ``eta_min``, 0.005; RigL: 0).
        total_steps: length of the run in optimizer steps for the schedules, or a callable ``fn(trainer)`` that
            returns it (or None) at fit start; default the trainer's ``estimated_stepping_batches``. Give it when
            that is unknown (an iterable without a length, such as variable-length BPTT: the authors use
            ``epochs * train_rows // bptt``).
        verbose: log a per-tensor, per-gate text summary at every update.
        method: the preset: ``"selfish"``, ``"static"``, ``"set"``, ``"dsr"``, ``"snfs"``, ``"rigl"``, ``"gmp"``.
        redistribution: across layers: ``"none"``, ``"nonzeros"`` (DSR: by surviving weights) or ``"momentum"``
            (SNFS: by mean momentum magnitude); counts move between tensors, the total stays exact.
        schedule: ``"cosine"``, ``"gmp"`` (Zhu & Gupta's cubic sparsity, pruning only) or ``"never"`` (static).
        update_until: fraction of the run after which no update happens (RigL: 0.75); the cosine then ends there.
        pruning_start, pruning_end: GMP's first and last pruning step (int) or fraction of the run (float).
        removed_and_regrown: a weight removed and regrown in the same update ``"restart"``\ s at zero with fresh
            optimizer state (the paper, default) or ``"keep"``\ s its value and state, including its SNT-ASGD
            averaging window (the authors' code).
        threshold, threshold_tolerance: DSR's initial global threshold and the relative miss of the expected
            removal count beyond which it is doubled or halved.

    Monitors (:class:`~lightning_selfish.monitor.TopologyMonitor`, :class:`~lightning_selfish.history.MaskHistory`)
    hear about the masks through ``on_topology_update(trainer, pl_module, engine, stats)``, called on every callback
    that defines it at fit start (``stats=None``) and after every topology update.
    """

    def __init__(
        self,
        sparsity: float,
        prune_rate: float | None = None,
        init: str | None = None,
        removal: str | None = None,
        growth: str | None = None,
        gate_redistribution: bool | str | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        gate_layouts: Mapping[str, GateLayoutSpec] | None = None,
        update_every: str | int | None = None,
        seed: int | None = None,
        mask_gradients: bool = False,
        min_prune_rate: float | None = None,
        total_steps: int | None = None,
        verbose: bool = False,
        *,
        method: str = "selfish",
        redistribution: str | None = None,
        schedule: str | None = None,
        update_until: float | None = None,
        pruning_start: int | float | None = None,
        pruning_end: int | float | None = None,
        removed_and_regrown: str | None = None,
        threshold: float | None = None,
        threshold_tolerance: float | None = None,
    ) -> None:
        self.config = methods.resolve(
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
        )
        if (
            total_steps is not None
            and not callable(total_steps)
            and (isinstance(total_steps, bool) or not isinstance(total_steps, int))
        ):
            raise TypeError(f"total_steps must be a positive int, a callable or None, got {total_steps!r}")
        if total_steps is not None and not callable(total_steps) and total_steps < 1:
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        for arg, patterns in (("include", include), ("exclude", exclude)):
            if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
                raise TypeError(f"{arg} must be a list of name patterns (str), got {patterns!r}")
        if gate_layouts is not None and not isinstance(gate_layouts, Mapping):
            raise TypeError(f"gate_layouts must be a mapping of parameter name to layout, got {gate_layouts!r}")
        config = self.config
        self.sparsity = float(sparsity)
        self.method = method
        self.prune_rate = config.prune_rate
        self.init = config.init
        self.removal = config.removal
        self.growth = config.growth
        self.gate_redistribution = config.gate_redistribution
        self.redistribution = config.redistribution
        self.schedule = config.schedule
        self.update_until = config.update_until
        self.pruning_start = config.pruning_start
        self.pruning_end = config.pruning_end
        self.removed_and_regrown = config.removed_and_regrown
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.gate_layouts = dict(gate_layouts or {})
        self.update_every = config.update_every
        self.seed = seed
        self.mask_gradients = mask_gradients
        self.min_prune_rate = config.min_prune_rate
        self.total_steps = total_steps
        self.verbose = verbose

        self.engine: SparseEngine | None = None
        self._generator = torch.Generator()  # replaced at fit start by one on the parameters' device
        self._seed: int | None = None
        self._total_steps = 0
        self._batch_idx = -1
        self._needs_gradient = False  # an update reads the dense gradient of the step before it
        self._running_gradient = False  # ... and the step before an update cannot be known: copy at every step
        self._loaded_state: dict[str, Any] | None = None
        self._start_schedule()

    def _start_schedule(self) -> None:
        """The schedule's state at the start of a fresh run (a resumed run takes it from the checkpoint)."""
        self._num_updates = 0
        self._last_update_step = -1  # optimizer step of the last update (step-based cadence)
        self._last_updated_epoch = -1  # last epoch whose end-of-epoch update ran (epoch cadence)
        self._skip_next_update = False
        self._gradients: dict[str, Tensor] | None = None  # dense gradients kept for the next update
        self._threshold = self.config.threshold  # DSR's global threshold, adapted at every update

    # ----------------------------------------------------------------------------------------------------------
    # public surface
    # ----------------------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # One sparsity callback per Trainer, and its state must be found again even if an argument changed:
        # otherwise a resumed run would silently draw fresh random masks over trained weights.
        return type(self).__qualname__

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name (as in ``named_parameters()``) to live bool mask, True = active."""
        if self.engine is None:
            raise RuntimeError("masks exist once fitting has started (SelfishSparsityCallback.on_fit_start)")
        return self.engine.masks

    @property
    def num_updates(self) -> int:
        """How many times the masks were updated so far (topology updates, GMP pruning steps)."""
        return self._num_updates

    @property
    def total_steps_resolved(self) -> int:
        """The run length (optimizer steps) the schedules use; known from ``on_fit_start`` on."""
        return self._total_steps

    @property
    def dense_gradient_every(self) -> int | str | None:
        """When the method needs the dense weight gradient: ``1`` (every step, SNFS), the update cadence (RigL),
        or ``None``; see :func:`lightning_selfish.methods.dense_gradient_every`."""
        return methods.dense_gradient_every(self.config)

    def scheduled_sparsity(self, step: int) -> float:
        """The overall target sparsity after optimizer step ``step`` (GMP's cubic; ``sparsity`` otherwise)."""
        return methods.scheduled_sparsity(step, self._total_steps, self.config)

    def current_prune_rate(self, step: int) -> float:
        """The cosine-annealed prune rate at optimizer step ``step`` of this run."""
        return topology.cosine_prune_rate(step, self._total_steps, self.prune_rate, self.min_prune_rate)

    def update_at(self, step: int) -> UpdateAmount | None:
        """What the schedule does at optimizer step ``step`` (``None``: no update), for a candidate point of the
        update cadence (every ``update_every`` steps, or an epoch boundary)."""
        return SCHEDULES[self.schedule](step, self._total_steps, self.config)

    def skip_next_update(self) -> None:
        """Skip the next scheduled topology update.

        The authors' code does not update the topology in the epoch where NT-ASGD switches to averaging;
        ``NonMonotonicTrigger`` calls this when it fires.
        """
        self._skip_next_update = True

    # ----------------------------------------------------------------------------------------------------------
    # hooks: only delegate
    # ----------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer)  # (Lightning itself refuses two callbacks with the same state_key)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._select_parameters(pl_module)
        layouts = detect_gate_layouts(pl_module, self.gate_layouts)
        layouts = {name: layout for name, layout in layouts.items() if name in params}
        # Before the first step, and before the masks' seed is drawn: reading the length makes Lightning load the
        # train dataloader, which advances the global generator, so this order keeps seeded runs' masks unchanged.
        self._total_steps = self._run_length(trainer)
        check_run(self._total_steps, self.config)
        # Random growth draws its scores where the weights live: a CUDA generator for CUDA parameters.
        self._generator = torch.Generator(device=next(iter(params.values())).device)
        if self._loaded_state is not None:
            self.engine = self._restore_engine(params, layouts)
        else:
            if trainer.ckpt_path is not None:
                raise ValueError(
                    f"resuming from {trainer.ckpt_path!r}, which holds no SelfishSparsityCallback state: its masks "
                    "are unknown. Load the weights in the LightningModule instead of passing ckpt_path to fit()."
                )
            self._seed = self._shared_seed(trainer)
            self._generator.manual_seed(self._seed)
            self._start_schedule()
            self.engine = SparseEngine.initialize(
                params, self.sparsity, self._generator, self.init, layouts, self.gate_redistribution
            )
        # Momentum growth ranks inactive positions by their momentum, which must keep accumulating there.
        dense_state = topology.GROWTH_SOURCES.get(self.growth) == "momentum"
        for optimizer in trainer.optimizers:
            self.engine.attach(optimizer, mask_state=not dense_state)
        momentum_is_gradient = any(isinstance(opt, SNTASGD) for opt in trainer.optimizers) and "momentum" in (
            topology.GROWTH_SOURCES.get(self.growth),
            self.redistribution,
        )
        self._needs_gradient = methods.needs_gradient(self.config) or momentum_is_gradient
        self._log_sparsity(trainer, extra={})
        _notify_topology_update(trainer, pl_module, self.engine, None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning frees the gradients before validation, so an update that reads the gradient uses a copy of the
        # dense gradient of the step before it. With epoch updates over a loader without a length (variable-length
        # BPTT) the epoch's last step cannot be known in advance: the copy is then refreshed at every step (one
        # copy of the sparsified weights' gradients per step, into buffers allocated once).
        self._running_gradient = (
            self._needs_gradient and self.update_every == "epoch" and math.isinf(trainer.num_training_batches)
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this before clipping: the gradients are the dense, unclipped ones.
        if self._running_gradient:
            self._gradients = self.engine.copy_dense_gradients_(self._gradients)
        elif self._needs_gradient and self._update_follows_this_step(trainer):
            self._gradients = self.engine.dense_gradients()
        if self.mask_gradients:
            self.engine.mask_gradients_()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # (with accumulation, several batches end at the same step)
        due = isinstance(self.update_every, int) and step > 0 and step != self._last_update_step
        if due and self.update_at(step) is not None:
            self._update(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The per-epoch update belongs after the previous epoch's validation *and* checkpointing (MODELS.md 8.4):
        # a checkpoint then holds the weights that were validated, and resuming from it replays the update. No
        # step happens in between, so this is the same point in training as the end of the previous epoch.
        finished = trainer.current_epoch - 1
        if self.update_every == "epoch" and finished > self._last_updated_epoch:
            self._last_updated_epoch = finished
            if self.update_at(trainer.global_step) is not None:
                self._update(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:
            self.engine.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.engine is not None:
            self.engine.detach()

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return {
            "masks": {name: mask.detach().cpu().clone() for name, mask in self.engine.masks.items()},
            "generator": self._generator.get_state(),
            "generator_device": self._generator.device.type,
            "seed": self._seed,
            "num_updates": self._num_updates,
            "last_update_step": self._last_update_step,
            "last_updated_epoch": self._last_updated_epoch,
            "gradients": self._gradients,
            "skip_next_update": self._skip_next_update,
            "total_steps": self._total_steps,
            "sparsity": self.sparsity,
            "gate_redistribution": self.gate_redistribution,
            "method": self.method,
            "threshold": self._threshold,
        }

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

    def _select_parameters(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        candidates = {name: p for name, p in pl_module.named_parameters() if p.dim() >= 2}
        for arg, patterns in (("include", self.include or []), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
                    raise ValueError(
                        f"{arg} pattern {pattern!r} matches no parameter with 2 or more dimensions; "
                        f"these are: {sorted(candidates)}"
                    )
        chosen = {
            name: p
            for name, p in candidates.items()
            if (self.include is None or any(fnmatch.fnmatchcase(name, pat) for pat in self.include))
            and not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)
        }
        if not chosen:
            raise ValueError(
                f"no parameter left to sparsify (include={self.include}, exclude={self.exclude}); "
                f"parameters with 2 or more dimensions: {sorted(candidates)}"
            )
        return chosen

    def _restore_engine(self, params: dict[str, Tensor], layouts: dict) -> SparseEngine:
        state, self._loaded_state = self._loaded_state, None
        assert state is not None
        masks: dict[str, Tensor] = state["masks"]
        if set(masks) != set(params):
            raise ValueError(
                "the checkpoint's sparsity masks do not match the parameters chosen for sparsification: "
                f"only in the checkpoint: {sorted(set(masks) - set(params))}; "
                f"only in the model: {sorted(set(params) - set(masks))}"
            )
        for name, mask in masks.items():
            if mask.shape != params[name].shape:
                raise ValueError(
                    f"the checkpoint's mask for {name!r} has shape {tuple(mask.shape)}, the parameter has "
                    f"{tuple(params[name].shape)}"
                )
        if state.get("sparsity", self.sparsity) != self.sparsity:
            raise ValueError(
                f"the checkpoint was trained with sparsity={state['sparsity']}, this callback has "
                f"sparsity={self.sparsity}: resume with the same sparsity"
            )
        if state.get("method", "selfish") != self.method:
            raise ValueError(
                f"the checkpoint was trained with method={state.get('method', 'selfish')!r}, this callback has "
                f"method={self.method!r}: resume with the same method"
            )
        self._threshold = state.get("threshold", self.config.threshold)
        self._num_updates = state["num_updates"]
        self._restore_generator(state)
        self._last_update_step = state["last_update_step"]
        self._last_updated_epoch = state["last_updated_epoch"]
        self._gradients = state.get("gradients")
        self._skip_next_update = state["skip_next_update"]
        engine = SparseEngine(params, masks, layouts, self.gate_redistribution)
        engine.apply_masks_()
        return engine

    def _restore_generator(self, state: dict[str, Any]) -> None:
        saved_on = state.get("generator_device", "cpu")  # checkpoints before device-side growth: a CPU generator
        self._seed = state.get("seed")
        if saved_on == self._generator.device.type:
            self._generator.set_state(state["generator"])
            return
        # A CPU generator's state means nothing to a CUDA generator and vice versa. The masks themselves resume
        # exactly; only the random stream of later growth is new, seeded from the run's seed and update count.
        reseed = ((self._seed or 0) * 1_000_003 + self._num_updates) % 2**62
        self._generator.manual_seed(reseed)
        log.warning(
            "SelfishSparsityCallback: the checkpoint's random generator was on %s, the parameters are now on %s: "
            "later random growth continues from a new stream seeded %d (the masks themselves resume exactly)",
            saved_on,
            self._generator.device.type,
            reseed,
        )

    def _update(self, trainer: pl.Trainer) -> None:
        assert self.engine is not None
        amount = self.update_at(trainer.global_step)
        assert amount is not None  # the hooks only call this where the schedule has an update
        self._last_update_step = trainer.global_step
        if self._skip_next_update:
            self._skip_next_update = False
            if trainer.is_global_zero:
                log.info("topology update skipped at step %d", trainer.global_step)
            return
        stats = self.engine.update(
            amount.prune_rate,
            self._generator,
            self.removal,
            self.growth,
            trainer.optimizers,
            synchronize=_rank_zero_broadcast(trainer),
            gradients=self._gradients,
            redistribution=self.redistribution,
            target_density=amount.target_density,
            removed_and_regrown=self.removed_and_regrown,
            threshold=self._threshold,
            threshold_tolerance=self.config.threshold_tolerance,
        )
        if not self._running_gradient:
            self._gradients = None
        self._threshold = stats.threshold  # DSR's adapted threshold; the one given, for the other removals
        self._num_updates += 1
        extra = _stats_metrics(stats)
        if amount.target_density is not None:
            extra["topology/target_sparsity"] = 1.0 - amount.target_density
        if self.removal in topology.THRESHOLD_REMOVALS:
            extra["topology/threshold"] = self._threshold
        self._log_sparsity(trainer, extra=extra)
        if self.verbose and trainer.is_global_zero:
            log.info("%s", self._summary(stats))
        _notify_topology_update(trainer, trainer.lightning_module, self.engine, stats)

    def _log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float]) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        assert self.engine is not None
        metrics = {f"sparsity/{key}": value for key, value in self.engine.sparsity_report().items()}
        metrics.update(extra)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _summary(self, stats: UpdateStats) -> str:
        assert self.engine is not None
        report = self.engine.sparsity_report()
        lines = [
            f"topology update {self._num_updates}: prune rate {stats.prune_rate:.4f}, "
            f"removed {stats.total_removed}, grown {stats.total_grown}, overall sparsity {report['overall']:.4f}"
        ]
        for name, record in self.engine.tensors.items():
            gates = ", ".join(f"{gate} {report[f'{name}/{gate}']:.3f}" for gate, _ in record.gates or [])
            lines.append(
                f"  {name}: sparsity {report[name]:.4f}, changed {stats.changed_fraction[name]:.3f}"
                + (f" | gates: {gates}" if gates else "")
            )
        return "\n".join(lines)

    def _update_follows_this_step(self, trainer: pl.Trainer) -> bool:
        if isinstance(self.update_every, int):
            return self.update_at(trainer.global_step + 1) is not None
        return self._batch_idx + 1 >= trainer.num_training_batches

    def _run_length(self, trainer: pl.Trainer) -> int:
        # total_steps may be a callable fn(trainer) -> int | None, asked at fit start (None: the trainer's estimate)
        given = self.total_steps(trainer) if callable(self.total_steps) else self.total_steps
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int):
                raise TypeError(f"total_steps(trainer) must return a positive int or None, got {given!r}")
            if given < 1:
                raise ValueError(f"total_steps(trainer) must return a positive int or None, got {given!r}")
            return given
        total = trainer.estimated_stepping_batches
        # Lightning gives inf without max_epochs/max_steps, and -1 (its max_steps default) for max_epochs with a
        # train dataloader that has no length: a cosine over either would stay at the initial rate for ever.
        if not (math.isfinite(total) and total >= 1):
            if trainer.max_epochs == -1:  # (Lightning then loads no dataloader: its batch count means nothing yet)
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
        return int(total)

    def _shared_seed(self, trainer: pl.Trainer) -> int:
        if self.seed is not None:
            return self.seed
        seed = int(torch.randint(0, 2**62, (1,)).item()) if trainer.is_global_zero else 0
        return int(trainer.strategy.broadcast(seed, src=0))


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _supported_strategies() -> tuple[type, ...]:
    """Single-device and DDP strategy classes of ``pytorch_lightning`` and, when in use, of ``lightning.pytorch``."""
    supported: tuple[type, ...] = (SingleDeviceStrategy, DDPStrategy)
    # A Trainer of the unified ``lightning`` package has imported it already; it is never imported from here, so
    # neither package is a requirement of the other.
    unified = sys.modules.get("lightning.pytorch.strategies")
    if unified is not None:
        supported += (unified.SingleDeviceStrategy, unified.DDPStrategy)
    return supported


def _check_strategy(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    kind = type(strategy)
    sharded = kind.__name__ in ("DeepSpeedStrategy",)
    if sharded or not isinstance(strategy, _supported_strategies()):
        raise ValueError(
            f"SelfishSparsityCallback supports the single-device and DDP strategies ('auto', 'ddp', "
            f"'ddp_spawn', ...), got {kind.__module__}.{kind.__qualname__}: every rank must hold every whole "
            "weight tensor (strategies that shard parameters, such as FSDP and DeepSpeed, would give each rank a "
            "different slice of every mask)"
        )


def _rank_zero_broadcast(trainer: pl.Trainer):
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None

    def synchronize(code: Tensor) -> None:
        torch.distributed.broadcast(code, src=0)

    return synchronize


def _notify_topology_update(
    trainer: pl.Trainer, pl_module: pl.LightningModule, engine: SparseEngine, stats: UpdateStats | None
) -> None:
    """Tell every callback with an ``on_topology_update(trainer, pl_module, engine, stats)`` method (monitors) that
    the masks are set: at fit start (``stats=None``: initial or restored masks) and after every topology update."""
    for callback in trainer.callbacks:
        hook = getattr(callback, "on_topology_update", None)
        if callable(hook):
            hook(trainer, pl_module, engine, stats)


def _stats_metrics(stats: UpdateStats) -> dict[str, float]:
    metrics = {
        "topology/prune_rate": stats.prune_rate,
        "topology/removed": float(stats.total_removed),
        "topology/grown": float(stats.total_grown),
        "topology/changed_fraction": stats.total_changed_fraction,
    }
    for name, fraction in stats.changed_fraction.items():
        metrics[f"topology/changed_fraction/{name}"] = fraction
    return metrics
