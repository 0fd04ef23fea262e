"""The run controller: a sparse run's schedule state in one place, without Lightning.

:class:`SparsityController` owns what a run carries from step to step besides the masks (which live in the
:class:`~lightning_selfish.core.engine.SparseEngine`): the run's length, the update cadence and the bookkeeping of the
updates done, NT-ASGD's skip flag, DSR's threshold, the random generator and its seeds, and the dense gradients
kept for the next update. It answers the questions the callback's hooks ask ("is an update due after this
step?", "at this epoch boundary?", "is the dense gradient of this step needed?", "what prune rate now?"), runs an
update through the engine, and saves and restores all of it. Everything here is plain Python over torch, so the
cadence and the schedule are tested without a Trainer (``tests/test_controller.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_selfish.core.engine import SparseEngine, UpdateContext, UpdateStats
from lightning_selfish.core.protocols import momentum_is_gradient
from lightning_selfish.method.keys import DrawStream
from lightning_selfish.method.parts import MethodConfig, Signal, UpdateAmount
from lightning_selfish.method.schedules import scheduled_sparsity
from lightning_selfish.run.collective import Collective

__all__ = ["DRAW_STREAM", "MASK_STREAM", "GROWTH_STREAM", "RESEED_STREAM", "SparsityController", "derive_seed"]

log = logging.getLogger(__name__)

#: Independent random streams derived from the user's seed (:func:`derive_seed`).
MASK_STREAM, GROWTH_STREAM, RESEED_STREAM, DRAW_STREAM = 0, 1, 2, 3


def derive_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for one random stream of the callback, statistically independent of ``seed`` itself.

    ``torch.manual_seed(s)`` and ``pl.seed_everything(s)`` seed torch's global generator with ``s``; a mask
    generator seeded with the same ``s`` would replay the very uniforms that initialised the weights (and keep,
    say, exactly the most negative third of an LSTM's initial weights). The seed is therefore mixed through NumPy's
    ``SeedSequence`` (a hash designed for this) with a stream key: initial masks, growth and the cross-device
    reseed each get their own stream, on CPU and CUDA generators alike.
    """
    sequence = np.random.SeedSequence(int(seed) % 2**64, spawn_key=tuple(int(s) for s in stream))
    return int(sequence.generate_state(1, np.uint64)[0] % 2**63)


