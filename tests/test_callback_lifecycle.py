"""SelfishSparsityCallback's lifecycle in real Trainer runs: the seed it draws and shares, the update cadence under
gradient accumulation, checkpoints written before newer keys existed, what it logs and at which step, what it hands
monitors, which gradient copies it keeps, and what it lets go of when the fit ends.

These close gaps that mutation testing found (docs/testing.md): each test fails for a planted bug the rest of the
suite let through.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from conftest import RecordingLogger, TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, IterableDataset

import lightning_selfish.callback
from lightning_selfish import SelfishSparsityCallback
from lightning_selfish.callback import _check_strategy, _rank_zero_broadcast
from lightning_selfish.engine import SparseEngine

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


class Topology(Callback):
    """Records every ``on_topology_update`` call: the global step, the module it was handed, whether it was an update
    (``stats`` given) and the gradient copy the sparsity callback keeps at that moment."""

    def __init__(self, sparsity: SelfishSparsityCallback) -> None:
        self.sparsity = sparsity
        self.calls: list[dict[str, Any]] = []

    def on_topology_update(self, trainer, pl_module, engine, stats) -> None:
        self.calls.append(
            dict(
                step=trainer.global_step,
                module=pl_module,
                update=stats is not None,
                stats=stats,
                gradients=self.sparsity.state_dict()["gradients"],
            )
        )

    @property
    def update_steps(self) -> list[int]:
        return [call["step"] for call in self.calls if call["update"]]


def fit(callback: SelfishSparsityCallback, *extra: Callback, max_epochs: int = 2, model=None, loader=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or TinyLM()
    trainer = make_trainer([callback, *extra], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader() if loader is None else loader, token_loader(1, 2))
    return model, trainer


def snapshot(model: torch.nn.Module, callback: SelfishSparsityCallback) -> tuple[dict, dict]:
    masks = {name: mask.clone() for name, mask in callback.masks.items()}
    return masks, {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for left, right in zip(a, b):
        assert left.keys() == right.keys()
        for name in left:
            assert torch.equal(left[name], right[name]), name


# --------------------------------------------------------------------------------------------------------------
# the seed
# --------------------------------------------------------------------------------------------------------------


def test_a_drawn_seed_is_reproducible_recorded_and_reproduces_the_masks() -> None:
    first, second = SelfishSparsityCallback(sparsity=0.6), SelfishSparsityCallback(sparsity=0.6)
    model_a, _ = fit(first)
    fit(second)  # the same global seed draws the same seed
    seed = first.state_dict()["seed"]
    assert isinstance(seed, int) and seed == second.state_dict()["seed"]
    assert 0 <= seed < 2**62 and seed.bit_length() > 32  # a 62-bit draw is below 2**32 with probability 2**-30
    explicit = SelfishSparsityCallback(sparsity=0.6, seed=seed)
    model_b, _ = fit(explicit)
    assert_same(snapshot(model_a, first), snapshot(model_b, explicit))
    other = SelfishSparsityCallback(sparsity=0.6)
    pl.seed_everything(1, verbose=False)
    make_trainer([other], max_epochs=1).fit(TinyLM(), token_loader())
    assert other.state_dict()["seed"] != seed


class RankOne(SingleDeviceStrategy):
    """Rank 1 of a 2-process run as the callback sees it: rank 0's broadcast delivers ``RANK_ZERO_SEED``."""

    RANK_ZERO_SEED = 2**61 + 12345

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self.global_rank = 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.RANK_ZERO_SEED if src == 0 else obj


def test_a_non_zero_rank_takes_rank_zeros_seed_and_logs_nothing() -> None:
    callback, logger = SelfishSparsityCallback(sparsity=0.6), RecordingLogger()
    fit(callback, strategy=RankOne(), logger=logger, max_epochs=2)
    assert callback.state_dict()["seed"] == RankOne.RANK_ZERO_SEED
    reference = SelfishSparsityCallback(sparsity=0.6, seed=RankOne.RANK_ZERO_SEED)
    fit(reference, max_epochs=2)
    for name, mask in reference.masks.items():
        assert torch.equal(mask, callback.masks[name]), name
    assert not any(key.startswith(("sparsity/", "topology/")) for _, metrics in logger.records for key in metrics)


