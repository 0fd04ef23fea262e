"""NonMonotonicTrigger in real Lightning runs: the rule (non-finite losses included), its state and logs,
averaged validation and checkpoints, resume mid-averaging, restarts, bad input word for word, the lifetime averages
with the sparsity callback, DDP."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, AvgLM, Kill, final_state, pattern_loader, run, seeded
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

import lightning_selfish.callbacks.trigger
from lightning_selfish.callbacks.trigger import RAW_STATE_DICT_KEY, NonMonotonicTrigger

try:
    from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
except ImportError:  # pragma: no cover - the core callback is developed alongside
    SelfishSparsityCallback = None


needs_sparsity = pytest.mark.skipif(
    SelfishSparsityCallback is None, reason="lightning_selfish.callbacks.sparsity not there"
)


class SkipSpy(Callback):
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.trainer = None

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer

    def skip_next_update(self) -> None:
        self.calls.append(self.trainer.current_epoch)


# --------------------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scripted", "fires_at"),
    [
        ([5, 4, 3, 2, 1, 3.5, 0], 5),  # 3.5 > min(5, 4, 3): the two latest values are left out
        ([5, 4, 3, 2, 1, 2.5, 0], None),  # 2.5 < 3
        ([1, 2, 2, 2, 2], 3),  # the earliest possible switch: epoch nonmono + 2, counting from 1
        ([1, 1, 1, 1, 1, 1], None),  # equal is not worse
        ([3, 2, 1, 1, 1, 1, 1.5], 6),
    ],
)
def test_fires_at_the_right_epoch(scripted, fires_at) -> None:
    """With a sanity check that logs -100: it would fire everything early if it entered the history."""
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=2)
    spy = SkipSpy()
    model = AvgLM(scripted=[float(v) for v in scripted])
    trainer = run(model, [trigger, spy], len(scripted), num_sanity_val_steps=1, limit_train_batches=1)
    opt = trainer.optimizers[0]
    assert trigger.averaging_started_epoch == fires_at
    assert opt.averaging == (fires_at is not None)
    assert spy.calls == ([] if fires_at is None else [fires_at])
    expected_history = scripted if fires_at is None else scripted[: fires_at + 1]  # frozen once averaging
    assert trigger.history == pytest.approx(expected_history)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_validation_loss_is_infinitely_bad(bad: float) -> None:
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    # 2, 1, then a diverged value: worse than min(2) (the latest value is left out), so averaging starts there
    trainer = run(AvgLM(scripted=[2.0, 1.0, bad, 0.5]), [trigger], 4, limit_train_batches=1)
    assert trigger.averaging_started_epoch == 2 and trainer.optimizers[0].averaging
    assert trigger.history == [2.0, 1.0, math.inf]


def test_start_epoch_is_logged(tmp_path: Path) -> None:
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    logger = CSVLogger(tmp_path, name="", version="")
    run(AvgLM(scripted=[2, 3, 4, 1]), [trigger], 4, logger=logger, limit_train_batches=1)
    (metrics,) = tmp_path.rglob("metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["nt_asgd/averaging_started_epoch"]) for r in rows if r.get("nt_asgd/averaging_started_epoch")]
    assert logged == [2.0] and trigger.averaging_started_epoch == 2


def test_start_is_logged_at_its_step(tmp_path: Path):
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    run(
        AvgLM(scripted=[2, 3, 4, 1]),
        [trigger],
        4,
        logger=CSVLogger(tmp_path, name="", version=""),
        limit_train_batches=2,
    )
    (metrics,) = tmp_path.rglob("metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("nt_asgd/averaging_started_epoch")]
    assert [(float(r["nt_asgd/averaging_started_epoch"]), int(r["step"])) for r in rows] == [(2.0, 6)]


def test_restart_epochs_do_nothing_before_averaging():
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1, restart_at_epochs=[2])
    run(AvgLM(scripted=[3, 2, 1, 0.5]), [trigger], 4, limit_train_batches=1)
    assert trigger.averaging_started_epoch is None and trigger.restarted_at_epochs == []
    assert trigger.history == [3, 2, 1, 0.5]  # not cleared

    restarting = NonMonotonicTrigger(monitor="val_score", nonmono=1, restart_at_epochs=[3])
    run(AvgLM(scripted=[2, 3, 4, 4]), [restarting], 4, limit_train_batches=1)
    assert restarting.restarted_at_epochs == [3]


# --------------------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------------------


def test_defaults_and_state_before_fitting():
    trigger = NonMonotonicTrigger()
    assert (trigger.monitor, trigger.nonmono, trigger.restart_at_epochs) == ("val_loss", 5, [])
    assert trigger.averaging is False
    assert NonMonotonicTrigger(restart_at_epochs=[1, 1]).restart_at_epochs == [1]  # epoch 1 is allowed


def test_state_dict_round_trip_and_older_checkpoints():
    trigger = NonMonotonicTrigger()
    trigger.load_state_dict({"history": [3, 2.5], "averaging_started_epoch": 2, "restarted_at_epochs": [4]})
    assert trigger.state_dict() == {"history": [3.0, 2.5], "averaging_started_epoch": 2, "restarted_at_epochs": [4]}
    trigger.load_state_dict({"history": [1.0], "averaging_started_epoch": None})  # saved before restarts existed
    assert trigger.restarted_at_epochs == []


# --------------------------------------------------------------------------------------------------------------
# averaged validation, checkpoints, resume
# --------------------------------------------------------------------------------------------------------------


class Recorder(Callback):
    """Weights seen by validation, and raw weights around it (put before the trigger in the callback list)."""

    def __init__(self) -> None:
        self.validated: list[tuple[bool, list[torch.Tensor], list[torch.Tensor], float]] = []
        self.raw_before: list[torch.Tensor] = []
        self.raw_restored = 0

    def on_validation_start(self, trainer, pl_module):
        self.raw_before = [p.detach().clone() for p in pl_module.parameters()]
        # not swapped yet (this callback runs before the trigger's hook): the optimizer's own averages
        self.averages_before = [a.clone() for a in trainer.optimizers[0].averaged_parameters()]

    def on_validation_epoch_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        weights = [p.detach().clone() for p in pl_module.parameters()]
        self.validated.append((opt.swapped, weights, self.averages_before, self.raw_before, pl_module.current_epoch))

    def on_train_epoch_end(self, trainer, pl_module):
        after = [p.detach() for p in pl_module.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(self.raw_before, after)), "raw weights not restored"
        self.raw_restored += 1


def validation_loss(model: AvgLM, loader: DataLoader) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for x, y in loader:
            model.hidden = None
            logits = model(x.t())
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.t().reshape(-1)))
    model.hidden = None
    return float(torch.stack(losses).mean())


def test_validation_and_best_checkpoint_use_the_averages(tmp_path: Path) -> None:
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    recorder = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, filename="{epoch}")
    model = AvgLM(lr=10.0, scripted=[2, 3, 4, 4, 4, 4, 4])
    trainer = run(model, [recorder, trigger, ckpt], 7, enable_checkpointing=True)
    assert trigger.averaging_started_epoch == 2
    assert recorder.raw_restored == 7
    for swapped, weights, averages, raw, epoch in recorder.validated:
        assert swapped == (epoch > 2)
        if swapped:  # validation saw exactly the averages kept before the swap, which differ from the raw weights
            assert all(torch.equal(w, a) for w, a in zip(weights, averages))
            assert not all(torch.equal(w, r) for w, r in zip(weights, raw))
        else:
            assert all(torch.equal(w, r) for w, r in zip(weights, raw))
    raw = [p.detach().clone() for p in model.parameters()]
    averages = [a.clone() for a in trainer.optimizers[0].averaged_parameters()]
    assert not all(torch.equal(r, a) for r, a in zip(raw, averages))

    # the logged val_loss of the last epoch is the averaged model's loss
    with trainer.optimizers[0].swap_averaged():
        averaged_loss = validation_loss(model, pattern_loader(1, windows=2))
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(averaged_loss, abs=1e-6)
    assert validation_loss(model, pattern_loader(1, windows=2)) != pytest.approx(averaged_loss, abs=1e-4)

    best = torch.load(ckpt.best_model_path, weights_only=False)
    assert best["epoch"] > 2, "the averaged model should be the best one on this learnable task"
    assert RAW_STATE_DICT_KEY in best and set(best[RAW_STATE_DICT_KEY]) == set(best["state_dict"])
    result = trainer.test(model, pattern_loader(1, windows=2), ckpt_path="best", verbose=False)
    assert result[0]["test_loss"] == pytest.approx(float(ckpt.best_model_score), abs=1e-6)


def test_validate_outside_fit_neither_swaps_nor_decides():
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    model = AvgLM(lr=2.0, scripted=[2, 3, 4, 4, 4])
    trainer = run(model, [trigger], 4, limit_train_batches=2)
    assert trigger.averaging_started_epoch == 2
    raw = [p.detach().clone() for p in model.parameters()]
    seen = []

    def record(*args, **kwargs):
        seen.append([p.detach().clone() for p in model.parameters()])

    model.on_validation_epoch_start = record
    trainer.validate(model, pattern_loader(1, windows=2), verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], raw))  # the raw weights: no swap outside fit

    fresh = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    fresh_model = AvgLM(scripted=[1.0] * 5)
    fresh_trainer = run(fresh_model, [fresh], 2, limit_train_batches=1)
    history = list(fresh.history)
    fresh_model.scripted = [9.0] * 5
    fresh_trainer.validate(fresh_model, pattern_loader(1, windows=2), verbose=False)
    assert fresh.history == history and not fresh_trainer.optimizers[0].averaging  # validate() decides nothing


class TiedAvgLM(AvgLM):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rnn = torch.nn.LSTM(12, 12, num_layers=2)
        self.decoder = torch.nn.Linear(12, self.encoder.num_embeddings)
        self.decoder.weight = self.encoder.weight


def test_checkpoints_hold_averages_only_once_averaging_and_under_every_tied_name(tmp_path: Path):
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = TiedAvgLM(lr=2.0, scripted=[2, 3, 4, 4])
    trainer = run(model, [trigger, ckpt], 4, enable_checkpointing=True, limit_train_batches=2)
    before = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    assert RAW_STATE_DICT_KEY not in before  # nothing averaged yet: the plain state dict
    last = torch.load(tmp_path / "epoch=3.ckpt", weights_only=False)
    state, raw = last["state_dict"], last[RAW_STATE_DICT_KEY]
    average = trainer.optimizers[0].state[model.encoder.weight]["ax"]
    assert torch.equal(state["encoder.weight"], average) and torch.equal(state["decoder.weight"], average)
    assert torch.equal(raw["decoder.weight"], model.encoder.weight.detach())


def assert_same_state(a, b) -> None:
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1]["param_groups"][0]["averaging"] == b[1]["param_groups"][0]["averaging"]
    assert a[1]["state"].keys() == b[1]["state"].keys()
    for index, state in a[1]["state"].items():
        for key, value in state.items():
            other = b[1]["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)


@pytest.mark.parametrize("sparse", [False, pytest.param(True, marks=needs_sparsity)])
def test_resume_mid_averaging_is_exact(tmp_path: Path, sparse: bool) -> None:
    scripted = [2, 3, 4, 4, 4, 4]

    def callbacks():
        cbs = [NonMonotonicTrigger(monitor="val_score", nonmono=1, restart_at_epochs=[5])]
        if sparse:
            cbs.insert(0, SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=1))
        return cbs

    full_model = seeded(lr=2.0, scripted=scripted)
    full_cbs = callbacks()
    full = final_state(full_model, run(full_model, full_cbs, 6))
    assert full_cbs[-1].restarted_at_epochs == [5]

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = seeded(lr=2.0, scripted=scripted)
    run(first, [*callbacks(), Kill(3), ckpt], 6, enable_checkpointing=True)
    saved = torch.load(tmp_path / "epoch=3.ckpt", weights_only=False)
    assert RAW_STATE_DICT_KEY in saved  # averaging since epoch 2: the state_dict holds the averages
    assert not all(torch.equal(saved["state_dict"][k], saved[RAW_STATE_DICT_KEY][k]) for k in saved["state_dict"])

    resumed_model = seeded(lr=7.0, scripted=scripted)  # weights and hyperparameters come from the checkpoint
    resumed_cbs = callbacks()
    resumed = final_state(resumed_model, run(resumed_model, resumed_cbs, 6, ckpt_path=tmp_path / "epoch=3.ckpt"))
    assert resumed_cbs[-1].averaging_started_epoch == 2 and resumed_cbs[-1].restarted_at_epochs == [5]
    assert_same_state(full, resumed)


def test_restart_at_epochs_restarts_the_averages(monkeypatch: pytest.MonkeyPatch) -> None:
    class Check(Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # after the trigger's hook (list order)
            if trainer.current_epoch == 4:
                opt = trainer.optimizers[0]
                for p, avg in zip(pl_module.parameters(), opt.averaged_parameters()):
                    assert torch.equal(p.detach(), avg)
                    assert opt.state[p]["n"] == 0

    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1, restart_at_epochs=[4, 100])
    said: list[str] = []  # what the trigger tells the user (rank_zero_info: Lightning's logger does not propagate)
    monkeypatch.setattr(lightning_selfish.callbacks.trigger, "rank_zero_info", said.append)
    run(AvgLM(scripted=[2, 3, 4, 4, 4, 4]), [trigger, Check()], 6, limit_train_batches=2)
    assert trigger.averaging_started_epoch == 2
    assert trigger.restarted_at_epochs == [4] and trigger.history == []  # cleared by the restart
    assert said == [
        "NonMonotonicTrigger: val_score stopped improving at the end of epoch 2 (counting from 0): "
        "averaging starts now",
        "NonMonotonicTrigger: averaging restarted after epoch 4",
    ]


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------


def test_needs_sntasgd() -> None:
    with pytest.raises(TypeError, match="needs an SNTASGD optimizer .* found: SGD"):
        run(AvgLM(optimizer="sgd"), [NonMonotonicTrigger()], 1)


def test_monitored_metric_must_be_logged() -> None:
    with pytest.raises(ValueError, match=r"'val_los' was not logged in validation; logged metrics: \[.*'val_loss'"):
        run(AvgLM(), [NonMonotonicTrigger(monitor="val_los")], 1, num_sanity_val_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nonmono": 0}, ValueError, "nonmono must be an int >= 1, got 0"),
        ({"nonmono": 2.5}, TypeError, "nonmono must be an int >= 1, got 2.5"),
        ({"restart_at_epochs": [0]}, ValueError, "restart_at_epochs must be a list of epoch numbers >= 1"),
        ({"monitor": ""}, ValueError, "monitor must be a metric name"),
        ({"monitor": None}, TypeError, "monitor must be a metric name"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match) as info:
        NonMonotonicTrigger(**kwargs)
    assert type(info.value) is error  # the documented type, not a subclass or the other one


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(monitor=3), TypeError, r"monitor must be a metric name \(non-empty str\), got 3"),
        (dict(monitor=""), ValueError, r"monitor must be a metric name \(non-empty str\), got ''"),
        (dict(nonmono=2.5), TypeError, "nonmono must be an int >= 1, got 2.5"),
        (dict(nonmono=True), TypeError, "nonmono must be an int >= 1, got True"),
        (dict(nonmono=0), ValueError, "nonmono must be an int >= 1, got 0"),
        (dict(restart_at_epochs="500"), TypeError, r"restart_at_epochs must be a list of epoch numbers >= 1"),
        (dict(restart_at_epochs=500), TypeError, r"restart_at_epochs must be a list of epoch numbers >= 1.*got 500"),
        (dict(restart_at_epochs=[500, 0]), ValueError, r"restart_at_epochs must be a list of epoch numbers >= 1"),
        (dict(restart_at_epochs=[1.5]), TypeError, r"restart_at_epochs must be .*got \[1.5\]"),
        (dict(restart_at_epochs=[500, True]), TypeError, r"restart_at_epochs must be .*got \[500, True\]"),
    ],
)
def test_trigger_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NonMonotonicTrigger(**kwargs)


def test_messages_in_full():
    prefix = re.escape("NonMonotonicTrigger: restart_at_epochs must be a list of epoch numbers >= 1 (completed epochs)")
    for bad, error in (("5", TypeError), ([0], ValueError)):
        with pytest.raises(error, match=f"^{prefix}, got {re.escape(repr(bad))}$"):
            NonMonotonicTrigger(restart_at_epochs=bad)

    class TwoOptimizers(AvgLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0), torch.optim.Adam(self.parameters())

    with pytest.raises(TypeError, match=re.escape("from configure_optimizers), found: SGD, Adam")):
        run(TwoOptimizers(), [NonMonotonicTrigger()], 1, gradient_clip_val=None)

    with pytest.raises(ValueError, match=re.escape("in validation_step or on_validation_epoch_end, or pass the right")):
        run(AvgLM(), [NonMonotonicTrigger(monitor="val_los")], 1)


# --------------------------------------------------------------------------------------------------------------
# with the sparsity callback
# --------------------------------------------------------------------------------------------------------------


class LifetimeReference(Callback):
    """Eq. 5 by definition in a real run, independent of what the engine tells the optimizer.

    Per element, the list of its weights at every averaged step of its current life. Which elements start a new
    life at a topology update is recomputed here from the weights and masks before it (magnitude removal by a plain
    sort, ``ceil(rate * active)`` per tensor), not taken from the engine's ``on_mask_update`` calls.
    """

    def __init__(self, sparsity_cb, trigger) -> None:
        self.cb, self.trigger = sparsity_cb, trigger
        self.history: dict[int, list[list[float]]] = {}
        self.params: list[torch.Tensor] = []
        self.names: list[str] = []
        self.averaging_steps = 0
        self.last: tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self.regrown = 0

    def on_fit_start(self, trainer, pl_module):
        named = list(pl_module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.history = {i: [[] for _ in range(p.numel())] for i, p in enumerate(self.params)}

    def on_train_epoch_start(self, trainer, pl_module):  # after the sparsity callback's update (list order)
        if self.last is None:
            return
        step, weights, masks = self.last
        if self.trigger.averaging_started_epoch == trainer.current_epoch - 1:
            return  # the update of the switching epoch is skipped (the authors' rule)
        rate = self.cb.current_prune_rate(step)
        for i, name in enumerate(self.names):
            if name not in masks:
                continue
            old, w = masks[name].flatten(), weights[name].flatten()
            active = old.nonzero().squeeze(1)
            n = math.ceil(rate * active.numel() - 1e-9)
            order = torch.argsort(w.abs()[active])
            assert n == 0 or n == active.numel() or w.abs()[active][order[n - 1]] < w.abs()[active][order[n]]
            kept = old.clone()
            kept[active[order[:n]]] = False
            self.regrown += int((old & ~kept & self.cb.masks[name].flatten()).sum())
            for e in (~kept).nonzero().squeeze(1).tolist():
                self.history[i][e].clear()

    def on_train_batch_end(self, trainer, pl_module, *args):
        masks = {name: m.clone() for name, m in self.cb.masks.items()}
        self.last = (trainer.global_step, {n: p.detach().clone() for n, p in zip(self.names, self.params)}, masks)
        if not trainer.optimizers[0].averaging:  # nothing recorded before the trigger
            return
        self.averaging_steps += 1
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            alive = masks[name].flatten().tolist() if name in masks else [True] * p.numel()
            for e, (value, a) in enumerate(zip(p.detach().flatten().tolist(), alive)):
                if a:
                    self.history[i][e].append(value)

    def expected(self, i: int) -> torch.Tensor:
        p, name = self.params[i], self.names[i]
        alive = self.cb.masks[name].flatten().tolist() if name in self.cb.masks else [True] * p.numel()
        values = [sum(h) / len(h) if a and h else 0.0 for h, a in zip(self.history[i], alive)]
        return torch.tensor(values).reshape(p.shape)


@needs_sparsity
def test_lifetime_averages_with_the_sparsity_callback() -> None:
    # the embedding stays dense: its rows for absent tokens tie in |w|, which would make removal ambiguous
    sparsity = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=2, exclude=["encoder.*"])
    trigger = NonMonotonicTrigger(monitor="val_score", nonmono=1)
    reference = LifetimeReference(sparsity, trigger)
    model = AvgLM(lr=2.0, scripted=[2, 3, 4, 4, 4])
    trainer = run(model, [sparsity, trigger, reference], 5, limit_train_batches=3)
    opt = trainer.optimizers[0]
    assert trigger.averaging_started_epoch == 2 and reference.averaging_steps == 6
    assert reference.regrown > 0  # removed and regrown in the same update: a new life that keeps its place
    params = dict(model.named_parameters())
    assert len(sparsity.masks) == 5  # every weight matrix but the embedding is sparsified
    for i, (name, avg) in enumerate(zip(reference.names, opt.averaged_parameters())):
        torch.testing.assert_close(avg, reference.expected(i), rtol=0, atol=1e-6)
        if name in sparsity.masks:
            mask = sparsity.masks[name]
            assert (avg[~mask] == 0).all()
            assert (opt.state[params[name]]["age"][~mask] == 0).all()
    with opt.swap_averaged():  # the averaged model has exactly the current topology
        for name, mask in sparsity.masks.items():
            assert (params[name][~mask] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------------------


@needs_sparsity
@pytest.mark.subprocess
def test_ddp_two_processes_keep_identical_averages(tmp_path: Path) -> None:
    script = Path(__file__).parent / "ddp_scripts" / "sntasgd_ddp.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["averaging_started_epoch"] == ranks[1]["averaging_started_epoch"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["averages"]) == len(ranks[0]["params"]) > 0
    for key in ("params", "averages", "ages", "masks"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), key
    assert any(not torch.equal(a, p) for a, p in zip(ranks[0]["averages"], ranks[0]["params"]))
