"""The guarantees a long GPU run relies on, each in a real Lightning fit and each checked against an independent
reference (not against what the library reports about itself):

* a weight removed and regrown in the same update restarts at exactly 0, with its optimizer state (SGD momentum,
  both Adam moments) at exactly 0;
* gradient growth and momentum growth pick the inactive positions with the largest |gradient| / |momentum|;
* resuming exactly at the epoch where NT-ASGD switched on equals the uninterrupted run (the skipped update);
* a non-finite validation loss counts as infinitely bad for the NT-ASGD trigger;
* a run killed for real (SIGKILL, mid-epoch) and resumed from its last checkpoint equals the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import AvgLM, Kill, TinyLM, final_state, make_trainer, run, seeded, token_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

import lightning_selfish.callback
from lightning_selfish import NonMonotonicTrigger, SelfishSparsityCallback

SCRIPTS = Path(__file__).parent / "scripts"


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


# --------------------------------------------------------------------------------------------------------------
# NT-ASGD: the switching epoch, non-finite losses
# --------------------------------------------------------------------------------------------------------------


def snt_callbacks() -> list[Callback]:
    return [
        SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=1),
        NonMonotonicTrigger(monitor="val_score", nonmono=1),
    ]


def test_resume_at_the_switching_epoch_is_exact(tmp_path: Path) -> None:
    """Averaging starts at the end of epoch 2, which also skips the topology update due as epoch 3 starts. A
    checkpoint of that epoch must carry the pending skip, or the resumed run updates where the full run did not."""
    scripted = [2, 3, 4, 4, 4, 4]
    full_model = seeded(lr=2.0, scripted=scripted)
    full_cbs = snt_callbacks()
    full = final_state(full_model, run(full_model, full_cbs, 5))
    assert full_cbs[1].averaging_started_epoch == 2 and full_cbs[0].num_updates == 3  # 4 epoch starts, 1 skipped

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    run(seeded(lr=2.0, scripted=scripted), [*snt_callbacks(), Kill(2), ckpt], 5, enable_checkpointing=True)
    saved = torch.load(tmp_path / "epoch=2.ckpt", weights_only=False)
    assert saved["callbacks"]["SelfishSparsityCallback"]["skip_next_update"] is True

    resumed_model = AvgLM(lr=2.0, scripted=scripted)
    resumed_cbs = snt_callbacks()
    resumed = final_state(resumed_model, run(resumed_model, resumed_cbs, 5, ckpt_path=tmp_path / "epoch=2.ckpt"))
    for name, mask in full_cbs[0].masks.items():
        assert torch.equal(mask, resumed_cbs[0].masks[name]), name
    for a, b in zip(full[0], resumed[0]):
        assert torch.equal(a, b)
    for index, state in full[1]["state"].items():
        for key, value in state.items():
            other = resumed[1]["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)
    assert resumed_cbs[0].num_updates == full_cbs[0].num_updates


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_validation_loss_is_infinitely_bad(bad: float) -> None:
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    # 2, 1, then a diverged value: worse than min(2) (the latest value is left out), so averaging starts there
    trainer = run(AvgLM(scripted=[2.0, 1.0, bad, 0.5]), [trigger], 4, limit_train_batches=1)
    assert trigger.averaging_started_epoch == 2 and trainer.optimizers[0].averaging
    assert trigger.history == [2.0, 1.0, math.inf]


# --------------------------------------------------------------------------------------------------------------
# a run killed for real
# --------------------------------------------------------------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "killable_fit.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.subprocess
def test_a_killed_run_resumes_exactly_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL in the middle of epoch 4 (no hook runs, nothing is flushed), then fit(ckpt_path=last.ckpt)."""
    full = run_script("full", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_script("kill", str(tmp_path / "killed"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "final.pt").exists()
    last = tmp_path / "killed" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 3  # written at the end of epoch 3
    resumed = run_script("resume", str(tmp_path / "resumed"), str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(tmp_path / "full" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=False)
    assert a["averaging_started_epoch"] == b["averaging_started_epoch"] == 2
    assert a["num_updates"] == b["num_updates"]
    for key in ("params", "masks"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            other = b["optimizer"]["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


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


def test_verbose_summary_per_tensor_and_gate(monkeypatch):
    said: list[str] = []  # (rank_zero_info: Lightning's logger does not propagate to caplog)
    monkeypatch.setattr(lightning_selfish.callback, "rank_zero_info", said.append)
    sparsity = SelfishSparsityCallback(sparsity=0.5, seed=0, verbose=True, update_every=4)
    pl.seed_everything(0, verbose=False)
    make_trainer([sparsity], max_epochs=1).fit(TinyLM(), token_loader(), token_loader(1, 2))
    summaries = [text for text in said if text.startswith("topology update")]
    assert len(summaries) == 1  # at step 4 of 8 (never on the last step)
    lines = summaries[0].split("\n")
    header = re.fullmatch(
        r"topology update 1: prune rate (0\.\d{4}), removed (\d+), grown (\d+), overall sparsity (0\.\d{4})", lines[0]
    )
    assert header and header[2] == header[3] and float(header[4]) == pytest.approx(0.5, abs=1e-3)
    assert len(lines) == 1 + len(sparsity.masks)
    by_name = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert re.fullmatch(
        r"  rnn.weight_hh_l0: sparsity 0\.\d{4}, changed 0\.\d{3} "
        r"\| gates: i 0\.\d{3}, f 0\.\d{3}, g 0\.\d{3}, o 0\.\d{3}",
        by_name["rnn.weight_hh_l0"],
    )
    assert re.fullmatch(r"  decoder.weight: sparsity 0\.5000, changed 0\.\d{3}", by_name["decoder.weight"])


def test_gradient_growth_resumes_exactly_from_an_epoch_checkpoint(tmp_path: Path):
    """The dense gradient for the next update is captured at the last step of an epoch, before the checkpoint that
    precedes the update: the checkpoint carries it, so the resumed update is the uninterrupted one."""

    def callback():
        return SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0, growth="gradient")

    def fit(cb, extra=(), ckpt_path=None, **kwargs):
        pl.seed_everything(0, verbose=False)
        model = TinyLM()
        make_trainer([cb, *extra], max_epochs=3, **kwargs).fit(
            model, token_loader(), token_loader(1, 2), ckpt_path=ckpt_path
        )
        return model

    full_cb = callback()
    full = fit(full_cb)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = callback()
    fit(first, extra=[ckpt, Kill(0)], enable_checkpointing=True)
    state = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["callbacks"]["SelfishSparsityCallback"]
    assert set(state) == {
        "masks",
        "generator",
        "generator_device",
        "seed",
        "growth_seed",
        "update_every",
        "parts",
        "num_updates",
        "last_update_step",
        "last_updated_epoch",
        "gradients",
        "skip_next_update",
        "total_steps",
        "sparsity",
        "gate_redistribution",
        "method",
        "threshold",
    }
    assert state["gradients"] is not None and state["total_steps"] == 24 and state["gate_redistribution"] == "joint"
    resumed_cb = callback()
    resumed = fit(resumed_cb, ckpt_path=tmp_path / "epoch=0.ckpt")
    for name, mask in full_cb.masks.items():
        assert torch.equal(mask, resumed_cb.masks[name]), name
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
