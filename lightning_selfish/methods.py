"""Sparse training methods as named presets: a method is a composition of registered parts, not a code path.

Each part is a name looked up in a small registry:

==================== ===================================================================================
part                 registry (module)
==================== ===================================================================================
``init``             ``topology.INIT_BUDGETS``: uniform, er, erk, dense
``removal``          ``topology.REMOVAL_STRATEGIES`` (magnitude, set), ``topology.THRESHOLD_REMOVALS``
                     (threshold: DSR), or ``"none"``
``growth``           ``topology.GROWTH_STRATEGIES`` (random, gradient, momentum) or ``"none"``
``redistribution``   ``"none"`` or ``redistribution.LAYER_SCORES`` (nonzeros: DSR, momentum: SNFS)
``gate_redistribution`` ``"joint"`` (Selfish-RNN), ``"none"`` (per-gate counts), or
                     ``redistribution.GATE_SCORES`` (magnitude, gradient: Table 6)
``schedule``         ``schedules.SCHEDULES``: cosine, gmp, never
==================== ===================================================================================

``SelfishSparsityCallback(method=NAME, ...)`` starts from ``METHODS[NAME]``; every callback argument left at
``None`` takes the preset's value, every argument given explicitly replaces it (:func:`resolve`). The table of
presets, and where each follows its own paper or the Selfish-RNN authors' code, is in ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_selfish import topology
from lightning_selfish.redistribution import GATE_SCORES, LAYER_SCORES
from lightning_selfish.schedules import SCHEDULES, scheduled_sparsity

__all__ = [
    "GATE_MODES",
    "METHODS",
    "MethodConfig",
    "MethodPreset",
    "dense_gradient_every",
    "needs_gradient",
    "resolve",
    "scheduled_sparsity",
]

#: Gate handling inside a stacked recurrent tensor: one ranking over all gates, each gate its own count, or the
#: tensor's regrowth shared over its gates by a Table 6 score.
GATE_MODES: tuple[str, ...] = ("joint", "none", *GATE_SCORES)


@dataclass(frozen=True)
class MethodPreset:
    """The parts of one sparse training method (see the module docstring for the registries)."""

    name: str
    init: str
    removal: str
    growth: str
    redistribution: str
    gate_redistribution: str
    schedule: str
    prune_rate: float
    min_prune_rate: float = 0.005
    update_every: str | int = "epoch"
    update_until: float | None = None  # fraction of the run after which no update happens (RigL: 0.75)
    pruning_start: int | float = 0.0  # GMP: first pruning step (int) or fraction of the run (float)
    pruning_end: int | float = 0.75  # GMP: last pruning step, where the sparsity reaches the target
    removed_and_regrown: str = "restart"  # "restart" (paper: starts at 0) or "keep" (the authors' code)
    threshold: float = 1e-3  # DSR: initial global magnitude threshold
    threshold_tolerance: float = 0.02  # DSR: the threshold moves when removals miss the expected count by more
    paper: str = ""
    notes: str = ""


@dataclass(frozen=True)
class MethodConfig(MethodPreset):
    """A preset with the user's overrides applied and checked, plus the sparsity: what the callback runs."""

    sparsity: float = 0.0


METHODS: dict[str, MethodPreset] = {
    preset.name: preset
    for preset in (
        MethodPreset(
            "selfish", "uniform", "magnitude", "random", "none", "joint", "cosine", prune_rate=0.5,
            paper="Liu et al., Selfish Sparse RNN Training, ICML 2021",
        ),
        MethodPreset(
            "static", "uniform", "none", "none", "none", "joint", "never", prune_rate=0.0,
            paper="static sparse training (the paper's baseline)",
            notes="init='er' gives the ER variant",
        ),
        MethodPreset(
            "set", "er", "set", "random", "none", "joint", "cosine", prune_rate=0.5,
            paper="Mocanu et al., Nature Communications 2018",
            notes="SET's own fraction is fixed (zeta = 0.3); the paper's comparison anneals it like Selfish-RNN",
        ),
        MethodPreset(
            "dsr", "uniform", "threshold", "random", "nonzeros", "joint", "cosine", prune_rate=0.5,
            paper="Mostafa & Wang, ICML 2019",
        ),
        MethodPreset(
            "snfs", "uniform", "magnitude", "momentum", "momentum", "joint", "cosine", prune_rate=0.5,
            paper="Dettmers & Zettlemoyer, 2019",
        ),
        MethodPreset(
            "rigl", "erk", "magnitude", "gradient", "none", "joint", "cosine", prune_rate=0.3, min_prune_rate=0.0,
            update_every=100, update_until=0.75,
            paper="Evci et al., ICML 2020",
            notes="the authors' code updates RigL once per epoch: update_every='epoch', update_until=None",
        ),
        MethodPreset(
            "gmp", "dense", "magnitude", "none", "none", "joint", "gmp", prune_rate=0.0, update_every=100,
            paper="Zhu & Gupta, 2017",
        ),
    )
}  # fmt: skip


