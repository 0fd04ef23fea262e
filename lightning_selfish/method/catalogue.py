"""Sparse training methods as named presets of part objects, and the registries of the built-in parts.

A method is one part of each kind (:mod:`lightning_selfish.method.parts`) plus a few numbers. The parts are registered
here by name, which is what presets, YAML configs and the CLI use:

======================== ========================= ===========================================================
part                     registry                  built-in names
======================== ========================= ===========================================================
``init``                 :data:`INITS`             uniform, er, erk, dense
``removal``              :data:`REMOVALS`          magnitude, set, negativity, threshold, none
``growth``               :data:`GROWTHS`           random, gradient, momentum, none
``redistribution``       :data:`REDISTRIBUTIONS`   none, nonzeros (DSR), momentum (SNFS)
``gate_redistribution``  :data:`GATE_REDISTRIBUTIONS` joint (Selfish-RNN), none (per gate), magnitude, gradient
``schedule``             :data:`SCHEDULES`         cosine, gmp, never
======================== ========================= ===========================================================

``SelfishSparsityCallback(method=NAME, ...)`` starts from ``METHODS[NAME]``; every callback argument left at
``None`` takes the preset's value, every argument given explicitly replaces it (:func:`resolve`). A part argument
is a registered name or a part object (a user's own part). The table of presets, and where each follows its own
paper or the Selfish-RNN authors' code, is in ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lightning_selfish.method import redistribution, topology
from lightning_selfish.method.parts import (
    GateRedistribution,
    GrownState,
    Growth,
    Init,
    LayerRedistribution,
    MethodConfig,
    Removal,
    Schedule,
)
from lightning_selfish.method.schedules import COSINE, GMP, NEVER, scheduled_sparsity

__all__ = [
    "GATE_REDISTRIBUTIONS",
    "GROWTHS",
    "INITS",
    "METHODS",
    "REDISTRIBUTIONS",
    "REMOVALS",
    "SCHEDULES",
    "GROWN_OPTIMIZER_STATES",
    "MethodConfig",
    "MethodPreset",
    "part",
    "resolve",
    "scheduled_sparsity",
]

# --------------------------------------------------------------------------------------------------------------
# registries: name -> part object (add an entry to make a name usable in presets, YAML and the CLI)
# --------------------------------------------------------------------------------------------------------------

INITS: dict[str, Init] = {
    "uniform": Init("uniform", topology.uniform_counts, topology.uniform_block_counts),
    # ER and ERK are one formula on matrices (density ∝ sum(shape) / prod(shape)), which all weights of the
    # recurrent language models are.
    "er": Init("er", topology.erdos_renyi_counts),
    "erk": Init("erk", topology.erdos_renyi_counts),
    "dense": Init("dense", topology.dense_counts),
}

REMOVALS: dict[str, Removal] = {
    "magnitude": Removal("magnitude", topology.magnitude_removal),
    "set": Removal("set", topology.set_removal),
    "negativity": Removal("negativity", topology.negativity_removal),
    "threshold": Removal("threshold", topology.threshold_removal, by_threshold=True),
    "none": Removal("none", None),
}

GROWTHS: dict[str, Growth] = {
    "random": Growth("random", topology.random_growth, reads="draws", score=topology.random_score),
    "gradient": Growth("gradient", topology.gradient_growth, reads="gradient", score=topology.magnitude_score),
    "momentum": Growth("momentum", topology.momentum_growth, reads="momentum", score=topology.magnitude_score),
    "none": Growth("none", None),
}

REDISTRIBUTIONS: dict[str, LayerRedistribution] = {
    "none": LayerRedistribution("none"),
    "nonzeros": LayerRedistribution("nonzeros", redistribution.nonzeros_score),
    "momentum": LayerRedistribution("momentum", redistribution.momentum_score, reads="momentum"),
}

GATE_REDISTRIBUTIONS: dict[str, GateRedistribution] = {
    "joint": GateRedistribution("joint", joint=True),
    "none": GateRedistribution("none"),
    "magnitude": GateRedistribution("magnitude", score=redistribution.gate_magnitude_score),
    "gradient": GateRedistribution("gradient", score=redistribution.gate_gradient_score, reads="gradient"),
}

SCHEDULES: dict[str, Schedule] = {schedule.name: schedule for schedule in (COSINE, GMP, NEVER)}

#: The values of ``grown_optimizer_state`` (:class:`~lightning_selfish.method.parts.GrownState`).
GROWN_OPTIMIZER_STATES: tuple[str, ...] = tuple(state.value for state in GrownState)


_REGISTRIES: dict[str, tuple[Mapping[str, Any], type]] = {
    "init": (INITS, Init),
    "removal": (REMOVALS, Removal),
    "growth": (GROWTHS, Growth),
    "redistribution": (REDISTRIBUTIONS, LayerRedistribution),
    "gate_redistribution": (GATE_REDISTRIBUTIONS, GateRedistribution),
    "schedule": (SCHEDULES, Schedule),
}


# --------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------


#: The settings of a method other than its parts and its sparsity, with their defaults on :class:`MethodConfig`.
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(MethodConfig)}
_PART_KEYS = ("init", "removal", "growth", "redistribution", "gate_redistribution", "schedule")
_SETTINGS = frozenset(_CONFIG_FIELDS) - {"name", "sparsity", "update_every_given", "prune_rate", *_PART_KEYS}


@dataclass(frozen=True)
class MethodPreset:
    """One sparse training method: its parts by registered name, its prune rate, and ``settings``, the
    :class:`MethodConfig` settings where it differs from their defaults (written once, on :class:`MethodConfig`)."""

    name: str
    init: str
    removal: str
    growth: str
    redistribution: str
    gate_redistribution: str
    schedule: str
    prune_rate: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.settings) - _SETTINGS
        if unknown:
            raise TypeError(
                f"MethodPreset {self.name!r}: unknown settings {sorted(unknown)}; the settings are {sorted(_SETTINGS)}"
            )

    def value(self, key: str) -> Any:
        """The preset's value of a part or a setting: its own, else :class:`MethodConfig`'s default."""
        if key in _PART_KEYS or key == "prune_rate":
            return getattr(self, key)
        if key in self.settings:
            return self.settings[key]
        default = _CONFIG_FIELDS[key].default
        return default.value if isinstance(default, Enum) else default

    def values(self) -> dict[str, Any]:
        """Every part name and setting of the preset (:meth:`value` of each)."""
        return {key: self.value(key) for key in (*_PART_KEYS, "prune_rate", *sorted(_SETTINGS))}


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
            "set_selfish_rnn", "er", "negativity", "random", "none", "joint", "cosine", prune_rate=0.5,
            paper="SET as the Selfish-RNN authors ran it (their magnitude_and_negativity death)",
            notes="Table 3's SET row: removes the most negative weights, not each sign's closest to zero",
        ),
        MethodPreset(
            "dsr", "uniform", "threshold", "random", "nonzeros", "joint", "cosine", prune_rate=0.5,
            settings=dict(grow_into_removed=False),
            paper="Mostafa & Wang, ICML 2019",
        ),
        MethodPreset(
            "snfs", "uniform", "magnitude", "momentum", "momentum", "joint", "cosine", prune_rate=0.5,
            paper="Dettmers & Zettlemoyer, 2019",
        ),
        MethodPreset(
            "rigl", "erk", "magnitude", "gradient", "none", "joint", "cosine", prune_rate=0.3,
            settings=dict(
                min_prune_rate=0.0, update_every=100, update_until=0.75, removed_and_regrown="keep",
                removal_rounding="floor", min_updates=10,
            ),
            paper="Evci et al., ICML 2020",
            notes="the authors' code updates RigL once per epoch: update_every='epoch', update_until=None",
        ),
        MethodPreset(
            "gmp", "dense", "magnitude", "none", "none", "joint", "gmp", prune_rate=0.0,
            settings=dict(update_every=100, min_updates=10),
            paper="Zhu & Gupta, 2017",
        ),
    )
}  # fmt: skip

#: What a user may override (the callback's arguments): every part and setting but the preset-only min_updates.
_OVERRIDABLE = frozenset((*_PART_KEYS, "prune_rate", *_SETTINGS)) - {"min_updates"}


def resolve(method: str, sparsity: float, **overrides: Any) -> MethodConfig:
    """The preset ``METHODS[method]`` with every override that is not ``None`` applied, checked as a whole.

    A part override is a registered name or a part object of that kind. ``gate_redistribution`` also takes
    ``True`` (= ``"joint"``) and ``False`` (= ``"none"``).
    """
    _number("sparsity", sparsity, 0.0, 1.0, "(0, 1)", upper_open=True)
    if sparsity == 0:
        raise ValueError(
            f"sparsity must be in (0, 1), got {sparsity!r}: at sparsity 0 no weight is sparse, yet the updates would "
            "still remove weights and regrow them at zero, so the run would be neither dense nor sparse. For a dense "
            "run leave SelfishSparsityCallback out of the trainer's callbacks"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    preset = METHODS[method]
    parts = _OVERRIDABLE
    unknown = set(overrides) - parts
    if unknown:
        raise TypeError(f"unknown method parts {sorted(unknown)}; the parts are {sorted(parts)}")
    chosen = {key: value for key, value in overrides.items() if value is not None}
    values = {**{key: preset.value(key) for key in parts}, **chosen}
    for key in _REGISTRIES:
        values[key] = part(key, values[key])
    config = MethodConfig(
        name=method,
        sparsity=float(sparsity),
        min_updates=preset.value("min_updates"),
        update_every_given="update_every" in chosen,
        **values,
    )
    _check(config)
    return config


def part(key: str, value: Any) -> Any:
    """The part of kind ``key`` (``"init"``, ``"growth"``, ...) that ``value`` names: a part object of that kind as
    it is, or a registered name; ``gate_redistribution`` also takes ``True`` (= ``"joint"``) and ``False``
    (= ``"none"``). The one place where names become parts."""
    registry, kind = _REGISTRIES[key]
    if key == "gate_redistribution" and isinstance(value, bool):
        value = "joint" if value else "none"
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and value in registry:
        return registry[value]
    extra = "True, False, " if key == "gate_redistribution" else ""
    article = "an" if kind.__name__[0] in "AEIOU" else "a"
    raise ValueError(f"{key} must be {extra}one of {list(registry)} or {article} {kind.__name__} object, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------


def _check(config: MethodConfig) -> None:
    # (removed_and_regrown, removal_rounding and grown_optimizer_state are checked by MethodConfig itself)
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
    schedule, removal, growth = config.schedule, config.removal, config.growth
    if config.structure is not None:
        _check_structure(config)
    if schedule.prunes_to_target and growth.grows:
        raise ValueError(
            f"schedule={schedule.name!r} prunes without regrowth: growth must be 'none', got {growth.name!r} "
            "(a sparse-to-sparse method uses schedule='cosine')"
        )
    if schedule.prunes_to_target and (not removal.removes or removal.by_threshold):
        counted = [name for name, part in REMOVALS.items() if part.removes and not part.by_threshold]
        raise ValueError(
            f"schedule={schedule.name!r} prunes to exact counts: removal must be one of {counted}, got {removal.name!r}"
        )
    if schedule.updates and not schedule.prunes_to_target and not growth.grows and removal.removes:
        raise ValueError(
            f"growth='none' with removal={removal.name!r} would lose weights at every update: a sparse-to-sparse "
            "schedule ('cosine') needs a growth, and pruning without regrowth is schedule='gmp'"
        )


def _check_structure(config: MethodConfig) -> None:
    """A structure fixes the density of every tensor: one sparsity, no counts moved between tensors, growth that
    ranks (the structure keeps its best-ranked candidates), no pruning to a schedule."""
    structure = config.structure
    assert structure is not None
    if abs((1.0 - config.sparsity) - structure.density) > 1e-9:
        raise ValueError(
            f"structure={structure.name!r} keeps a density of {structure.density}: sparsity must be "
            f"{1.0 - structure.density}, got {config.sparsity}"
        )
    if config.redistribution.score is not None or config.schedule.prunes_to_target:
        raise ValueError(
            f"structure={structure.name!r} keeps every tensor at its density: redistribution must be 'none' and the "
            f"schedule must not prune to a target, got redistribution={config.redistribution.name!r}, "
            f"schedule={config.schedule.name!r}"
        )
    if config.growth.grows and config.growth.score is None:
        raise ValueError(
            f"structure={structure.name!r} needs the growth's ranking: growth {config.growth.name!r} has no score"
        )


def _number(name: str, value: Any, low: float, high: float, allowed: str, upper_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in {allowed}, got {type(value).__name__} {value!r}")
    if not (low <= value < high if upper_open else low <= value <= high):
        raise ValueError(f"{name} must be in {allowed}, got {value}")
