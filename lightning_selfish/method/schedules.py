"""When topology updates happen and how much each one changes: pure functions of the optimizer step.

A schedule is a :class:`lightning_selfish.method.parts.Schedule`: ``amount(step, total_steps, config) -> UpdateAmount |
None``, asked after optimizer step ``step`` at every candidate point of the update cadence (``config.update_every``:
every epoch boundary, or every step when it is a number of steps; ``None`` means no update there), with the prune
rate it uses, the sparsity it has in force and its check of the run's length beside it.

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

import math

from lightning_selfish.method.parts import MethodConfig, Schedule, UpdateAmount

__all__ = [
    "COSINE",
    "GMP",
    "NEVER",
    "UpdateAmount",
    "check_run",
    "cosine_prune_rate",
    "cosine_schedule",
    "gmp_schedule",
    "gmp_sparsity",
    "never",
    "scheduled_sparsity",
    "step_of",
]


def cosine_prune_rate(step: int, total_steps: int | float, initial: float, final: float = 0.005) -> float:
    """Cosine annealing of the prune rate from ``initial`` at step 0 to ``final`` at ``total_steps``.

    This is ``CosineAnnealingLR(eta_min=0.005)`` stepped once per optimizer step, as in the authors' code. Past
    ``total_steps`` the rate stays at ``final`` (the authors' ``CosineAnnealingLR`` would start rising again:
    docs/callback.md, "What happens, and when", item 4). A ``final`` above ``initial`` is clamped to ``initial`` so that
    ``prune_rate=0`` means a static mask.
    """
    final = min(final, initial)
    if total_steps <= 0:
        return initial
    progress = min(max(step, 0), total_steps) / total_steps
    return final + (initial - final) * (1.0 + math.cos(math.pi * progress)) / 2.0


def step_of(position: int | float, total_steps: int) -> int:
    """A point of the run given as a step (``int``) or as a fraction of the run (``float`` in [0, 1])."""
    if isinstance(position, float):
        return int(round(position * total_steps))
    return int(position)


def _on_cadence(step: int, config: MethodConfig) -> bool:
    return config.by_epoch or step % int(config.update_every) == 0


def cosine_rate(step: int, total_steps: int, config: MethodConfig) -> float:
    """The prune rate of an update at ``step``: the cosine over the run, or over its first ``update_until`` (RigL's
    ``T_end``) and 0 after it."""
    if config.update_until is None:
        return cosine_prune_rate(step, total_steps, config.prune_rate, config.min_prune_rate)
    horizon = config.update_until * total_steps
    if step >= horizon:
        return 0.0
    return cosine_prune_rate(step, horizon, config.prune_rate, config.min_prune_rate)


def cosine_schedule(step: int, total_steps: int, config: MethodConfig) -> UpdateAmount | None:
    if not _on_cadence(step, config):
        return None
    if config.update_until is not None and step >= config.update_until * total_steps:
        return None
    return UpdateAmount(cosine_rate(step, total_steps, config))


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
    if not config.by_epoch and step != end and (step > end or (step - start) % int(config.update_every) != 0):
        return None  # (with epoch updates every boundary from the start on prunes to the cubic's value there)
    sparsity = gmp_sparsity(step, total_steps, config)
    if sparsity <= 0.0:
        return None
    return UpdateAmount(target_density=1.0 - sparsity)


def gmp_sparsity_in_force(step: int, total_steps: int, config: MethodConfig) -> float:
    """The sparsity of the last pruning step at or before ``step`` (exact with a step cadence; with epoch updates the
    cubic's value at ``step``)."""
    if config.by_epoch:
        return gmp_sparsity(step, total_steps, config)
    start = step_of(config.pruning_start, total_steps)
    end = step_of(config.pruning_end, total_steps)
    if step < start:
        return 0.0
    last = end if step >= end else start + (step - start) // config.update_every * config.update_every
    return gmp_sparsity(last, total_steps, config)


def gmp_prune_rate(step: int, total_steps: int, config: MethodConfig) -> float:
    """The fraction of the active weights a pruning at ``step`` removes: from the sparsity in force before it to the
    cubic's value at ``step``."""
    before = gmp_sparsity_in_force(step - 1, total_steps, config) if step > 0 else 0.0
    after = gmp_sparsity(step, total_steps, config)
    return max(0.0, (after - before) / (1.0 - before)) if before < 1.0 else 0.0


def check_gmp_window(total_steps: int, config: MethodConfig) -> None:
    start = step_of(config.pruning_start, total_steps)
    end = step_of(config.pruning_end, total_steps)
    if not 0 <= start <= end <= total_steps:
        raise ValueError(
            f"GMP prunes from pruning_start to pruning_end, which must satisfy 0 <= start <= end <= the run's "
            f"{total_steps} steps; got pruning_start={config.pruning_start!r} (step {start}), "
            f"pruning_end={config.pruning_end!r} (step {end})"
        )


def never(step: int, total_steps: int, config: MethodConfig) -> UpdateAmount | None:
    return None


def _no_rate(step: int, total_steps: int, config: MethodConfig) -> float:
    return 0.0


#: Sparse-to-sparse: the cosine-annealed fraction of active weights, replaced on the cadence (Selfish-RNN, SET,
#: DSR, SNFS; RigL with ``update_until``).
COSINE = Schedule("cosine", cosine_schedule, cosine_rate)
#: Dense-to-sparse: Zhu & Gupta's cubic, pruning only.
GMP = Schedule(
    "gmp", gmp_schedule, gmp_prune_rate, sparsity_in_force=gmp_sparsity_in_force, check_run=check_gmp_window,
    prunes_to_target=True,
)  # fmt: skip
#: Static sparse training: the masks never change.
NEVER = Schedule("never", never, _no_rate, updates=False)


def scheduled_sparsity(step: int, total_steps: int, config: MethodConfig) -> float:
    """The overall target sparsity in force after optimizer step ``step`` (for FLOPs accounting).

    GMP: the sparsity of the last pruning step at or before ``step`` (exact with a step cadence; with epoch updates
    the cubic's value at ``step``). Every other method: ``config.sparsity`` throughout.
    """
    in_force = config.schedule.sparsity_in_force
    return config.sparsity if in_force is None else in_force(step, total_steps, config)


def check_run(total_steps: int, config: MethodConfig) -> None:
    """Refuse, before any step, a schedule that cannot run in ``total_steps`` steps (e.g. a GMP window past the end)."""
    if config.schedule.check_run is not None:
        config.schedule.check_run(total_steps, config)
