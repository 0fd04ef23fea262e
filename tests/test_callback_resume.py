"""The callback's checkpoints and exact resumes: mid-run after an epoch or right after a step update, per gate,
with a gradient copy pending, at the NT-ASGD switching epoch, killed for real by SIGKILL, from checkpoints older than
today's keys; and checkpoints or state dicts that do not fit, refused with a message that says why."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    AvgLM,
    Kill,
    StepChecker,
    TinyLM,
    Topology,
    assert_same,
    final_state,
    fit_checked,
    fit_tiny,
    make_trainer,
    run,
    seeded,
    snapshot,
    token_loader,
)
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lightning_selfish import NonMonotonicTrigger, SelfishSparsityCallback

# --------------------------------------------------------------------------------------------------------------
# resuming exactly
# --------------------------------------------------------------------------------------------------------------


def masks_and_weights(model, cb):
    return {n: m.clone() for n, m in cb.masks.items()}, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpoint_resume_is_exact(tmp_path: Path):
    full_cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3)
    full_model, _, _ = fit_checked(full_cb, max_epochs=4)
    full = masks_and_weights(full_model, full_cb)

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first_cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3)

    class Kill(Callback):  # the run is interrupted after its second epoch, with its 4-epoch schedule
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    fit_checked(first_cb, max_epochs=4, extra=[Kill(), ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["callbacks"]["SelfishSparsityCallback"]
    assert set(state) >= {"masks", "generator", "num_updates", "last_update_step"} and state["num_updates"] == 1
    assert state["last_updated_epoch"] == 0  # epoch 1's update runs as epoch 2 starts, after this checkpoint

    resumed_cb = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=999)  # the seed comes from the checkpoint
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    trainer = make_trainer([resumed_cb, StepChecker(resumed_cb)], max_epochs=4)
    trainer.fit(model, token_loader(), token_loader(1, 2), ckpt_path=tmp_path / "epoch=1.ckpt")
    resumed = masks_and_weights(model, resumed_cb)
    for name in full[0]:
        assert torch.equal(full[0][name], resumed[0][name]), name
    for name in full[1]:
        assert torch.equal(full[1][name], resumed[1][name]), name


def checkpoint_after_one_epoch(tmp_path: Path, **kwargs) -> tuple[Path, tuple[dict, dict]]:
    """A 2-epoch run (the reference) and the checkpoint its twin wrote after epoch 0."""
    full = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3, **kwargs)
    full_model, _ = fit_tiny(full, max_epochs=3)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3, **kwargs)
    fit_tiny(first, StopAfterFirstEpoch(), saver, max_epochs=3, enable_checkpointing=True)
    return tmp_path / "epoch=0.ckpt", snapshot(full_model, full)


def resume(path: Path, callback: SelfishSparsityCallback, max_epochs: int = 3) -> TinyLM:
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    make_trainer([callback], max_epochs=max_epochs).fit(model, token_loader(), token_loader(1, 2), ckpt_path=path)
    return model


@pytest.mark.parametrize("gate_redistribution", [False, "magnitude"])
def test_per_gate_runs_resume_exactly(tmp_path: Path, gate_redistribution) -> None:
    """The restored engine keeps the gate layouts and the gate handling (per-gate ranking differs from joint)."""
    path, expected = checkpoint_after_one_epoch(tmp_path, gate_redistribution=gate_redistribution)
    callback = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3, gate_redistribution=gate_redistribution)
    model = resume(path, callback)
    assert_same(snapshot(model, callback), expected)


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


def test_a_resume_right_after_a_step_update_does_not_repeat_it(tmp_path: Path) -> None:
    """A mid-epoch checkpoint written at the step of an update, with accumulation: the resumed run's next batch ends
    at the same global step, and must not update again."""
    full = SelfishSparsityCallback(sparsity=0.6, update_every=2, seed=0)
    fit_tiny(full, accumulate_grad_batches=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    fit_tiny(
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
        "draws",
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


def test_running_gradient_copy_resumes_exactly(tmp_path):
    """Epoch updates over an unsized loader: the last step's gradient copy travels in the checkpoint."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_loader().dataset

    def loader():
        return torch.utils.data.DataLoader(Unsized(), batch_size=4)

    def callback():
        return SelfishSparsityCallback(sparsity=0.6, method="rigl", update_every="epoch", total_steps=32, seed=1)

    class Kill(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    pl.seed_everything(0, verbose=False)
    full, full_model = callback(), TinyLM()
    make_trainer([full], max_epochs=4).fit(full_model, loader())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    pl.seed_everything(0, verbose=False)
    make_trainer([callback(), Kill(), ckpt], max_epochs=4, enable_checkpointing=True).fit(TinyLM(), loader())
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["callbacks"]["SelfishSparsityCallback"]
    assert set(state["gradients"]) == set(full.masks)  # the running copy is in the checkpoint
    pl.seed_everything(0, verbose=False)
    resumed, model = callback(), TinyLM()
    make_trainer([resumed], max_epochs=4).fit(model, loader(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert resumed.num_updates == full.num_updates == 2  # steps 8 and 16; step 24 is past 75 % of 32
    for name in full.masks:
        assert torch.equal(full.masks[name], resumed.masks[name]), name
    full_params = dict(full_model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, full_params[name]), name


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


# --------------------------------------------------------------------------------------------------------------
# a run killed for real
# --------------------------------------------------------------------------------------------------------------


SCRIPTS = Path(__file__).parent / "scripts"


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


# --------------------------------------------------------------------------------------------------------------
# what does not fit
# --------------------------------------------------------------------------------------------------------------


def test_resume_with_mismatched_masks_fails(tmp_path: Path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit_checked(SelfishSparsityCallback(sparsity=0.6, seed=0), max_epochs=1, extra=[ckpt], enable_checkpointing=True)
    path = tmp_path / "last.ckpt"
    cb = SelfishSparsityCallback(sparsity=0.6, seed=0, exclude=["decoder.*"])
    with pytest.raises(ValueError, match=r"only in the checkpoint: \['decoder.weight'\]"):
        make_trainer([cb], max_epochs=2).fit(TinyLM(), token_loader(), ckpt_path=path)
    with pytest.raises(ValueError, match="sparsity=0.6.*sparsity=0.5"):
        make_trainer([SelfishSparsityCallback(sparsity=0.5)], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=path
        )
    dense = tmp_path / "dense"
    make_trainer([], max_epochs=1, enable_checkpointing=True, default_root_dir=dense).fit(TinyLM(), token_loader())
    with pytest.raises(ValueError, match="holds no SelfishSparsityCallback state"):
        make_trainer([SelfishSparsityCallback(sparsity=0.6)], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=next(dense.rglob("*.ckpt"))
        )


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


def test_checkpoint_mask_of_another_shape(tmp_path: Path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = make_trainer(
        [SelfishSparsityCallback(sparsity=0.5, seed=0), ckpt], max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(TinyLM(), token_loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["SelfishSparsityCallback"]
    state["masks"]["decoder.weight"] = state["masks"]["decoder.weight"].t().contiguous()
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(
        ValueError, match=r"mask for 'decoder.weight' has shape \(16, 40\), the parameter has \(40, 16\)"
    ):
        make_trainer([SelfishSparsityCallback(sparsity=0.5)], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=tmp_path / "bad.ckpt"
        )


def test_a_state_dict_needs_both_masks_and_generator() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5)
    for keys in (["masks"], ["generator"]):
        with pytest.raises(ValueError, match=re.escape(f"expected keys 'masks' and 'generator', got {keys}")):
            callback.load_state_dict(dict.fromkeys(keys))


def test_load_state_dict_of_something_else():
    with pytest.raises(ValueError, match=r"expected keys 'masks' and 'generator', got \['history'\]"):
        SelfishSparsityCallback(sparsity=0.5).load_state_dict({"history": []})