@pytest.fixture
def one_process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_mask_synchronizer_exists_only_in_an_initialised_multi_process_run(one_process_group) -> None:
    assert _rank_zero_broadcast(SimpleNamespace(world_size=1)) is None  # one process: nothing to agree on
    synchronize = _rank_zero_broadcast(SimpleNamespace(world_size=2))
    code = torch.tensor([3, 0, 2], dtype=torch.uint8)
    synchronize(code)  # rank 0 (this process) keeps its own code, in place
    assert code.tolist() == [3, 0, 2]


def test_no_mask_synchronizer_without_a_process_group() -> None:
    assert not dist.is_initialized()
    assert _rank_zero_broadcast(SimpleNamespace(world_size=2)) is None


# --------------------------------------------------------------------------------------------------------------
# the update cadence
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every,expected", [(1, list(range(1, 8))), (3, [3, 6])])
def test_step_updates_happen_once_per_optimizer_step_under_accumulation(every: int, expected: list[int]) -> None:
    """8 batches per epoch, 2 accumulated per step, 2 epochs: 8 optimizer steps; never at step 0, never twice, never
    on the last step (a weight grown there would end the run at zero)."""
    callback = SelfishSparsityCallback(sparsity=0.6, update_every=every, seed=0)
    topology = Topology(callback)
    fit(callback, topology, accumulate_grad_batches=2)
    assert topology.update_steps == expected
    assert callback.num_updates == len(expected)


def test_a_resume_right_after_a_step_update_does_not_repeat_it(tmp_path: Path) -> None:
    """A mid-epoch checkpoint written at the step of an update, with accumulation: the resumed run's next batch ends
    at the same global step, and must not update again."""
    full = SelfishSparsityCallback(sparsity=0.6, update_every=2, seed=0)
    fit(full, accumulate_grad_batches=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    fit(
        SelfishSparsityCallback(sparsity=0.6, update_every=2, seed=0, total_steps=8),  # (the schedule of 8 steps)
        checkpoint,
        accumulate_grad_batches=2,
        max_steps=2,
        enable_checkpointing=True,
    )
    state = torch.load(tmp_path / "step=2.ckpt", weights_only=False)["callbacks"]["SelfishSparsityCallback"]
    assert (state["num_updates"], state["last_update_step"]) == (1, 2)
    resumed = SelfishSparsityCallback(sparsity=0.6, update_every=2, seed=0)
    topology = Topology(resumed)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer([resumed, topology], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(TinyLM(), token_loader(), token_loader(1, 2), ckpt_path=tmp_path / "step=2.ckpt")
    assert topology.update_steps == [4, 6]  # (not at 8, the last step)
    assert resumed.num_updates == full.num_updates == 3


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------


def checkpoint_after_one_epoch(tmp_path: Path, **kwargs) -> tuple[Path, tuple[dict, dict]]:
    """A 2-epoch run (the reference) and the checkpoint its twin wrote after epoch 0."""
    full = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3, **kwargs)
    full_model, _ = fit(full, max_epochs=3)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3, **kwargs)
    fit(first, StopAfterFirstEpoch(), saver, max_epochs=3, enable_checkpointing=True)
    return tmp_path / "epoch=0.ckpt", snapshot(full_model, full)


def resume(path: Path, callback: SelfishSparsityCallback, max_epochs: int = 3) -> TinyLM:
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    make_trainer([callback], max_epochs=max_epochs).fit(model, token_loader(), token_loader(1, 2), ckpt_path=path)
    return model


def test_a_checkpoint_from_before_the_newer_keys_resumes_exactly(tmp_path: Path, caplog) -> None:
    """Checkpoints written before the method registry and device-side growth lack 'sparsity', 'method',
    'threshold', 'seed' and 'generator_device': they were selfish runs with a CPU generator."""
    path, expected = checkpoint_after_one_epoch(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"]["SelfishSparsityCallback"]
    for key in ("sparsity", "method", "threshold", "seed", "generator_device"):
        del state[key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    caplog.set_level(logging.WARNING, logger="lightning_selfish")
    callback = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3)
    model = resume(old, callback)
    assert_same(snapshot(model, callback), expected)
    assert "random generator" not in caplog.text  # a CPU generator's state, restored as it is
    with pytest.raises(ValueError) as error:
        resume(old, SelfishSparsityCallback(sparsity=0.6, method="set"))
    assert str(error.value) == (
        "the checkpoint was trained with method='selfish', this callback has method='set': resume with the same method"
    )


@pytest.mark.parametrize("gate_redistribution", [False, "magnitude"])
def test_per_gate_runs_resume_exactly(tmp_path: Path, gate_redistribution) -> None:
    """The restored engine keeps the gate layouts and the gate handling (per-gate ranking differs from joint)."""
    path, expected = checkpoint_after_one_epoch(tmp_path, gate_redistribution=gate_redistribution)
    callback = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3, gate_redistribution=gate_redistribution)
    model = resume(path, callback)
    assert_same(snapshot(model, callback), expected)