class SparsityController:
    """The schedule state of one sparse run (see the module docstring).

    ``config`` is the method as this run runs it, the one a callback reports: ``requested`` (the method as asked),
    with the update cadence scaled to the run when a preset's default cadence would give a short run too few updates
    (:meth:`plan`), or the cadence a restored checkpoint ran with (:meth:`load_state_dict`). ``seed`` is the seed of
    the run's draws (given, or drawn on rank 0 when the run starts); ``total_steps`` the run's length in optimizer
    steps (given, or known once :meth:`plan` has run; 0 until then).
    """

    def __init__(
        self,
        config: MethodConfig,
        seed: int | None = None,
        growth_seed: int | None = None,
        total_steps: int = 0,
    ) -> None:
        self.requested = config
        self.config = config
        self.total_steps = total_steps
        self.seed = seed
        self.growth_seed = growth_seed  # the growth stream's own seed, when given apart from ``seed``
        self.generator = torch.Generator()
        self.draws = DrawStream(0)  # random growth's draws, keyed by position (seeded with the run)
        self.num_updates = 0
        self.last_update_step = -1  # optimizer step of the last update (step cadence)
        self.last_updated_epoch = -1  # last epoch whose end-of-epoch update ran (epoch cadence)
        self.skip_next = False
        self.threshold = config.threshold  # DSR's global threshold, adapted at every update
        self.gradients: dict[str, Tensor] | None = None  # dense gradients kept for the next update
        self.needs_gradient = False  # an update reads the dense gradient of the step before it
        self.running_gradient = False  # ... and the step before an update cannot be known: copy at every step
        self.resumed_update_every: int | str | None = None  # the cadence a restored checkpoint ran with

    # ----------------------------------------------------------------------------------------------------------
    # starting a run
    # ----------------------------------------------------------------------------------------------------------

    def plan(
        self, total_steps: int, requested: MethodConfig | None = None, epoch_ends: range | None = None
    ) -> str | None:
        """Fix the run's length and its cadence (before the first step); returns a line to tell the user, if any.

        A run of a preset whose default step cadence gives it fewer than ``min_updates`` updates (RigL, GMP: every
        100 steps) gets the largest cadence that gives it that many, and the returned line says so. A cadence the
        user chose is never changed: one that gives no update at all is refused with the number and the fix, one
        that gives fewer than the preset needs is warned about. The same rule holds for every method and for the
        epoch cadence, whose updates are counted at ``epoch_ends`` (the optimizer steps at which the run's epochs
        end, the last one excluded: ``range(steps_per_epoch, run_steps, steps_per_epoch)``; ``None``: unknown, not
        counted): a preset's epoch cadence that gives none is said, one the user chose is refused. A run restored
        from a checkpoint then goes on with the cadence the checkpoint ran with (:meth:`load_state_dict`, which
        may come before or after this).
        """
        notice = self._fit_cadence(total_steps, requested or self.requested, epoch_ends)
        resumed = self.resumed_update_every
        if resumed is not None and resumed != self.config.update_every:
            self.config = dataclasses.replace(self.config, update_every=resumed)
            return None  # (the notice would name a cadence this run does not use)
        return notice

    def _fit_cadence(self, total_steps: int, requested: MethodConfig, epoch_ends: range | None) -> str | None:
        self.total_steps = total_steps
        self.config = requested
        if requested.by_epoch:
            return _check_epoch_cadence(total_steps, requested, epoch_ends)
        updates = count_updates(total_steps, requested)
        if updates is None or (updates > 0 and updates >= requested.min_updates):
            return None
        fitting = _cadence_for(total_steps, requested)
        fitting_updates = count_updates(total_steps, dataclasses.replace(requested, update_every=fitting)) or 0
        run = f"this run of {_plural(total_steps, 'optimizer step')}"
        if requested.update_every_given:
            if updates == 0:
                fix = (
                    f"give a smaller update_every (e.g. update_every={fitting}) or train longer"
                    if fitting_updates
                    else f"no cadence gives one in a run this short ({_LAST_STEP}); train longer"
                )
                raise ValueError(
                    f"method={requested.name!r} with update_every={requested.update_every} makes no topology "
                    f"update in {run}: {fix}"
                )
            warnings.warn(
                f"method={requested.name!r} with update_every={requested.update_every} makes only "
                f"{_plural(updates, 'topology update')} in {run} (the preset is meant for at least "
                f"{requested.min_updates}; update_every={fitting} gives that many)",
                UserWarning,
                stacklevel=2,
            )
            return None
        if fitting_updates == 0:  # (the preset's cadence is kept: no other would update either)
            return (
                f"method={requested.name!r}: the preset's update_every={requested.update_every} makes no topology "
                f"update in {run}, and no cadence would: {_LAST_STEP}. The masks stay as drawn"
            )
        self.config = dataclasses.replace(requested, update_every=fitting)
        before = _plural(updates, "topology update") if updates else "no topology update"
        every = "every step" if fitting == 1 else f"every {fitting} steps"
        return (
            f"method={requested.name!r}: the preset's update_every={requested.update_every} would give {run} "
            f"{before}; it updates {every} instead ({_plural(fitting_updates, 'update')}; pass update_every=... to "
            "choose)"
        )

    def seed_run(self, seed: int, growth_seed: int | None, device: torch.device) -> torch.Generator:
        """A fresh run: a generator on the parameters' device seeded for the initial masks (returned); call
        :meth:`start_growth_stream` once they are drawn."""
        self.seed, self.growth_seed = seed, growth_seed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(derive_seed(seed, MASK_STREAM))
        self.reset_schedule()
        return self.generator

    def start_growth_stream(self) -> None:
        """Reseed the generator for growth: its own stream, from ``growth_seed`` when given, else from ``seed``."""
        assert self.seed is not None
        source = self.growth_seed if self.growth_seed is not None else self.seed
        self.generator.manual_seed(derive_seed(source, GROWTH_STREAM))
        self.draws = DrawStream(derive_seed(source, DRAW_STREAM))

    def reset_schedule(self) -> None:
        """The schedule's state at the start of a fresh run (a resumed run takes it from the checkpoint)."""
        self.num_updates = 0
        self.restart_cadence()
        self.skip_next = False
        self.gradients = None
        self.threshold = self.config.threshold

    def restart_cadence(self) -> None:
        """Forget which steps and epochs were updated (a later fit whose trainer counts from step 0 again)."""
        self.last_update_step = -1
        self.last_updated_epoch = -1
        self.resumed_update_every = None  # a new run: its own cadence

    def prepare_gradients(
        self, optimizers: Sequence[torch.optim.Optimizer], epoch_cadence_without_length: bool
    ) -> None:
        """Decide whether updates read a dense gradient copy, and whether it must be refreshed at every step.

        Lightning frees the gradients before validation, so an update that reads the gradient uses a copy of the
        dense gradient of the step before it. With epoch updates over a loader without a length (variable-length
        BPTT) the epoch's last step cannot be known in advance: the copy is then refreshed at every step (into
        buffers allocated once). SNFS under an optimizer without momentum (SNT-ASGD) reads the gradient too.
        """
        config = self.config
        momentum_from_gradient = config.reads_momentum and any(momentum_is_gradient(opt) for opt in optimizers)
        self.needs_gradient = config.reads_gradient or momentum_from_gradient
        self.running_gradient = self.needs_gradient and config.by_epoch and epoch_cadence_without_length

    # ----------------------------------------------------------------------------------------------------------
    # questions the hooks ask
    # ----------------------------------------------------------------------------------------------------------

    def update_due_after_step(self, step: int) -> UpdateAmount | None:
        """The update due after optimizer step ``step`` with a step cadence (``None``: none).

        Never at step 0, never twice at one step (gradient accumulation ends several batches at one step), and,
        for a method that regrows, never at or after the run's last step: a weight grown there would end the run at
        zero (pruning only, GMP may prune on its last step).
        """
        config = self.config
        if not isinstance(config.update_every, int) or step <= 0 or step == self.last_update_step:
            return None
        return self._amount(step)

    def update_due_at_epoch_start(self, finished_epoch: int, step: int) -> UpdateAmount | None:
        """The update due at the start of the epoch after ``finished_epoch`` with the epoch cadence (``None``:
        none); marks that boundary as handled, so a resumed run does not repeat it."""
        if not self.config.by_epoch or finished_epoch <= self.last_updated_epoch:
            return None
        self.last_updated_epoch = finished_epoch
        return self._amount(step)

    def _amount(self, step: int) -> UpdateAmount | None:
        return scheduled_amount(step, self.total_steps, self.config)

    def gradient_needed(self, step: int, last_batch_of_epoch: bool) -> bool:
        """Whether the dense gradient of the optimizer step about to happen (it will be ``step + 1``) must be kept
        for an update right after it."""
        if not self.needs_gradient:
            return False
        if isinstance(self.config.update_every, int):
            return self.update_due_after_step(step + 1) is not None
        return last_batch_of_epoch

    def prune_rate(self, step: int) -> float:
        """The fraction of active weights an update at ``step`` replaces (or, GMP, prunes)."""
        return self.config.schedule.prune_rate(step, self.total_steps, self.config)

    def scheduled_sparsity(self, step: int) -> float:
        """The overall target sparsity after optimizer step ``step`` (GMP's cubic; ``sparsity`` otherwise)."""
        return scheduled_sparsity(step, self.total_steps, self.config)

    # ----------------------------------------------------------------------------------------------------------
    # doing
    # ----------------------------------------------------------------------------------------------------------

    def keep_gradients(self, engine: SparseEngine, step: int, last_batch_of_epoch: bool) -> None:
        """Before optimizer step ``step + 1``: copy the dense gradients when an update right after will read them."""
        if self.running_gradient:
            self.gradients = engine.copy_dense_gradients_(self.gradients)
        elif self.gradient_needed(step, last_batch_of_epoch):
            self.gradients = engine.dense_gradients()

    def run_update(
        self,
        engine: SparseEngine,
        amount: UpdateAmount,
        step: int,
        optimizers: Sequence[torch.optim.Optimizer],
        collective: Collective | None = None,
    ) -> UpdateStats | None:
        """Run the update the schedule asked for at ``step``, or skip it once after NT-ASGD's switch (``None``);
        with several ranks (``collective``) every rank takes rank 0's outcome."""
        self.last_update_step = step
        if self.skip_next:
            self.skip_next = False
            return None
        # (DDP: every rank takes rank 0's outcome; sharded tensors: each rank holds its own rows, and the update is
        # the same on every rank by construction)
        replicated = collective is not None and collective.world_size > 1 and not engine.sharded
        synchronize = collective.broadcast_ if replicated else None
        context = UpdateContext(
            self.generator, list(optimizers), self.gradients, synchronize, self.threshold, draws=self.draws
        )
        stats = engine.update(amount, self.config, context)
        if not self.running_gradient:
            self.gradients = None
        self.threshold = stats.threshold  # DSR's adapted threshold; the one given, for the other removals
        self.num_updates += 1
        return stats

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The schedule state (the kept dense gradients as they are: of sharded parameters, this rank's rows, which
        :mod:`lightning_selfish.run.sharded_checkpoint` places in a checkpoint)."""
        return {
            "generator": self.generator.get_state(),
            "generator_device": self.generator.device.type,
            "draws": self.draws.state_dict(),
            "seed": self.seed,
            "growth_seed": self.growth_seed,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "last_updated_epoch": self.last_updated_epoch,
            "gradients": self.gradients,
            "skip_next_update": self.skip_next,
            "total_steps": self.total_steps,
            "update_every": self.config.update_every,
            "threshold": self.threshold,
            # what the run trains, which a resume must match (run/setup.restored_engine checks it)
            "sparsity": self.config.sparsity,
            "method": self.config.name,
            "gate_redistribution": self.config.gate_redistribution.name,
            "parts": self.config.part_names(),
        }

    def _restore_draws(self, state: dict[str, int] | None) -> None:
        """Random growth's stream goes on from the checkpoint's next draw; a checkpoint written before draws were
        keyed by position (version 0.x: growth drew from the generator) starts a stream derived from the run's seed
        and update count."""
        if state is not None:
            self.draws = DrawStream(0)
            self.draws.load_state_dict(state)
            return
        source = self.growth_seed if self.growth_seed is not None else (self.seed or 0)
        self.draws = DrawStream(derive_seed(source, DRAW_STREAM, self.num_updates))
        if self.config.growth.reads == Signal.DRAWS:
            log.warning(
                "SelfishSparsityCallback: the checkpoint was written before random growth drew by position (it has "
                "no 'draws'): the masks resume exactly, later random growth continues from a new stream (%r)",
                self.draws,
            )

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore a run (the generator on ``device``, where the parameters now are)."""
        self.threshold = state.get("threshold", self.config.threshold)
        self.num_updates = state["num_updates"]
        self.last_update_step = state["last_update_step"]
        self.last_updated_epoch = state["last_updated_epoch"]
        self.gradients = state.get("gradients")
        self.skip_next = state["skip_next_update"]
        self.seed = state.get("seed")
        self.growth_seed = state.get("growth_seed")
        self.resumed_update_every = state.get("update_every")  # (a scaled cadence goes on; see plan)
        self._restore_draws(state.get("draws"))
        if self.resumed_update_every is not None and self.resumed_update_every != self.config.update_every:
            self.config = dataclasses.replace(self.config, update_every=self.resumed_update_every)
        self.generator = torch.Generator(device=device)
        saved_on = state.get("generator_device", "cpu")  # checkpoints before device-side growth: a CPU generator
        if saved_on == device.type:
            self.generator.set_state(state["generator"])
            return
        # A CPU generator's state means nothing to a CUDA generator and vice versa. The masks themselves resume
        # exactly; only the random stream of later growth is new, derived from the run's seed and update count.
        reseed = derive_seed(self.seed or 0, RESEED_STREAM, self.num_updates)
        self.generator.manual_seed(reseed)
        log.warning(
            "SelfishSparsityCallback: the checkpoint's random generator was on %s, the parameters are now on %s: "
            "later random growth continues from a new stream seeded %d (the masks themselves resume exactly)",
            saved_on,
            device.type,
            reseed,
        )