def resolve(method: str, sparsity: float, **overrides: Any) -> MethodConfig:
    """The preset ``METHODS[method]`` with every override that is not ``None`` applied, checked as a whole.

    ``gate_redistribution`` also takes ``True`` (= ``"joint"``) and ``False`` (= ``"none"``).
    """
    _number("sparsity", sparsity, 0.0, 1.0, "[0, 1)", upper_open=True)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    parts = {f.name for f in dataclasses.fields(MethodPreset)} - {"name", "paper", "notes"}  # (those describe it)
    unknown = set(overrides) - parts
    if unknown:
        raise TypeError(f"unknown method parts {sorted(unknown)}; the parts are {sorted(parts)}")
    chosen = {key: value for key, value in overrides.items() if value is not None}
    gate = chosen.get("gate_redistribution")
    if isinstance(gate, bool):
        chosen["gate_redistribution"] = "joint" if gate else "none"
    config = MethodConfig(**{**dataclasses.asdict(METHODS[method]), **chosen, "sparsity": float(sparsity)})
    _check(config)
    return config


def needs_gradient(config: MethodConfig) -> bool:
    """Whether an update reads the dense gradient of the last step (gradient growth, Table 6's gradient variant)."""
    return config.growth == "gradient" or config.gate_redistribution == "gradient"


def dense_gradient_every(config: MethodConfig) -> int | str | None:
    """How often the method needs the dense weight gradient (the FLOPs of Appendix L).

    ``1``: every step (SNFS: the momentum accumulates dense gradients); the update cadence (``int`` steps or
    ``"epoch"``): on update steps only (RigL); ``None``: never (the backward pass may stay sparse).
    """
    if config.schedule == "never" or config.growth == "none":
        return None
    if config.growth == "momentum" or config.redistribution == "momentum":
        return 1
    if needs_gradient(config):
        return config.update_every
    return None


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------


def _check(config: MethodConfig) -> None:
    _choice("init", config.init, tuple(topology.INIT_BUDGETS))
    _choice("removal", config.removal, (*topology.REMOVAL_STRATEGIES, *topology.THRESHOLD_REMOVALS, "none"))
    _choice("growth", config.growth, (*topology.GROWTH_STRATEGIES, "none"))
    _choice("redistribution", config.redistribution, ("none", *LAYER_SCORES))
    _choice("gate_redistribution", config.gate_redistribution, GATE_MODES)  # (resolve turned True/False into modes)
    _choice("schedule", config.schedule, tuple(SCHEDULES))
    _choice("removed_and_regrown", config.removed_and_regrown, ("restart", "keep"))
    _number("prune_rate", config.prune_rate, 0.0, 1.0, "[0, 1]")
    _number("min_prune_rate", config.min_prune_rate, 0.0, 1.0, "[0, 1]")
    _number("threshold_tolerance", config.threshold_tolerance, 0.0, 1.0, "[0, 1]")
    _number("threshold", config.threshold, 0.0, float("inf"), "(0, inf)")
    if config.threshold <= 0:
        raise ValueError(f"threshold must be in (0, inf), got {config.threshold}")
    every = config.update_every
    if isinstance(every, bool) or not isinstance(every, (str, int)):  # the library's rule: a wrong type is a TypeError
        raise TypeError(f"update_every must be 'epoch' or a positive number of steps, got {every!r}")
    if not (every == "epoch" or (isinstance(every, int) and every > 0)):
        raise ValueError(f"update_every must be 'epoch' or a positive number of steps, got {every!r}")
    if config.update_until is not None:
        _number("update_until", config.update_until, 0.0, 1.0, "(0, 1] or None")
        if config.update_until <= 0:
            raise ValueError(f"update_until must be in (0, 1] or None, got {config.update_until}")
    for name in ("pruning_start", "pruning_end"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{name} must be a step (int >= 0) or a fraction of the run (float in [0, 1]), got {value!r}"
            )
        if (isinstance(value, float) and not 0.0 <= value <= 1.0) or (isinstance(value, int) and value < 0):
            raise ValueError(
                f"{name} must be a step (int >= 0) or a fraction of the run (float in [0, 1]), got {value!r}"
            )
    if config.schedule == "gmp" and config.growth != "none":
        raise ValueError(
            f"schedule='gmp' prunes without regrowth: growth must be 'none', got {config.growth!r} "
            "(a sparse-to-sparse method uses schedule='cosine')"
        )
    if config.schedule == "gmp" and config.removal not in topology.REMOVAL_STRATEGIES:
        raise ValueError(
            f"schedule='gmp' prunes to exact counts: removal must be one of {list(topology.REMOVAL_STRATEGIES)}, "
            f"got {config.removal!r}"
        )
    if config.schedule == "cosine" and config.growth == "none" and config.removal != "none":
        raise ValueError(
            f"growth='none' with removal={config.removal!r} would lose weights at every update: a sparse-to-sparse "
            "schedule ('cosine') needs a growth, and pruning without regrowth is schedule='gmp'"
        )


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if isinstance(value, bool) or value not in allowed:  # (a bool is no choice; True == 1 would match an int)
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _number(name: str, value: Any, low: float, high: float, allowed: str, upper_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in {allowed}, got {type(value).__name__} {value!r}")
    if not (low <= value < high if upper_open else low <= value <= high):
        raise ValueError(f"{name} must be in {allowed}, got {value}")