def test_a_state_dict_needs_both_masks_and_generator() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5)
    for keys in (["masks"], ["generator"]):
        with pytest.raises(ValueError, match=re.escape(f"expected keys 'masks' and 'generator', got {keys}")):
            callback.load_state_dict(dict.fromkeys(keys))


# --------------------------------------------------------------------------------------------------------------
# what it logs, and where
# --------------------------------------------------------------------------------------------------------------


def test_sparsity_is_logged_at_fit_start_and_at_each_update_step() -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, update_every=3, min_prune_rate=0.05, seed=0)
    logger = RecordingLogger()
    fit(callback, logger=logger)
    steps = [step for step, _ in logger.steps_of("sparsity/overall")]
    assert steps == [0, 3, 6, 9, 12, 15]
    assert [step for step, _ in logger.steps_of("topology/prune_rate")] == [3, 6, 9, 12, 15]
    for step, rate in logger.steps_of("topology/prune_rate"):  # the cosine from 0.5 to 0.05 over 16 steps
        assert rate == pytest.approx(0.05 + (0.5 - 0.05) / 2 * (1 + math.cos(math.pi * step / 16))), step
        assert callback.current_prune_rate(step) == pytest.approx(rate)
    assert callback.current_prune_rate(16) == pytest.approx(0.05)


def test_gmp_logs_its_target_sparsity_on_the_cubic() -> None:
    callback, logger = SelfishSparsityCallback(sparsity=0.6, method="gmp", update_every=2, seed=0), RecordingLogger()
    fit(callback, logger=logger, max_epochs=3)  # 24 steps; pruning from step 0 to 0.75 * 24 = 18
    targets = logger.steps_of("topology/target_sparsity")
    assert [step for step, _ in targets] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    for step, target in targets:
        assert target == pytest.approx(0.6 * (1 - (1 - step / 18) ** 3)), step
        assert callback.scheduled_sparsity(step) == pytest.approx(target)
    assert callback.scheduled_sparsity(0) == 0.0 and callback.scheduled_sparsity(24) == pytest.approx(0.6)


def test_dsr_adapts_its_threshold_and_checkpoints_the_adapted_one() -> None:
    callback, logger = SelfishSparsityCallback(sparsity=0.6, method="dsr", threshold=1e-4, seed=0), RecordingLogger()
    fit(callback, logger=logger, max_epochs=3)
    thresholds = [value for _, value in logger.steps_of("topology/threshold")]
    assert thresholds == [2e-4, 4e-4]  # far too low a start: hardly any weight falls below it, doubled each time
    assert callback.state_dict()["threshold"] == thresholds[-1]
    # a tolerance of 100 % never doubles (fewer than 0 removals cannot happen)
    tolerant = SelfishSparsityCallback(sparsity=0.6, method="dsr", threshold=1e-4, threshold_tolerance=1.0, seed=0)
    logger = RecordingLogger()
    fit(tolerant, logger=logger, max_epochs=3)
    assert [value for _, value in logger.steps_of("topology/threshold")] == [1e-4, 1e-4]


def test_across_layer_redistribution_moves_counts_between_tensors_in_a_fit() -> None:
    """SNFS shares the regrowth over tensors by their momentum: tensors' counts move, the total does not."""
    callback = SelfishSparsityCallback(sparsity=0.6, method="snfs", seed=0)
    topology = Topology(callback)
    fit(callback, topology, model=TinyLM(optimizer="momentum"), max_epochs=3)
    stats = [call["stats"] for call in topology.calls if call["update"]]
    assert len(stats) == 2
    for update in stats:
        assert sum(update.grown.values()) == sum(update.removed.values())
        assert update.grown != update.removed  # with redistribution="none" every tensor regrows its own removals


