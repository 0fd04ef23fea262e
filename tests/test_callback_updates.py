"""What the callback's topology updates do in real fits, each checked against a reference computed in the test
(not against what the library reports about itself): removal by magnitude (a plain sort), growth at the largest
|gradient| / |momentum|, grown weights and their optimizer state (SGD momentum, both Adam moments) at exactly 0 or
kept when asked, counts moved between tensors, and the dense-gradient copies growth needs (taken once per update,
dropped once used, over sized and unsized loaders)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import AvgLM, TinyLM, Topology, fit_checked, fit_tiny, make_trainer, run, token_loader, unsized_loader
from pytorch_lightning.callbacks import Callback

from lightning_selfish import SelfishSparsityCallback
from lightning_selfish.core.engine import SparseEngine

# --------------------------------------------------------------------------------------------------------------
# removed and regrown weights, and their optimizer state
# --------------------------------------------------------------------------------------------------------------


def magnitude_kept(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Reference removal: the active positions minus the ``n`` of smallest |w|, by a plain sort.

    Asserts that the choice is unambiguous (no tie at the boundary), so the reference is the only right answer.
    """
    flat_mask = mask.flatten()
    active = flat_mask.nonzero().squeeze(1)
    magnitudes = weight.detach().abs().flatten()[active]
    order = torch.argsort(magnitudes, stable=True)
    if 0 < n < active.numel():
        assert magnitudes[order[n - 1]] < magnitudes[order[n]], "tie at the removal boundary: pick another seed"
    kept = flat_mask.clone()
    kept[active[order[:n]]] = False
    return kept.view_as(mask)


class BeforeUpdate(Callback):
    """Listed before the sparsity callback: snapshots weights, masks, optimizer state and the last dense gradient."""

    def __init__(self, sparsity: SelfishSparsityCallback) -> None:
        self.cb = sparsity
        self.snapshot: dict | None = None
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        self.grads = {name: params[name].grad.detach().clone() for name in self.cb.masks}

    def on_train_epoch_start(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        opt = trainer.optimizers[0]
        self.snapshot = {
            "step": trainer.global_step,
            "weights": {name: params[name].detach().clone() for name in self.cb.masks},
            "masks": {name: mask.clone() for name, mask in self.cb.masks.items()},
            "state": {
                name: {
                    key: value.clone()
                    for key, value in opt.state[params[name]].items()
                    if torch.is_tensor(value) and value.shape == params[name].shape
                }
                for name in self.cb.masks
            },
            "grads": dict(self.grads),
        }


class AfterUpdate(Callback):
    """Listed after the sparsity callback: compares each update with the reference removal."""

    def __init__(self, sparsity: SelfishSparsityCallback, before: BeforeUpdate) -> None:
        self.cb, self.before = sparsity, before
        self.updates: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            return
        snap = self.before.snapshot
        params = dict(pl_module.named_parameters())
        opt = trainer.optimizers[0]
        rate = self.cb.current_prune_rate(snap["step"])
        update = {}
        for name, new in self.cb.masks.items():
            old, weight = snap["masks"][name], snap["weights"][name]
            n = math.ceil(rate * int(old.sum()) - 1e-9)
            kept = magnitude_kept(weight, old, n)
            assert int(new.sum()) == int(old.sum()), name
            assert not (kept & ~new).any(), f"{name}: a weight that should have survived was removed"
            update[name] = {
                "old": old,
                "kept": kept,
                "new": new.clone(),
                "weight_before": weight,
                "weight_after": params[name].detach().clone(),
                "state_before": snap["state"][name],
                "state_after": {key: opt.state[params[name]][key].clone() for key in snap["state"][name]},
                "grad": snap["grads"].get(name),
            }
        self.updates.append(update)


def fit_and_watch(sparsity: SelfishSparsityCallback, optimizer: str, max_epochs: int = 3) -> list[dict]:
    before = BeforeUpdate(sparsity)
    after = AfterUpdate(sparsity, before)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer([before, sparsity, after], max_epochs=max_epochs)
    trainer.fit(TinyLM(optimizer=optimizer), token_loader(), token_loader(1, 2))
    assert len(after.updates) == max_epochs - 1
    return after.updates


@pytest.mark.parametrize("optimizer,moments", [("momentum", {"momentum_buffer"}), ("adam", {"exp_avg", "exp_avg_sq"})])
def test_removed_and_regrown_weights_restart_at_zero_with_zero_state(optimizer, moments):
    # The embedding is left dense: rows of tokens absent from a batch keep |w| ties that make removal ambiguous.
    sparsity = SelfishSparsityCallback(sparsity=0.5, prune_rate=0.9, seed=0, exclude=["encoder.*"])
    regrown_total = 0
    for update in fit_and_watch(sparsity, optimizer):
        for name, u in update.items():
            regrown = u["old"] & ~u["kept"] & u["new"]  # removed by magnitude, then drawn again by growth
            survived = u["kept"]
            grown = u["new"] & ~u["kept"]
            regrown_total += int(regrown.sum())
            assert (u["weight_after"][grown] == 0).all(), f"{name}: a grown weight does not start at 0"
            assert torch.equal(u["weight_after"][survived], u["weight_before"][survived]), name
            assert set(u["state_after"]) == moments, name
            for key in moments:
                before, after = u["state_before"][key], u["state_after"][key]
                assert (before[regrown] != 0).any() or not regrown.any(), f"{name}: nothing to reset in {key}"
                assert (after[grown] == 0).all(), f"{name}: {key} of a regrown weight is not 0"
                assert torch.equal(after[survived], before[survived]), f"{name}: {key} of a survivor changed"
    assert regrown_total > 50  # the case did happen, often


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_sparsity_callback_with_adam_and_momentum_sgd(optimizer) -> None:
    """The paper's other optimizer rows: no trigger; grown weights start with a zero optimizer state."""

    class Model(AvgLM):
        def configure_optimizers(self):
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-9)
            return torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.9)

    sparsity = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0)

    class GrownStateIsZero(Callback):
        checked = 0

        def on_train_epoch_start(self, trainer, pl_module):  # after the sparsity callback's update (list order)
            if trainer.current_epoch == 0:
                self.before = {n: m.clone() for n, m in sparsity.masks.items()}
                return
            params = dict(pl_module.named_parameters())
            opt = trainer.optimizers[0]
            for name, mask in sparsity.masks.items():
                inactive_or_new = ~(self.before[name] & mask)
                for value in opt.state[params[name]].values():
                    if torch.is_tensor(value) and value.shape == mask.shape:
                        assert (value[inactive_or_new] == 0).all()
                        self.checked += 1
                assert (params[name][~mask] == 0).all()
            self.before = {n: m.clone() for n, m in sparsity.masks.items()}

    check = GrownStateIsZero()
    run(Model(optimizer="sgd"), [sparsity, check], 3, limit_train_batches=2)
    assert check.checked == (24 if optimizer == "adam" else 12)


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
    fit_tiny(Before(), callback, After(), model=TinyLM(optimizer="momentum"))
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


