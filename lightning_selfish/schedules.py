"""When topology updates happen and how much each one changes: pure functions of the optimizer step.

A schedule is ``fn(step, total_steps, config) -> UpdateAmount | None``, asked after optimizer step ``step`` at every
candidate point of the update cadence (``config.update_every``: every epoch boundary, or every step when it is a
number of steps); ``None`` means no update there. ``config`` is a :class:`lightning_selfish.methods.MethodConfig`.

* ``"cosine"`` (Selfish-RNN, SET, DSR, SNFS, RigL): every ``update_every`` steps or epochs, replace the fraction
  ``p`` of active weights, ``p`` cosine-annealed from ``prune_rate`` to ``min_prune_rate`` over the run, or, with
  ``update_until`` (RigL: 0.75), over that fraction of the run with no update after it (Evci et al. 2020:
  ``f(t) = α/2 (1 + cos(π t / T_end))`` for ``t < T_end``, nothing later).
* ``"gmp"`` (Zhu & Gupta 2017): prune, never regrow, to the sparsity
  ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3`` with ``s_i = 0`` (dense) and ``s_f`` the target,
  at ``t_0, t_0 + Δt, ...`` and at ``t_end`` itself (so the run ends exactly at ``s_f``); ``Δt = update_every``.
* ``"never"`` (static sparse training): no update at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_selfish.topology import cosine_prune_rate

if TYPE_CHECKING:
    from lightning_selfish.methods import MethodConfig

__all__ = [
    "SCHEDULES",
    "UpdateAmount",
    "cosine_schedule",
    "gmp_schedule",
    "gmp_sparsity",
    "never",
    "scheduled_sparsity",
    "step_of",
]


@dataclass(frozen=True)
class UpdateAmount:
    """What one update does: replace a fraction of the active weights, or prune each tensor down to a density."""

    prune_rate: float = 0.0  # sparse-to-sparse: fraction of each block's active weights removed and regrown
    target_density: float | None = None  # dense-to-sparse: each tensor is pruned to round(density * numel), no growth


def step_of(position: int | float, total_steps: int) -> int:
    """A point of the run given as a step (``int``) or as a fraction of the run (``float`` in [0, 1])."""
    if isinstance(position, float):
        return int(round(position * total_steps))
    return int(position)


def _on_cadence(step: int, every: str | int) -> bool:
    return every == "epoch" or step % every == 0


def cosine_schedule(step: int, total_steps: int, config: MethodConfig) -> UpdateAmount | None:
    if not _on_cadence(step, config.update_every):
        return None
    if config.update_until is None:
        return UpdateAmount(cosine_prune_rate(step, total_steps, config.prune_rate, config.min_prune_rate))
    horizon = config.update_until * total_steps
    if step >= horizon:
        return None
    return UpdateAmount(cosine_prune_rate(step, horizon, config.prune_rate, config.min_prune_rate))


def gmp_sparsity(step: int, total_steps: int, config: MethodConfig) -> float:
    """Zhu & Gupta's cubic sparsity at step ``step`` (0 before the start, the target from the end on)."""
    start = step_of(config.pruning_start, total_steps)
    end = step_of(config.pruning_end, total_steps)
    if step < start:
        return 0.0
    progress = 1.0 if end <= start else min(1.0, (step - start) / (end - start))
    return config.sparsity * (1.0 - (1.0 - progress) ** 3)


def gmp_schedule(step: int, total_steps: int, config: MethodConfig) -> UpdateAmount | None:
    start = step_of(config.pruning_start, total_steps)
    end = step_of(config.pruning_end, total_steps)
    if step < start:
        return None
    every = config.update_every
    if every != "epoch" and step != end and (step > end or (step - start) % every != 0):
        return None  # (with epoch updates every boundary from the start on prunes to the cubic's value there)
    sparsity = gmp_sparsity(step, total_steps, config)
    if sparsity <= 0.0:
        return None
    return UpdateAmount(target_density=1.0 - sparsity)


def never(step: int, total_steps: int, config: MethodConfig) -> UpdateAmount | None:
    return None


#: Schedules by name: ``fn(step, total_steps, config) -> UpdateAmount | None``.
SCHEDULES: dict[str, Callable[[int, int, MethodConfig], UpdateAmount | None]] = {
    "cosine": cosine_schedule,
    "gmp": gmp_schedule,
    "never": never,
}


def _gmp_sparsity_in_force(step: int, total_steps: int, config: MethodConfig) -> float:
    if config.update_every == "epoch":
        return gmp_sparsity(step, total_steps, config)
    start = step_of(config.pruning_start, total_steps)
    end = step_of(config.pruning_end, total_steps)
    if step < start:
        return 0.0
    last = end if step >= end else start + (step - start) // config.update_every * config.update_every
    return gmp_sparsity(last, total_steps, config)


def _check_gmp_window(total_steps: int, config: MethodConfig) -> None:
    start = step_of(config.pruning_start, total_steps)
    end = step_of(config.pruning_end, total_steps)
    if not 0 <= start <= end <= total_steps:
        raise ValueError(
            f"GMP prunes from pruning_start to pruning_end, which must satisfy 0 <= start <= end <= the run's "
            f"{total_steps} steps; got pruning_start={config.pruning_start!r} (step {start}), "
            f"pruning_end={config.pruning_end!r} (step {end})"
        )


#: Schedules whose sparsity changes over the run: ``fn(step, total_steps, config) -> sparsity in force``.
SPARSITY_IN_FORCE: dict[str, Callable[[int, int, MethodConfig], float]] = {"gmp": _gmp_sparsity_in_force}

#: Checks of a schedule against the run's length, at fit start: ``fn(total_steps, config)`` raises if it cannot run.
RUN_CHECKS: dict[str, Callable[[int, MethodConfig], None]] = {"gmp": _check_gmp_window}


def scheduled_sparsity(step: int, total_steps: int, config: MethodConfig) -> float:
    """The overall target sparsity in force after optimizer step ``step`` (for FLOPs accounting).

    GMP: the sparsity of the last pruning step at or before ``step`` (exact with a step cadence; with epoch updates
    the cubic's value at ``step``). Every other method: ``config.sparsity`` throughout.
    """
    in_force = SPARSITY_IN_FORCE.get(config.schedule)
    return config.sparsity if in_force is None else in_force(step, total_steps, config)


def check_run(total_steps: int, config: MethodConfig) -> None:
    """Refuse, before any step, a schedule that cannot run in ``total_steps`` steps (e.g. a GMP window past the end)."""
    check = RUN_CHECKS.get(config.schedule)
    if check is not None:
        check(total_steps, config)