#: Why a very short run of a method that regrows gets no update at all (see update_due_after_step).
_LAST_STEP = "a method that regrows never updates on the run's last step"


def scheduled_amount(step: int, total_steps: int, config: MethodConfig) -> UpdateAmount | None:
    """The update at a candidate point ``step`` of the cadence (``None``: none): the schedule's, never at or after
    the run's last step for a method that regrows (a weight grown there would end the run at zero)."""
    if config.growth.grows and step >= total_steps:
        return None
    return config.schedule.amount(step, total_steps, config)


def count_epoch_updates(total_steps: int, config: MethodConfig, epoch_ends: range) -> int:
    """How many updates the epoch cadence makes at ``epoch_ends`` (see :meth:`SparsityController.plan`)."""
    return sum(1 for step in epoch_ends if scheduled_amount(step, total_steps, config) is not None)


def _check_epoch_cadence(total_steps: int, config: MethodConfig, epoch_ends: range | None) -> str | None:
    """Refuse an epoch cadence the user chose that makes no update in this run; say it of a preset's."""
    if epoch_ends is None or not config.schedule.updates or count_epoch_updates(total_steps, config, epoch_ends):
        return None
    epochs = len(epoch_ends) + 1
    run = f"this run of {_plural(epochs, 'epoch')} ({_plural(epoch_ends.stop, 'optimizer step')})"
    steps = _cadence_for(total_steps, dataclasses.replace(config, update_every=total_steps))
    verb = "give" if config.update_every_given else "pass"
    if count_updates(total_steps, dataclasses.replace(config, update_every=steps)):
        fix = (
            f"Train 2 or more epochs, or {verb} update_every as a number of optimizer steps (e.g. update_every={steps})"
        )
    else:
        fix = f"Train 2 or more epochs ({_LAST_STEP}, and this run is too short for any step cadence)"
    why = "the masks are updated between epochs, never after the last"
    if config.update_every_given:
        raise ValueError(
            f"method={config.name!r} with update_every='epoch' makes no topology update in {run}: {why}. {fix}"
        )
    return (
        f"method={config.name!r}: the preset's update_every='epoch' makes no topology update in {run}: {why}, so "
        f"they stay as drawn. {fix}"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def count_updates(total_steps: int, config: MethodConfig) -> int | None:
    """How many updates a run of ``total_steps`` steps gets with a step cadence (``None`` for the epoch cadence,
    which depends on the epochs; the callback's plan does not scale it)."""
    every = config.update_every
    if not isinstance(every, int) or not config.schedule.updates:
        return None
    steps = range(every, total_steps + 1, every)
    return sum(1 for step in steps if scheduled_amount(step, total_steps, config) is not None)


def _cadence_for(total_steps: int, config: MethodConfig) -> int:
    """The largest step cadence that gives the run at least ``config.min_updates`` updates (1 if none does)."""
    want = max(1, config.min_updates)
    for every in range(max(1, min(int(config.update_every), total_steps)), 0, -1):
        if (count_updates(total_steps, dataclasses.replace(config, update_every=every)) or 0) >= want:
            return every
    return 1