# --------------------------------------------------------------------------------------------------------------
# where weights grow
# --------------------------------------------------------------------------------------------------------------


def largest_first(score: torch.Tensor, kept: torch.Tensor, new: torch.Tensor) -> None:
    grown = new & ~kept
    passed_over = ~new & ~kept
    assert grown.any()
    assert score[grown].abs().min() >= score[passed_over].abs().max()


def test_gradient_growth_picks_the_largest_dense_gradients():
    sparsity = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0, growth="gradient", exclude=["encoder.*"])
    for update in fit_and_watch(sparsity, "sgd"):
        for u in update.values():
            largest_first(u["grad"], u["kept"], u["new"])


def test_momentum_growth_picks_the_largest_momenta():
    sparsity = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0, growth="momentum", exclude=["encoder.*"])
    for update in fit_and_watch(sparsity, "momentum"):
        for u in update.values():
            momentum = u["state_before"]["momentum_buffer"]
            assert (momentum[~u["old"]] != 0).any()  # momentum keeps accumulating where weights are inactive
            largest_first(momentum, u["kept"], u["new"])


def test_gradient_growth_with_step_updates_uses_the_gradient_of_the_step_before():
    sparsity = SelfishSparsityCallback(
        sparsity=0.6, prune_rate=0.5, seed=0, growth="gradient", update_every=3, exclude=["encoder.*"]
    )

    class Before(Callback):  # listed before the sparsity callback
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = dict(pl_module.named_parameters())
            self.grads = {name: params[name].grad.detach().clone() for name in sparsity.masks}

        def on_train_batch_end(self, trainer, pl_module, *args):
            params = dict(pl_module.named_parameters())
            self.weights = {name: params[name].detach().clone() for name in sparsity.masks}
            self.masks = {name: mask.clone() for name, mask in sparsity.masks.items()}

    before = Before()
    checked = []

    class After(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step % 3:
                return
            rate = sparsity.current_prune_rate(trainer.global_step)
            for name, new in sparsity.masks.items():
                old = before.masks[name]
                kept = magnitude_kept(before.weights[name], old, math.ceil(rate * int(old.sum()) - 1e-9))
                assert not (kept & ~new).any(), name
                largest_first(before.grads[name], kept, new)
            checked.append(trainer.global_step)

    pl.seed_everything(0, verbose=False)
    make_trainer([before, sparsity, After()], max_epochs=1).fit(TinyLM(), token_loader(), token_loader(1, 2))
    assert checked == [3, 6]


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

    fit_tiny(
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


def test_across_layer_redistribution_moves_counts_between_tensors_in_a_fit() -> None:
    """SNFS shares the regrowth over tensors by their momentum: tensors' counts move, the total does not."""
    callback = SelfishSparsityCallback(sparsity=0.6, method="snfs", seed=0)
    topology = Topology(callback)
    fit_tiny(callback, topology, model=TinyLM(optimizer="momentum"), max_epochs=3)
    stats = [call["stats"] for call in topology.calls if call["update"]]
    assert len(stats) == 2
    for update in stats:
        assert sum(update.grown.values()) == sum(update.removed.values())
        assert update.grown != update.removed  # with redistribution="none" every tensor regrows its own removals


# --------------------------------------------------------------------------------------------------------------
# the dense-gradient copies
# --------------------------------------------------------------------------------------------------------------


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
    fit_tiny(callback, topology, max_epochs=3 if every == "epoch" else 2)
    assert topology.update_steps == updates
    # epochs: the last step of every epoch (the third's feeds no update); steps: the step before each update
    assert len(copies) == (3 if every == "epoch" else len(updates))
    assert all(call["gradients"] is None for call in topology.calls)


def test_random_growth_keeps_no_gradient_copy_over_an_unsized_loader() -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0, total_steps=16)
    topology = Topology(callback)
    fit_tiny(callback, topology, loader=unsized_loader())
    assert topology.update_steps == [8] and callback.state_dict()["gradients"] is None


def test_random_growth_under_sntasgd_keeps_no_gradient_copy() -> None:
    """The paper's default (random growth, SNT-ASGD): no update reads a gradient, so no checkpoint carries one."""

    carried: list[Any] = []

    class AtEpochEnd(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            carried.append(callback.state_dict()["gradients"])

    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    fit_tiny(callback, AtEpochEnd(), model=TinyLM(optimizer="sntasgd"))
    assert carried == [None, None]


def test_the_running_gradient_copy_reuses_its_buffers() -> None:
    """Over an unsized loader gradient growth copies every step's dense gradient: into the same buffers."""
    addresses: list[dict[str, int]] = []

    class Buffers(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            addresses.append({name: g.data_ptr() for name, g in callback.state_dict()["gradients"].items()})

    callback = SelfishSparsityCallback(sparsity=0.6, growth="gradient", seed=0, total_steps=16)
    fit_tiny(callback, Buffers(), loader=unsized_loader())
    assert len(addresses) == 16 and all(a == addresses[0] for a in addresses)


def test_gradient_growth_with_an_unsized_loader():
    # Epoch updates over a loader without a length keep a running copy of the last dense gradient (issue 7);
    # step updates copy it only before each update. The next test checks the grown positions.
    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_loader().dataset

    loader = torch.utils.data.DataLoader(Unsized(), batch_size=4)
    cb = SelfishSparsityCallback(sparsity=0.5, growth="gradient", total_steps=16, seed=0)
    make_trainer([cb], max_epochs=2).fit(TinyLM(), loader)
    assert cb.num_updates == 1 and cb.controller.running_gradient
    cb = SelfishSparsityCallback(sparsity=0.5, growth="gradient", total_steps=10, update_every=3, seed=0)
    model, checker, _ = fit_checked(cb, max_epochs=1)
    assert cb.num_updates == 2  # steps 3 and 6 of 8


def test_gradient_growth_with_epoch_updates_and_an_unsized_loader_equals_the_sized_run():
    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_loader().dataset

    results = []
    for loader in (token_loader(), torch.utils.data.DataLoader(Unsized(), batch_size=4)):
        pl.seed_everything(0, verbose=False)
        cb = SelfishSparsityCallback(sparsity=0.6, method="rigl", update_every="epoch", total_steps=24, seed=1)
        model = TinyLM()
        make_trainer([cb], max_epochs=3).fit(model, loader)
        assert cb.num_updates == 2
        results.append(({n: m.clone() for n, m in cb.masks.items()}, dict(model.named_parameters())))
    (sized_masks, sized_params), (unsized_masks, unsized_params) = results
    for name in sized_masks:
        assert torch.equal(sized_masks[name], unsized_masks[name]), name
    for name in sized_params:
        assert torch.equal(sized_params[name], unsized_params[name]), name
