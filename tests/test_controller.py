"""The run controller without a Trainer: cadence, the last-step rule, short runs, prune rates, gradient copies,
seeds and its checkpoint state (``lightning_selfish/controller.py``)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.optim.sntasgd import SNTASGD
from lightning_selfish.run.controller import SparsityController, count_updates, derive_seed


def controller(method: str = "selfish", total: int = 24, **overrides) -> SparsityController:
    config = resolve(method, 0.5, **overrides)
    run = SparsityController(config)
    run.plan(total, config)
    return run


def due_steps(run: SparsityController, last: int) -> list[int]:
    return [step for step in range(last + 1) if run.update_due_after_step(step) is not None]


# --------------------------------------------------------------------------------------------------------------
# cadence
# --------------------------------------------------------------------------------------------------------------


def test_step_cadence_never_at_step_zero_and_never_on_the_last_step_of_a_regrowing_method() -> None:
    run = controller(update_every=4, total=24)
    assert due_steps(run, 30) == [4, 8, 12, 16, 20]  # (24 is the last step: a weight grown there would stay 0)


def test_pruning_only_may_prune_on_the_last_step() -> None:
    run = controller("gmp", total=24, update_every=4, pruning_start=0, pruning_end=24)
    assert due_steps(run, 24) == [4, 8, 12, 16, 20, 24]


def test_a_step_already_updated_is_not_due_again() -> None:
    run = controller(update_every=4, total=24)
    run.last_update_step = 8  # (gradient accumulation: several batches end at step 8)
    assert run.update_due_after_step(8) is None and run.update_due_after_step(12) is not None


def test_epoch_cadence_marks_each_boundary_once() -> None:
    run = controller(total=24)
    assert run.update_due_after_step(8) is None  # (no step updates with the epoch cadence)
    assert run.update_due_at_epoch_start(-1, 0) is None  # the first epoch's start follows no epoch
    assert run.update_due_at_epoch_start(0, 8) is not None
    assert run.update_due_at_epoch_start(0, 8) is None  # handled: a resumed run does not repeat it
    assert run.update_due_at_epoch_start(1, 16) is not None
    assert run.last_updated_epoch == 1


# --------------------------------------------------------------------------------------------------------------
# short runs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,total", [("rigl", 32), ("rigl", 128), ("gmp", 160)])
def test_a_presets_default_cadence_is_scaled_to_a_short_run_and_said(method: str, total: int) -> None:
    config = resolve(method, 0.8)
    assert count_updates(total, config) < config.min_updates  # every 100 steps: 0, 0 and 2 updates
    run = SparsityController(config)
    notice = run.plan(total, config)
    every = run.config.update_every
    assert count_updates(total, run.config) >= config.min_updates
    assert count_updates(total, resolve(method, 0.8, update_every=every + 1)) < config.min_updates  # the largest
    before = {0: "no topology update", 1: "1 topology update"}.get(count_updates(total, config))
    assert notice == (
        f"method={method!r}: the preset's update_every=100 would give this run of {total} optimizer steps "
        f"{before}; it updates every {every} steps instead ({count_updates(total, run.config)} updates; pass "
        "update_every=... to choose)"
    )


def test_a_long_run_keeps_the_presets_cadence() -> None:
    config = resolve("rigl", 0.8)
    run = SparsityController(config)
    assert run.plan(10_000, config) is None and run.config.update_every == 100


def test_a_users_cadence_that_makes_no_update_is_refused_and_one_that_makes_few_is_warned_about() -> None:
    config = resolve("rigl", 0.8, update_every=100)
    with pytest.raises(ValueError) as error:
        SparsityController(config).plan(32, config)
    assert str(error.value) == (
        "method='rigl' with update_every=100 makes no topology update in this run of 32 optimizer steps: give a "
        "smaller update_every (e.g. update_every=2) or train longer"
    )
    config = resolve("rigl", 0.8, update_every=40)
    with pytest.warns(UserWarning, match=r"makes only 3 topology updates in this run of 200 optimizer steps"):
        assert SparsityController(config).plan(200, config) is None


def test_epoch_cadence_is_never_scaled() -> None:
    config = resolve("rigl", 0.8, update_every="epoch")
    run = SparsityController(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.plan(32, config) is None and run.config.update_every == "epoch"


# --------------------------------------------------------------------------------------------------------------
# prune rates
# --------------------------------------------------------------------------------------------------------------


def test_the_logged_prune_rate_is_the_one_the_schedule_uses() -> None:
    rigl = controller("rigl", total=10_000)  # cosine of 0.3 over the first 7,500 steps, nothing after
    assert rigl.prune_rate(3750) == pytest.approx(0.15)  # half of T_end: alpha / 2 (1 + cos(pi / 2))
    assert rigl.prune_rate(5000) == pytest.approx(0.15 * (1 + math.cos(math.pi * 5000 / 7500)))
    assert rigl.update_due_after_step(5000).prune_rate == rigl.prune_rate(5000)
    assert rigl.prune_rate(8000) == 0.0 and rigl.update_due_after_step(8000) is None
    gmp = controller("gmp", total=100, update_every=10, pruning_start=0, pruning_end=50)
    # pruning at 10 takes the sparsity from 0 to s(10) = 0.5 (1 - 0.8^3); at 20 from s(10) to s(20)
    s10, s20 = 0.5 * (1 - 0.8**3), 0.5 * (1 - 0.6**3)
    assert gmp.prune_rate(10) == pytest.approx(s10)
    assert gmp.prune_rate(20) == pytest.approx((s20 - s10) / (1 - s10))
    assert gmp.prune_rate(60) == 0.0


# --------------------------------------------------------------------------------------------------------------
# dense gradient copies
# --------------------------------------------------------------------------------------------------------------


def test_a_dense_gradient_is_kept_only_before_an_update_that_reads_it() -> None:
    rigl = controller("rigl", total=10_000)
    rigl.prepare_gradients([], epoch_cadence_without_length=False)
    assert [step for step in range(0, 320) if rigl.gradient_needed(step, False)] == [99, 199, 299]
    selfish = controller(total=24)
    selfish.prepare_gradients([], epoch_cadence_without_length=True)
    assert not selfish.needs_gradient and not selfish.gradient_needed(7, True)
    snfs = controller("snfs", total=24)
    snfs.prepare_gradients([SNTASGD([nn.Parameter(torch.zeros(1))], lr=1.0)], epoch_cadence_without_length=True)
    assert snfs.needs_gradient and snfs.running_gradient  # SNFS under SNT-ASGD reads the gradient, every step
    assert snfs.gradient_needed(7, True) and not snfs.gradient_needed(6, False)


def test_keep_gradients_copies_before_the_update_and_run_update_drops_the_copy() -> None:
    param = nn.Parameter(torch.randn(6, 4))
    engine = SparseEngine.initialize({"w": param}, 0.5, torch.Generator().manual_seed(0))
    run = controller("rigl", total=10_000)
    run.prepare_gradients([], epoch_cadence_without_length=False)
    param.grad = torch.randn(6, 4)
    run.keep_gradients(engine, 98, False)
    assert run.gradients is None
    run.keep_gradients(engine, 99, False)
    assert torch.equal(run.gradients["w"], param.grad) and run.gradients["w"] is not param.grad
    stats = run.run_update(engine, run.update_due_after_step(100), 100, [])
    assert stats is not None and run.gradients is None and run.num_updates == 1 and run.last_update_step == 100


def test_a_skipped_update_is_recorded_but_changes_nothing() -> None:
    param = nn.Parameter(torch.randn(6, 4))
    engine = SparseEngine.initialize({"w": param}, 0.5, torch.Generator().manual_seed(0))
    mask = engine.masks["w"].clone()
    run = controller(update_every=4, total=24)
    run.skip_next = True
    assert run.run_update(engine, run.update_due_after_step(4), 4, []) is None
    assert torch.equal(engine.masks["w"], mask) and run.num_updates == 0 and run.last_update_step == 4
    assert not run.skip_next


# --------------------------------------------------------------------------------------------------------------
# seeds and state
# --------------------------------------------------------------------------------------------------------------


def test_derived_seeds_are_seedsequence_streams_apart_from_the_seed_itself() -> None:
    for seed in (0, 1, 1111, 2**62, -5):
        expected = [
            int(np.random.SeedSequence(seed % 2**64, spawn_key=(stream,)).generate_state(1, np.uint64)[0]) % 2**63
            for stream in (0, 1)
        ]
        assert [derive_seed(seed, 0), derive_seed(seed, 1)] == expected
        assert len({seed, *expected}) == 3


def test_masks_and_growth_draw_from_their_own_streams() -> None:
    run = SparsityController(resolve("selfish", 0.5))
    generator = run.seed_run(7, None, torch.device("cpu"))
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(derive_seed(7, 0)).get_state())
    run.start_growth_stream()
    assert torch.equal(run.generator.get_state(), torch.Generator().manual_seed(derive_seed(7, 1)).get_state())
    other = SparsityController(resolve("selfish", 0.5))
    other.seed_run(7, 99, torch.device("cpu"))
    other.start_growth_stream()  # the same masks' stream, another growth stream
    assert torch.equal(other.generator.get_state(), torch.Generator().manual_seed(derive_seed(99, 1)).get_state())


def test_state_round_trip_including_a_scaled_cadence() -> None:
    config = resolve("rigl", 0.8)
    run = SparsityController(config)
    run.plan(64, config)
    run.seed_run(3, None, torch.device("cpu"))
    run.num_updates, run.last_update_step, run.skip_next, run.threshold = 4, 40, True, 0.25
    state = run.state_dict()
    restored = SparsityController(config)
    restored.plan(64, config)
    restored.load_state_dict(state, torch.device("cpu"))
    assert restored.config.update_every == run.config.update_every != 100
    assert (restored.num_updates, restored.last_update_step, restored.skip_next, restored.threshold) == (
        4,
        40,
        True,
        0.25,
    )
    assert torch.equal(restored.generator.get_state(), run.generator.get_state()) and restored.seed == 3