def test_updates_are_quiet_unless_verbose_and_a_skipped_update_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []  # what the callback tells the user (rank_zero_info: Lightning's logger does not propagate)
    monkeypatch.setattr(lightning_selfish.callback, "rank_zero_info", said.append)
    fit(SelfishSparsityCallback(sparsity=0.6, seed=0))
    assert said == []

    class SkipTheFirst(Callback):
        def on_fit_start(self, trainer, pl_module):
            callback.skip_next_update()

    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    fit(callback, SkipTheFirst(), max_epochs=3)  # (after the callback's own fit start, which resets the schedule)
    assert said == ["SelfishSparsityCallback: topology update skipped at step 8"]
    assert callback.num_updates == 1 and callback.state_dict()["skip_next_update"] is False


# --------------------------------------------------------------------------------------------------------------
# monitors, gradient copies, the end of the fit
# --------------------------------------------------------------------------------------------------------------


def test_monitors_are_handed_the_lightning_module() -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    topology = Topology(callback)
    model, _ = fit(callback, topology)
    assert [call["update"] for call in topology.calls] == [False, True]
    assert all(call["module"] is model for call in topology.calls)


@pytest.mark.parametrize("every,updates", [(3, [3, 6, 9, 12, 15]), ("epoch", [8, 16])])
def test_gradient_copies_are_taken_once_per_update_and_dropped_once_used(every, updates, monkeypatch) -> None:
    copies: list[int] = []
    original = SparseEngine.dense_gradients

    def counting(engine):
        copies.append(1)
        return original(engine)

    monkeypatch.setattr(SparseEngine, "dense_gradients", counting)
    callback = SelfishSparsityCallback(sparsity=0.6, growth="gradient", update_every=every, seed=0)
    topology = Topology(callback)
    fit(callback, topology, max_epochs=3 if every == "epoch" else 2)
    assert topology.update_steps == updates
    # epochs: the last step of every epoch (the third's feeds no update); steps: the step before each update
    assert len(copies) == (3 if every == "epoch" else len(updates))
    assert all(call["gradients"] is None for call in topology.calls)


class Unsized(IterableDataset):
    """The windows of ``token_loader()`` without a length (as variable-length BPTT yields them)."""

    def __iter__(self):
        yield from token_loader().dataset


def unsized_loader() -> DataLoader:
    return DataLoader(Unsized(), batch_size=token_loader().batch_size)


def test_random_growth_keeps_no_gradient_copy_over_an_unsized_loader() -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0, total_steps=16)
    topology = Topology(callback)
    fit(callback, topology, loader=unsized_loader())
    assert topology.update_steps == [8] and callback.state_dict()["gradients"] is None


