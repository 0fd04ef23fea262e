"""The parts a sparse training method is made of, as objects that carry what they need.

A method (:class:`MethodConfig`) is one part of each kind plus a few numbers. Every part holds its function *and*
what that function needs (what a growth reads, whether a removal is by count or by threshold, which sparsity a
schedule has in force, what a schedule needs of the run's length), so everything the engine, the run controller
and the FLOPs count need to know is derived from the parts: a user's own part is one object, with nothing else to
keep in step.

The built-in parts are registered by name in :mod:`lightning_selfish.method.catalogue` (names are what YAML and the CLI
use); a part object can also be handed to the callback directly::

    from lightning_selfish import SelfishSparsityCallback
    from lightning_selfish.method.parts import Growth
    from lightning_selfish.method.topology import gradient_growth

    mine = Growth("gradient_v2", gradient_growth, reads="gradient")
    SelfishSparsityCallback(sparsity=0.67, growth=mine)

This module depends on nothing else of the library, so every other module can import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import Tensor

__all__ = [
    "GateRedistribution",
    "GrownState",
    "Growth",
    "Init",
    "LayerRedistribution",
    "MethodConfig",
    "RemovedAndRegrown",
    "Removal",
    "Rounding",
    "Schedule",
    "Signal",
    "Structure",
    "UpdateAmount",
]


class Signal(str, Enum):
    """What a growth or a score reads: the run's random generator (a ``torch.Generator``, one process only), the run's
    random draws keyed by position (a :class:`~lightning_selfish.method.keys.DrawStream`: the same on any number of
    ranks), the dense gradient of the optimizer step before
    the update, or the optimizer's momentum (SGD's buffer, Adam's normalised first moment; the gradient under an
    optimizer without momentum such as SNT-ASGD). The update hands a part what it names
    (:class:`lightning_selfish.core.signals.UpdateContext`); a part may also name it by its string value."""

    GENERATOR = "generator"
    DRAWS = "draws"
    GRADIENT = "gradient"
    MOMENTUM = "momentum"


class GrownState(str, Enum):
    """The optimizer state a grown weight starts with (``grown_optimizer_state``; the rules are in
    :mod:`lightning_selfish.core.optim_state`, the measurements behind the defaults in docs/methods.md).

    ``ZERO``: every state tensor is zero at inactive positions and a grown weight starts with zero state (RigL's
    code). ``DENSE``: Adam's moments are never masked and a grown weight starts with them (the Selfish-RNN authors'
    code). ``TENSOR_MEAN``: as ``ZERO``, but a grown weight's second moment starts at its tensor's mean.
    """

    ZERO = "zero"
    DENSE = "dense"
    TENSOR_MEAN = "tensor_mean"


class RemovedAndRegrown(str, Enum):
    r"""A weight removed and regrown in the same update ``RESTART``\ s at zero with fresh optimizer state (the paper)
    or ``KEEP``\ s its value and state, its SNT-ASGD averaging window included (the authors' code, RigL)."""

    RESTART = "restart"
    KEEP = "keep"

    @property
    def keeps(self) -> bool:
        return self is RemovedAndRegrown.KEEP


class Rounding(str, Enum):
    """How the count of a removal is rounded: ``CEIL`` (``ceil(p * active)``, the authors' code) or ``FLOOR`` (RigL
    casts ``drop_fraction * active`` to an integer)."""

    CEIL = "ceil"
    FLOOR = "floor"

    def count(self, active: int, prune_rate: float) -> int:
        """Weights to remove of ``active``. The 1e-9 keeps a product that is an integer in exact arithmetic from
        moving to the next integer through floating-point error."""
        exact = prune_rate * active
        rounded = math.floor(exact + 1e-9) if self is Rounding.FLOOR else math.ceil(exact - 1e-9)
        return min(active, int(rounded))


#: The value ``update_every`` takes for a cadence of once per epoch (else a number of optimizer steps).
EPOCH = "epoch"


def _member(kind: type[Enum], name: str, value: Any) -> Any:
    """``value`` as a member of ``kind`` (a setting may be given by its string value)."""
    allowed = [member.value for member in kind]
    if isinstance(value, bool) or value not in allowed:  # (a bool is no choice)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return kind(value)


def _signal(
    part: str, name: str, reads: Signal | str | None, allowed: tuple[Signal, ...], required: bool = False
) -> Signal | None:
    """``reads`` as a :class:`Signal` (a part may name it by its value): one of ``allowed``, or ``None`` unless
    ``required``."""
    if reads is None and not required:
        return None
    if isinstance(reads, str) and reads in {s.value for s in allowed}:
        return Signal(reads)
    names = [repr(s.value) for s in allowed]
    choices = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise ValueError(f"{part} {name!r}: reads must be {choices}, got {reads!r}")


@dataclass(frozen=True)
class Init:
    """Initial per-tensor budgets: ``budgets(shapes, density) -> {name: active count}``, exact counts.

    When the gates of a stacked tensor are blocks of their own (not ranked jointly), ``block_budgets(count, sizes,
    density) -> [count per block]`` starts each block: ``None`` shares the tensor's count by size (its total stays
    exact); the uniform init gives every block its own uniform count (every gate at exactly the density:
    :func:`~lightning_selfish.method.topology.uniform_block_counts`, which a user's own uniform init may name too).
    """

    name: str
    budgets: Callable[[Mapping[str, Sequence[int]], float], dict[str, int]]
    block_budgets: Callable[[int, Sequence[int], float], list[int]] | None = None


@dataclass(frozen=True)
class Removal:
    """Which active weights an update removes.

    ``by_threshold=False``: ``remove(weight, mask, n) -> kept`` drops exactly ``n`` per block (the count comes from
    the prune rate). ``by_threshold=True`` (DSR): ``remove(weight, mask, threshold) -> kept`` with one global
    threshold for all tensors, adapted after every update. ``remove=None``: nothing is removed (static).
    """

    name: str
    remove: Callable[[Tensor, Tensor, Any], Tensor] | None
    by_threshold: bool = False

    @property
    def removes(self) -> bool:
        return self.remove is not None


@dataclass(frozen=True)
class Growth:
    """Which inactive weights an update grows: ``grow(mask, n, source) -> grown`` with ``source`` what ``reads``
    names (the generator, or the block's dense gradient or momentum). ``grow=None``: no growth."""

    name: str
    grow: Callable[[Tensor, int, Any], Tensor] | None
    reads: Signal | None = None
    #: The growth's ranking of the positions, higher first, from the same source: ``score(mask, source) ->
    #: Tensor``. Only a structure (:class:`Structure`) asks for it, to know which positions fit.
    score: Callable[[Tensor, Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.grow is not None:  # (a growth reads something: it must say what)
            object.__setattr__(self, "reads", _signal("Growth", self.name, self.reads, tuple(Signal), required=True))

    @property
    def grows(self) -> bool:
        return self.grow is not None


@dataclass(frozen=True)
class Structure:
    """A structural constraint on the masks (N:M, blocks): one part the engine and the update consult.

    ``initial_mask(shape, generator)`` draws a mask that satisfies it at its ``density`` (which the method's
    sparsity must be). ``allowed(kept, score)`` are the inactive positions of ``kept`` (the mask after removal) a
    growth may take, given the growth's ranking ``score`` (higher first) such that any subset of them keeps the
    constraint and the best-scored ones are the best set that does. Removal needs nothing: removing weights never
    breaks a constraint of "at most so many per group".
    """

    name: str
    density: float
    initial_mask: Callable[[Sequence[int], Any], Tensor]
    allowed: Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LayerRedistribution:
    """How the total regrowth is shared over tensors: ``score(old_mask, kept_mask, signal) -> float`` with
    ``signal`` the tensor's momentum when ``reads == "momentum"``; ``score=None``: each tensor regrows its own
    removals."""

    name: str
    score: Callable[[Tensor, Tensor, Tensor | None], float] | None = None
    reads: Signal | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", _signal("LayerRedistribution", self.name, self.reads, (Signal.MOMENTUM,)))


@dataclass(frozen=True)
class GateRedistribution:
    """How the gates of a stacked recurrent tensor share its removal and regrowth.

    ``joint=True``: one ranking over all gates (Selfish-RNN's cell-gate redistribution). Otherwise every gate
    removes its own count and the tensor's regrowth is shared by ``score(weight_block, old_block, gradient_block)``
    (Table 6's variants), or, with ``score=None``, every gate regrows what it removed (the paper's ablation).
    """

    name: str
    joint: bool = False
    score: Callable[[Tensor, Tensor, Tensor | None], float] | None = None
    reads: Signal | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", _signal("GateRedistribution", self.name, self.reads, (Signal.GRADIENT,)))


@dataclass(frozen=True)
class UpdateAmount:
    """What one update does: replace a fraction of the active weights, or prune each tensor down to a density."""

    prune_rate: float = 0.0  # sparse-to-sparse: fraction of each block's active weights removed and regrown
    target_density: float | None = None  # dense-to-sparse: each tensor is pruned to round(density * numel), no growth


@dataclass(frozen=True)
class Schedule:
    """When updates happen and how much each changes, as functions of the optimizer step and the run's length.

    ``amount(step, total_steps, config)`` is asked at every candidate point of the cadence (every epoch boundary, or
    every ``update_every`` steps) and returns ``None`` where no update happens. ``prune_rate(step, ...)`` is the
    fraction of active weights an update at ``step`` replaces (what is logged). ``sparsity_in_force`` (dense-to-
    sparse schedules) gives the overall sparsity after ``step``; ``None`` means ``config.sparsity`` throughout.
    ``check_run(total_steps, config)`` refuses, before any step, a run the schedule cannot work in.
    ``prunes_to_target=True``: updates prune to ``UpdateAmount.target_density`` and never regrow (GMP).
    """

    name: str
    amount: Callable[[int, int, MethodConfig], UpdateAmount | None]
    prune_rate: Callable[[int, int, MethodConfig], float]
    sparsity_in_force: Callable[[int, int, MethodConfig], float] | None = None
    check_run: Callable[[int, MethodConfig], None] | None = None
    prunes_to_target: bool = False
    updates: bool = True  # False: the masks never change (static sparse training)


@dataclass(frozen=True)
class MethodConfig:
    """A resolved method: its parts, its numbers and the sparsity; what the callback and the engine run.

    Built by :func:`lightning_selfish.method.catalogue.resolve` (a preset with the user's overrides, checked as a
    whole); read-only, the one source of truth of a run's method.
    """

    name: str
    sparsity: float
    init: Init
    removal: Removal
    growth: Growth
    redistribution: LayerRedistribution
    gate_redistribution: GateRedistribution
    schedule: Schedule
    prune_rate: float
    min_prune_rate: float = 0.005
    update_every: str | int = "epoch"
    update_until: float | None = None  # fraction of the run after which no update happens (RigL: 0.75)
    pruning_start: int | float = 0.0  # GMP: first pruning step (int) or fraction of the run (float)
    pruning_end: int | float = 0.75  # GMP: last pruning step, where the sparsity reaches the target
    removed_and_regrown: RemovedAndRegrown = RemovedAndRegrown.RESTART  # paper: restart at 0; RigL's code: keep
    threshold: float = 1e-3  # DSR: initial global magnitude threshold
    threshold_tolerance: float = 0.02  # DSR: the threshold moves when removals miss the expected count by more
    removal_rounding: Rounding = Rounding.CEIL  # count of a removal: ceil (the authors' code) or floor (RigL)
    grown_optimizer_state: GrownState = GrownState.ZERO  # optimizer state of grown weights (GrownState)
    grow_into_removed: bool = True  # growth may pick a weight this update removed (DSR's code: False)
    structure: Structure | None = None  # a structural constraint (N:M) on every mask, None: unstructured
    min_updates: int = 0  # fewer updates than this in a run and the preset's default cadence is scaled to the run
    update_every_given: bool = False  # the user chose update_every (it is then never scaled)

    def __post_init__(self) -> None:
        for name, kind in (
            ("removed_and_regrown", RemovedAndRegrown),
            ("removal_rounding", Rounding),
            ("grown_optimizer_state", GrownState),
        ):
            object.__setattr__(self, name, _member(kind, name, getattr(self, name)))

    @property
    def by_epoch(self) -> bool:
        """Updates happen once per epoch (``update_every="epoch"``), not every ``update_every`` optimizer steps."""
        return self.update_every == EPOCH

    @property
    def reads_gradient(self) -> bool:
        """An update reads the dense gradient of the step before it (gradient growth, Table 6's gradient score)."""
        return Signal.GRADIENT in (self.growth.reads, self.gate_redistribution.reads)

    @property
    def reads_momentum(self) -> bool:
        """An update reads the optimizer's momentum (SNFS's growth or its across-layer redistribution)."""
        return Signal.MOMENTUM in (self.growth.reads, self.redistribution.reads)

    @property
    def dense_gradient_every(self) -> int | str | None:
        """How often the method needs the dense weight gradient (the FLOPs of Appendix L): ``1`` every step (the
        momentum of SNFS accumulates dense gradients), the update cadence (RigL: on update steps), or ``None``."""
        if not self.schedule.updates or not self.growth.grows:
            return None
        if self.reads_momentum:
            return 1
        if self.reads_gradient:
            return self.update_every
        return None

    def part_names(self) -> dict[str, str]:
        """The name of every part (what a checkpoint, a log or ``selfish-rnn results`` records)."""
        return {
            "init": self.init.name,
            "removal": self.removal.name,
            "growth": self.growth.name,
            "redistribution": self.redistribution.name,
            "gate_redistribution": self.gate_redistribution.name,
            "schedule": self.schedule.name,
        }