def test_the_running_gradient_copy_reuses_its_buffers() -> None:
    """Over an unsized loader gradient growth copies every step's dense gradient: into the same buffers."""
    addresses: list[dict[str, int]] = []

    class Buffers(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            addresses.append({name: g.data_ptr() for name, g in callback.state_dict()["gradients"].items()})

    callback = SelfishSparsityCallback(sparsity=0.6, growth="gradient", seed=0, total_steps=16)
    fit(callback, Buffers(), loader=unsized_loader())
    assert len(addresses) == 16 and all(a == addresses[0] for a in addresses)


def test_momentum_growth_under_sntasgd_grows_at_the_largest_dense_gradients() -> None:
    """Under SNT-ASGD (no momentum buffer) SNFS's momentum is the dense gradient of the step before the update."""

    seen: dict[str, torch.Tensor] = {}

    class LastGradient(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.is_last_batch:
                params = dict(pl_module.named_parameters())
                seen.update({name: params[name].grad.clone() for name in callback.masks})

    callback = SelfishSparsityCallback(sparsity=0.6, growth="momentum", seed=0)
    topology = Topology(callback)
    before: dict[str, torch.Tensor] = {}

    class MasksBefore(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            before.update({name: mask.clone() for name, mask in callback.masks.items()})

    fit(
        callback,
        topology,
        LastGradient(),
        MasksBefore(),
        model=TinyLM(optimizer="sntasgd"),
        max_epochs=2,
        gradient_clip_val=None,
    )
    assert topology.update_steps == [8]
    stats = topology.calls[-1]["stats"]
    for name, mask in callback.masks.items():
        grown = mask & ~before[name]
        if not grown.any():
            continue
        score = seen[name].abs()
        # every newly active position scores at least as high as every position left inactive (all were candidates)
        assert score[grown].min() >= score[~mask].max(), name
    assert sum(stats.grown.values()) > 0


def test_random_growth_under_sntasgd_keeps_no_gradient_copy() -> None:
    """The paper's default (random growth, SNT-ASGD): no update reads a gradient, so no checkpoint carries one."""

    carried: list[Any] = []

    class AtEpochEnd(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            carried.append(callback.state_dict()["gradients"])

    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    fit(callback, AtEpochEnd(), model=TinyLM(optimizer="sntasgd"))
    assert carried == [None, None]


def weights_around_the_first_update(removed_and_regrown: str) -> tuple[dict, dict]:
    """Weights, momenta and masks just before and just after the update at the start of epoch 1."""
    before: dict[str, dict[str, torch.Tensor]] = {}
    after: dict[str, dict[str, torch.Tensor]] = {}

    def state(pl_module) -> dict[str, dict[str, torch.Tensor]]:
        optimizer = pl_module.trainer.optimizers[0]
        params = dict(pl_module.named_parameters())
        return {
            name: dict(
                weight=params[name].detach().clone(),
                momentum=optimizer.state[params[name]]["momentum_buffer"].clone(),
                mask=mask.clone(),
            )
            for name, mask in callback.masks.items()
        }

    class Before(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                before.update(state(pl_module))

    class After(Callback):
        def on_topology_update(self, trainer, pl_module, engine, stats):
            if stats is not None:
                after.update(state(pl_module))

    callback = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.9, removed_and_regrown=removed_and_regrown, seed=0)
    pl.seed_everything(0, verbose=False)
    fit(Before(), callback, After(), model=TinyLM(optimizer="momentum"))
    return before, after


def test_removed_and_regrown_weights_keep_value_and_momentum_when_asked() -> None:
    """``removed_and_regrown="keep"`` (the authors' handling) in a real fit; the two runs are identical up to the
    update, so the weights the default run restarts at zero are the removed-and-regrown ones."""
    before, restarted = weights_around_the_first_update("restart")
    same_before, kept = weights_around_the_first_update("keep")
    regrown_total = 0
    for name, old in before.items():
        assert torch.equal(old["weight"], same_before[name]["weight"])
        both = old["mask"] & restarted[name]["mask"]
        assert torch.equal(kept[name]["mask"], restarted[name]["mask"]), name
        regrown = both & (restarted[name]["weight"] == 0) & (old["weight"] != 0)
        regrown_total += int(regrown.sum())
        assert (restarted[name]["momentum"][regrown] == 0).all(), name
        assert torch.equal(kept[name]["weight"][both], old["weight"][both]), name
        assert torch.equal(kept[name]["momentum"][both], old["momentum"][both]), name
    assert regrown_total > 0  # the planted difference exists


def test_the_optimizer_is_released_when_the_fit_ends() -> None:
    """After ``fit`` the optimizer steps dense again (e.g. a dense fine-tuning afterwards): no re-zeroing left."""
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    model, trainer = fit(callback, max_epochs=1)
    optimizer = trainer.optimizers[0]
    weight = model.rnn.weight_hh_l0
    inactive = ~callback.masks["rnn.weight_hh_l0"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert (weight[inactive] != 0).all()


# --------------------------------------------------------------------------------------------------------------
# arguments and strategies
# --------------------------------------------------------------------------------------------------------------


def test_a_one_step_run_is_a_valid_length() -> None:
    assert SelfishSparsityCallback(sparsity=0.5, total_steps=1).total_steps == 1


def test_resolved_arguments_are_the_attributes() -> None:
    """After ``__init__`` every method part is an attribute holding its resolved value, overrides included."""
    callback = SelfishSparsityCallback(
        sparsity=0.5,
        method="gmp",
        pruning_start=3,
        pruning_end=0.5,
        removed_and_regrown="keep",
        update_every=2,
    )
    assert (callback.pruning_start, callback.pruning_end, callback.removed_and_regrown) == (3, 0.5, "keep")
    dsr = SelfishSparsityCallback(sparsity=0.5, method="dsr", threshold=0.02, threshold_tolerance=0.3)
    assert (dsr.config.threshold, dsr.config.threshold_tolerance) == (0.02, 0.3)
    for part in ("prune_rate", "init", "removal", "growth", "gate_redistribution", "redistribution", "schedule"):
        assert getattr(dsr, part) == getattr(dsr.config, part), part


def test_deepspeed_is_refused_although_it_is_a_ddp_strategy() -> None:
    class DeepSpeedStrategy(DDPStrategy):  # as Lightning's derives from DDPStrategy
        pass

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(ValueError) as error:
        _check_strategy(SimpleNamespace(strategy=strategy))
    assert str(error.value) == (
        "SelfishSparsityCallback supports the single-device and DDP strategies ('auto', 'ddp', 'ddp_spawn', ...), "
        f"got {__name__}.{DeepSpeedStrategy.__qualname__}: every rank must hold every whole weight tensor "
        "(strategies that shard parameters, such as FSDP and DeepSpeed, would give each rank a different slice of "
        "every mask)"
    )


# --------------------------------------------------------------------------------------------------------------
# messages, word for word (the ones a user meets first)
# --------------------------------------------------------------------------------------------------------------

RUN_LENGTH = (
    "SelfishSparsityCallback anneals the prune rate over the whole run, which needs a finite length in optimizer "
    "steps: {cause} (estimated_stepping_batches={total}, max_epochs={epochs}, max_steps={steps}). Give "
    "SelfishSparsityCallback(total_steps=...), or set Trainer(max_steps=...), or use a sized train dataloader with "
    "Trainer(max_epochs=...)"
)


def test_a_run_without_a_length_is_refused_with_its_cause() -> None:
    with pytest.raises(ValueError) as endless:
        fit(SelfishSparsityCallback(sparsity=0.5), max_epochs=-1)
    cause = "max_epochs=-1 without max_steps trains for ever"
    assert str(endless.value) == RUN_LENGTH.format(cause=cause, total="inf", epochs=-1, steps=-1)
    with pytest.raises(ValueError) as empty:
        fit(SelfishSparsityCallback(sparsity=0.5), max_steps=0, max_epochs=2)
    cause = "max_epochs=2, max_steps=0 trains no step"
    assert str(empty.value) == RUN_LENGTH.format(cause=cause, total=0, epochs=2, steps=0)
    with pytest.raises(ValueError) as no_epoch:
        fit(SelfishSparsityCallback(sparsity=0.5), max_epochs=0)
    cause = "max_epochs=0, max_steps=-1 trains no step"
    assert str(no_epoch.value) == RUN_LENGTH.format(cause=cause, total=0, epochs=0, steps=-1)
    with pytest.raises(ValueError) as unsized:
        fit(SelfishSparsityCallback(sparsity=0.5), loader=unsized_loader(), max_epochs=2)
    cause = (
        "the train dataloader has no length (an IterableDataset without __len__), so Lightning cannot count the "
        "steps of an epoch"
    )
    assert str(unsized.value) == RUN_LENGTH.format(cause=cause, total=-1, epochs=2, steps=-1)


def test_resuming_a_checkpoint_without_masks_or_with_other_masks_says_why(tmp_path: Path) -> None:
    make_trainer([], max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path).fit(TinyLM(), token_loader())
    dense = next(tmp_path.rglob("*.ckpt"))
    with pytest.raises(ValueError) as error:
        resume(dense, SelfishSparsityCallback(sparsity=0.6))
    assert str(error.value) == (
        f"resuming from {dense!r}, which holds no SelfishSparsityCallback state: its masks are unknown. Load "
        "the weights in the LightningModule instead of passing ckpt_path to fit()."
    )
    path, _ = checkpoint_after_one_epoch(tmp_path / "sparse")
    with pytest.raises(ValueError) as error:
        resume(path, SelfishSparsityCallback(sparsity=0.6, exclude=["decoder.*"], include=["*.weight", "rnn.*"]))
    assert str(error.value) == (
        "the checkpoint's sparsity masks do not match the parameters chosen for sparsification: only in the "
        "checkpoint: ['decoder.weight']; only in the model: []"
    )
