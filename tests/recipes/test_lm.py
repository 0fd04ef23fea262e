"""LanguageModel: hidden state, loss, perplexity, lr scaling, clipping, optimizers and the callbacks it brings."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_selfish.callbacks.flops import FlopsCallback
from lightning_selfish.callbacks.random_state import RandomStateCheckpoint
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.callbacks.trigger import NonMonotonicTrigger
from lightning_selfish.core.optim_state import MaskUpdate
from lightning_selfish.optim.sntasgd import SNTASGD
from lightning_selfish_recipes.data import BPTTBatch, LanguageModelingDataModule
from lightning_selfish_recipes.lm import (
    SPARSITY_ARGUMENTS,
    LanguageModel,
    MaskBlindNTASGD,
    SparsityArguments,
    detach_hidden,
)
from lightning_selfish_recipes.models import ONLSTM, LMOutput, StackedLSTM

V = 12


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny corpus of V-2 word types with a strong bigram structure (learnable in a few steps)."""
    directory = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for split, lines in (("train", 60), ("valid", 12), ("test", 12)):
        text = []
        for _ in range(lines):
            w = int(torch.randint(0, V - 2, (1,), generator=g))
            words = []
            for _ in range(int(torch.randint(4, 9, (1,), generator=g))):
                words.append(f"w{w}")
                w = (3 * w + 1) % (V - 2)
            text.append(" ".join(words))
        (directory / f"{split}.txt").write_text("\n".join(text) + "\n")
    return directory


def datamodule(corpus_dir: Path, **kwargs) -> LanguageModelingDataModule:
    defaults = dict(batch_size=4, eval_batch_size=3, test_batch_size=2, bptt=6)
    defaults.update(kwargs)
    return LanguageModelingDataModule("tiny", data_dir=str(corpus_dir), **defaults)


def tiny_lstm(ntoken: int = V, **kwargs) -> StackedLSTM:
    return StackedLSTM(ntoken=ntoken, ninp=8, nhid=8, nlayers=2, **{"dropout": 0.0, **kwargs})


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class Recorder(nn.Module):
    """Wraps a network and records, per call, the mode and the hidden state it was given."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.inner = network
        self.calls: list[tuple[bool, list[Tensor], list[Tensor]]] = []

    def init_hidden(self, batch_size: int):
        return self.inner.init_hidden(batch_size)

    def forward(self, input: Tensor, hidden) -> LMOutput:
        out = self.inner(input, hidden)
        self.calls.append((self.training, _flat(hidden), [t.detach().clone() for t in _flat(out.hidden)]))
        return out


def _flat(hidden) -> list[Tensor]:
    if isinstance(hidden, Tensor):
        return [hidden]
    return [t for h in hidden for t in _flat(h)]


# --------------------------------------------------------------------------------------------- hidden state


def test_hidden_state_is_carried_detached_and_reset(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir)
    net = Recorder(tiny_lstm(dm.vocab_size))
    lm = LanguageModel(net, lr=1.0, bptt=6, optimizer="sgd", checkpoint=False)
    trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2).fit(lm, datamodule=dm)

    train = [c for c in net.calls if c[0]]
    evals = [c for c in net.calls if not c[0]]
    assert len(train) == 6 and len(evals) == 4
    for epoch in range(2):
        first, *rest = train[3 * epoch : 3 * epoch + 3]
        assert all(not t.any() for t in first[1]), "each training epoch starts from a zero state"
        previous = first
        for call in rest:
            for given, returned in zip(call[1], previous[2]):
                assert not given.requires_grad, "the carried state is detached (truncated BPTT)"
                assert torch.equal(given, returned), "the state is carried from the previous window"
            previous = call
    for k in (0, 2):  # each validation pass starts from zeros at its own batch size and carries within the pass
        assert all(not t.any() for t in evals[k][1]) and evals[k][1][0].size(1) == 3
        assert all(torch.equal(g, r) for g, r in zip(evals[k + 1][1], evals[k][2]))


def test_validation_in_the_middle_of_an_epoch_keeps_the_training_state(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir)
    net = Recorder(tiny_lstm(dm.vocab_size))
    lm = LanguageModel(net, lr=1.0, bptt=6, optimizer="sgd", checkpoint=False)
    trainer(limit_train_batches=4, limit_val_batches=1, val_check_interval=2).fit(lm, datamodule=dm)
    modes = [c[0] for c in net.calls]
    assert modes == [True, True, False, True, True, False]
    third, second = net.calls[3], net.calls[1]
    assert all(torch.equal(g, r) for g, r in zip(third[1], second[2]))


def test_detach_hidden_nested() -> None:
    x = torch.ones(2, requires_grad=True) * 2
    out = detach_hidden([(x, x), x])
    assert isinstance(out, list) and isinstance(out[0], tuple)
    assert not any(t.requires_grad for t in _flat(out))


# ------------------------------------------------------------------------------------------- loss and metrics


class FixedLogProbs(nn.Module):
    """A 'network' whose prediction for every token is the same known distribution."""

    def __init__(self, probs: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(probs.log())
        self.alpha = self.beta = 0.0

    def init_hidden(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size)

    def forward(self, input: Tensor, hidden: Tensor) -> LMOutput:
        log_probs = F.log_softmax(self.logits, -1).expand(input.numel(), -1)
        return LMOutput(log_probs, hidden, None, None)


def test_perplexity_is_exp_of_the_token_weighted_mean_over_the_split() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    lm = LanguageModel(FixedLogProbs(probs), lr=1.0, optimizer="sgd", checkpoint=False)
    # Windows of 3, 3 and 1 steps over 2 columns: the short last window must weigh 1/7, not 1/3.
    targets = [torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 1, 1, 1]), torch.tensor([3, 3])]
    batches = [BPTTBatch(torch.zeros(len(t) // 2, 2, dtype=torch.long), t, len(t) // 2) for t in targets]
    loader = DataLoader(batches, batch_size=None)
    metrics = trainer().validate(lm, dataloaders=loader, verbose=False)[0]
    nll = -torch.log(probs)
    expected = (6 * nll[0] + 6 * nll[1] + 2 * nll[3]) / 14
    window_mean = (nll[0] + nll[1] + nll[3]) / 3
    assert metrics["val_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert metrics["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert abs(metrics["val_loss"] - float(window_mean)) > 0.1
    test_metrics = trainer().test(lm, dataloaders=loader, verbose=False)[0]
    assert test_metrics["test_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_training_loss_adds_ar_and_tar_with_the_networks_coefficients() -> None:
    torch.manual_seed(0)
    net = ONLSTM(ntoken=V, ninp=10, nhid=10, nlayers=2, chunk_size=5, alpha=2.0, beta=1.0)
    lm = LanguageModel(net, lr=1.0, optimizer="sgd")
    net.eval()  # no dropout: the same forward twice
    input, target = torch.randint(0, V, (5, 3)), torch.randint(0, V, (15,))
    loss = lm.training_step(BPTTBatch(input, target, 5), 0)
    out = net(input, net.init_hidden(3))
    expected = (
        F.nll_loss(out.log_probs, target)
        + 2.0 * out.ar.pow(2).mean()
        + 1.0 * (out.tar[1:] - out.tar[:-1]).pow(2).mean()
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert lm.regularization(None, None) is None
    assert LanguageModel(tiny_lstm(), lr=1.0).regularization(out.ar, out.tar) is None  # alpha = beta = 0


# ---------------------------------------------------------------------------------------- the optimizer step


class StepLog(Callback):
    """Records, at every optimizer step, the lr the step ran with and the lr left afterwards."""

    def __init__(self) -> None:
        self.during: list[float] = []
        self.after: list[float] = []
        self.seq_lens: list[int] = []
        self.grad_norms: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]

        def hook(opt, args, kwargs) -> None:  # after the step: gradients are still there
            self.during.append(opt.param_groups[0]["lr"])
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        optimizer.register_step_post_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seq_lens.append(batch.seq_len)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_variable_bptt_scales_the_lr_for_one_step_and_restores_it(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir, bptt=6, variable_bptt=True, seed=3)
    lm = LanguageModel(tiny_lstm(dm.vocab_size), lr=2.0, bptt=6, optimizer="sntasgd", checkpoint=False)
    log = StepLog()
    trainer(max_steps=12, callbacks=[log]).fit(lm, datamodule=dm)
    assert len(log.during) == 12
    assert len(set(log.seq_lens)) > 1, "the draws should give several window lengths"
    assert log.during == pytest.approx([2.0 * s / 6 for s in log.seq_lens])
    assert log.after == [2.0] * 12


def test_the_dense_gradient_is_clipped_before_the_step(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir)
    lm = LanguageModel(
        tiny_lstm(dm.vocab_size), lr=1.0, bptt=6, clip=0.01, sparsity={"sparsity": 0.5}, checkpoint=False
    )
    log = StepLog()
    trainer(max_steps=5, callbacks=[log]).fit(lm, datamodule=dm)
    # The global norm over all gradients, masked positions included, is at the clip value at the step.
    assert log.grad_norms == pytest.approx([0.01] * 5, rel=1e-4)
    masks = lm._sparsity_callback.masks
    weight = lm.network.rnn.weight_hh_l0
    assert (weight.grad[~masks["network.rnn.weight_hh_l0"]] != 0).any(), "masked positions keep their gradient"
    assert (weight[~masks["network.rnn.weight_hh_l0"]] == 0).all(), "and are re-zeroed after the step"


def test_trainer_gradient_clip_val_takes_precedence(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir)
    lm = LanguageModel(tiny_lstm(dm.vocab_size), lr=1.0, bptt=6, clip=0.01, checkpoint=False)
    log = StepLog()
    trainer(max_steps=3, callbacks=[log], gradient_clip_val=0.02).fit(lm, datamodule=dm)
    assert log.grad_norms == pytest.approx([0.02] * 3, rel=1e-4)


# ---------------------------------------------------------------------------------- optimizers and callbacks


@pytest.mark.parametrize(
    "name, cls",
    [("sntasgd", SNTASGD), ("ntasgd", MaskBlindNTASGD), ("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD)],
)
def test_configure_optimizers(name: str, cls: type) -> None:
    lm = LanguageModel(tiny_lstm(), lr=3.0, optimizer=name)
    config = lm.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 3.0 and group["weight_decay"] == 1.2e-6
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in lm.network.parameters())
    if name == "momentum":
        assert group["momentum"] == 0.9
        scheduler = config["lr_scheduler"]["scheduler"]
        assert scheduler.factor == pytest.approx(1 / 1.33) and scheduler.patience == 1
        assert config["lr_scheduler"]["monitor"] == "val_loss"


def test_adam_follows_the_awd_code_and_table_4() -> None:
    config = LanguageModel(tiny_lstm(), lr=1e-3, optimizer="adam").configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.0, 0.999) and group["eps"] == 1e-9 and group["lr"] == 1e-3
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.factor, scheduler.patience, scheduler.threshold, scheduler.mode) == (0.5, 2, 0.0, "min")


def test_plateau_drop_happens_on_val_loss(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir)
    lm = LanguageModel(
        tiny_lstm(dm.vocab_size), lr=5.0, bptt=6, optimizer="momentum", plateau_patience=0, checkpoint=False
    )
    # lr 5 with momentum diverges on purpose: validation gets worse and the lr is divided by 1.33 each epoch.
    t = trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=2)
    t.fit(lm, datamodule=dm)
    assert t.optimizers[0].param_groups[0]["lr"] < 5.0


def test_callbacks_follow_the_arguments() -> None:
    net = tiny_lstm()
    net.sparsity_exclude = ["decoder.weight"]
    lm = LanguageModel(
        net,
        lr=1.0,
        sparsity={"sparsity": 0.6, "prune_rate": 0.3, "gate_redistribution": False, "init": "er", "seed": 7},
        nonmono=3,
        restart_at_epochs=[4],
    )
    callbacks = {type(cb): cb for cb in lm.configure_callbacks()}
    sparse = callbacks[SelfishSparsityCallback]
    assert (sparse.sparsity, sparse.prune_rate, sparse.gate_redistribution.name, sparse.init.name, sparse.seed) == (
        0.6,
        0.3,
        "none",  # gate_redistribution=False resolves to "none" (per-gate counts)
        "er",
        7,
    )
    assert sparse.exclude == ["network.decoder.weight"]  # the network's names, seen from the LightningModule
    trigger = callbacks[NonMonotonicTrigger]
    assert (trigger.monitor, trigger.nonmono, trigger.restart_at_epochs) == ("val_loss", 3, [4])
    best, latest = (cb for cb in lm.configure_callbacks() if isinstance(cb, ModelCheckpoint))  # (test_checkpoint_last)
    assert (best.monitor, best.mode, latest.monitor, latest.filename) == ("val_loss", "min", None, "last")

    dense = LanguageModel(tiny_lstm(), lr=1.0, optimizer="adam", checkpoint=False)
    assert [type(cb) for cb in dense.configure_callbacks()] == [FlopsCallback, RandomStateCheckpoint]
    no_flops = LanguageModel(tiny_lstm(), lr=1.0, optimizer="adam", checkpoint=False, flops=False)
    assert [type(cb) for cb in no_flops.configure_callbacks()] == [RandomStateCheckpoint]


def sparsity_callback(**group) -> SelfishSparsityCallback:
    lm = LanguageModel(tiny_lstm(), lr=1.0, sparsity=group, checkpoint=False)
    return next(cb for cb in lm.configure_callbacks() if isinstance(cb, SelfishSparsityCallback))


def test_the_sparsity_group_is_the_callbacks_arguments_under_their_own_names() -> None:
    # One group, the callback's names and defaults: nothing can silently override an argument (issue 19.5: the
    # flat arguments had init twice, sparse_init="er" with sparsity_options={"init": "uniform"} trained uniform).
    assert tuple(inspect.signature(SelfishSparsityCallback.__init__).parameters)[1:] == SPARSITY_ARGUMENTS
    for field in dataclasses.fields(SparsityArguments):
        default = inspect.signature(SelfishSparsityCallback.__init__).parameters[field.name].default
        assert field.default == default or (field.default is dataclasses.MISSING and default is inspect._empty)
    assert sparsity_callback(sparsity=0.5, init="er").init.name == "er"
    assert sparsity_callback(sparsity=0.5, init="er", update_until=0.5).update_until == 0.5
    # the same group from Python (a mapping or SparsityArguments) and from the CLI (a SparsityArguments)
    given = SparsityArguments(sparsity=0.5, method="rigl", update_every="epoch")
    rigl = LanguageModel(tiny_lstm(), lr=1.0, sparsity=given).sparsity_arguments()
    assert rigl == LanguageModel(tiny_lstm(), lr=1.0, sparsity=dataclasses.asdict(given)).sparsity_arguments() | {
        "total_steps": rigl["total_steps"]
    }
    callback = sparsity_callback(sparsity=0.5, method="rigl", update_every="epoch")
    assert (callback.method, callback.growth.name, callback.update_every) == ("rigl", "gradient", "epoch")


def test_static_is_the_static_method() -> None:
    # There is no static flag: method="static" is static sparse training (no update, nothing logged as one).
    static = sparsity_callback(sparsity=0.5, method="static")
    assert (static.method, static.schedule.name) == ("static", "never")
    with pytest.raises(TypeError, match=r"sparsity has no argument 'static': the arguments of SelfishSparsityCallback"):
        LanguageModel(tiny_lstm(), lr=1.0, sparsity={"sparsity": 0.5, "static": True})


def test_names_in_the_sparsity_group_are_the_networks() -> None:
    net = tiny_lstm()
    net.sparsity_exclude = ["decoder.weight"]
    lm = LanguageModel(
        net,
        lr=1.0,
        sparsity={
            "sparsity": 0.5,
            "include": ["rnns.*"],
            "gate_layouts": {"rnns.0.weight_hh_l0": ["i", "f", "g", "o"]},
        },
    )
    arguments = lm.sparsity_arguments()
    assert arguments["include"] == ["network.rnns.*"]
    assert arguments["exclude"] == ["network.decoder.weight"]  # None: the network's own patterns
    assert arguments["gate_layouts"] == {"network.rnns.0.weight_hh_l0": ["i", "f", "g", "o"]}
    replaced = LanguageModel(net, lr=1.0, sparsity={"sparsity": 0.5, "exclude": ["encoder.weight"]})
    assert replaced.sparsity_arguments()["exclude"] == ["network.encoder.weight"]  # a list replaces them
    assert callable(arguments["total_steps"])  # None: the module's schedule length, asked at fit start
    fixed = LanguageModel(net, lr=1.0, sparsity={"sparsity": 0.5, "total_steps": 40})
    assert fixed.sparsity_arguments()["total_steps"] == 40


@pytest.mark.parametrize(
    "sparsity,error,match",
    [
        (
            0.5,
            TypeError,
            r"sparsity must be the SelfishSparsityCallback arguments \(e.g. \{'sparsity': 0.5\}\) or None",
        ),
        ("0.5", TypeError, "sparsity must be a SparsityArguments, a mapping of SelfishSparsityCallback arguments"),
        ({"prune_rate": 0.5}, TypeError, "sparsity.sparsity is required"),
        ({"sparsity": 0.5, "sparse_init": "er"}, TypeError, "sparsity has no argument 'sparse_init'"),
        ({"sparsity": 1.0}, ValueError, r"^sparsity.sparsity must be in \(0, 1\), got 1.0"),
        (
            {"sparsity": 0.0},
            ValueError,
            r"^sparsity.sparsity must be in \(0, 1\), got 0.0: a dense run has no sparsity callback: "
            r"--model.sparsity null",
        ),
        ({"sparsity": 0.5, "method": "lottery"}, ValueError, r"^sparsity.method must be one of \['selfish'"),
        ({"sparsity": 0.5, "seed": "1"}, TypeError, r"^sparsity.seed must be an int or None, got str"),
    ],
)
def test_the_sparsity_group_is_checked_at_construction(sparsity, error, match) -> None:
    with pytest.raises(error, match=match):
        LanguageModel(tiny_lstm(), lr=1.0, sparsity=sparsity)


def test_prune_schedule_length_for_variable_bptt(corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir, bptt=6, variable_bptt=True)
    lm = LanguageModel(tiny_lstm(dm.vocab_size), lr=1.0, bptt=6, sparsity={"sparsity": 0.5}, checkpoint=False)
    trainer(max_epochs=2, limit_val_batches=1).fit(lm, datamodule=dm)
    # The authors' T_max = epochs * train_rows // bptt, as the run's length is not known in advance.
    assert lm._sparsity_callback.controller.total_steps == 2 * dm.split_rows("train") // 6
    assert lm._sparsity_callback.total_steps == lm._sparsity_callback.controller.total_steps  # one meaning: the length


def test_a_time_limit_is_warned_about_through_the_recipes(corpus_dir: Path) -> None:
    """The recipes hand the callback a ``total_steps`` function that returns None for fixed windows (the trainer's
    estimate): the schedule then assumes the step/epoch limit, which ``--trainer.max_time`` may cut (issue 25.4)."""
    dm = datamodule(corpus_dir)
    lm = LanguageModel(tiny_lstm(dm.vocab_size), lr=1.0, sparsity={"sparsity": 0.5}, checkpoint=False)
    with pytest.warns(UserWarning, match=r"the trainer has a time limit \(max_time, or a Timer callback"):
        trainer(max_epochs=2, limit_val_batches=1, max_time={"minutes": 5}).fit(lm, datamodule=dm)


def test_standard_ntasgd_ignores_lifetimes() -> None:
    # One weight grown after the trigger: SNT-ASGD starts its average at its value, NT-ASGD averages it with
    # the zeros of its earlier non-existence.
    results = {}
    for cls in (SNTASGD, MaskBlindNTASGD):
        w = nn.Parameter(torch.tensor([1.0, 0.0]))
        mask = torch.tensor([True, False])
        opt = cls([w], lr=0.1)
        opt.set_masks({w: mask})
        opt.start_averaging()
        for _ in range(3):
            w.grad = torch.tensor([-1.0, 0.0])
            opt.step()
            with torch.no_grad():
                w.mul_(mask)
        kept = mask.clone()
        mask[1] = True
        opt.on_mask_update(w, MaskUpdate(kept, kept, mask))
        w.grad = torch.tensor([-1.0, -10.0])
        opt.step()
        results[cls] = opt.averaged_parameters()[0][1].item()
    assert results[SNTASGD] == pytest.approx(1.0)  # its first averaged iterate: w = 0 + 0.1 * 10
    assert results[MaskBlindNTASGD] == pytest.approx(0.25)  # (0 + 0 + 0 + 1) / 4


class StartAveraging(Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            trainer.optimizers[0].start_averaging()


@pytest.mark.parametrize("optimizer", ["sntasgd", "ntasgd"])
def test_averages_of_a_sparse_model_have_its_topology(optimizer: str, corpus_dir: Path) -> None:
    dm = datamodule(corpus_dir)
    lm = LanguageModel(
        tiny_lstm(dm.vocab_size), lr=1.0, bptt=6, sparsity={"sparsity": 0.5}, optimizer=optimizer, checkpoint=False
    )
    trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=1, callbacks=[StartAveraging()]).fit(
        lm, datamodule=dm
    )
    opt = lm.trainer.optimizers[0]
    assert opt.averaging
    params = dict(lm.named_parameters())
    for name, mask in lm._sparsity_callback.masks.items():
        ax = opt.state[params[name]]["ax"]
        assert (ax[~mask] == 0).all() and (ax[mask] != 0).any()


class ValLossPerEpoch(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


def test_snt_asgd_validates_and_checkpoints_the_averaged_sparse_model(corpus_dir: Path, tmp_path: Path) -> None:
    dm = datamodule(corpus_dir)
    pl.seed_everything(0, verbose=False)
    lm = LanguageModel(tiny_lstm(dm.vocab_size), lr=5.0, bptt=6, sparsity={"sparsity": 0.5}, nonmono=1)
    losses = ValLossPerEpoch()
    where = dict(enable_checkpointing=True, default_root_dir=str(tmp_path))
    t = trainer(max_epochs=5, limit_train_batches=4, callbacks=[losses], **where)
    t.fit(lm, datamodule=dm)
    trigger = next(cb for cb in t.callbacks if isinstance(cb, NonMonotonicTrigger))
    assert trigger.averaging_started_epoch is not None, "lr 5 on this corpus stops improving within 5 epochs"
    # last.ckpt: the end of the run's last epoch, read with the masks and the validation loss of its own epoch
    last = Path(t.checkpoint_callback.dirpath) / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["epoch"] > trigger.averaging_started_epoch, "written while averaging"
    masks = checkpoint["callbacks"]["SelfishSparsityCallback"]["masks"]
    for name, mask in masks.items():
        assert (checkpoint["state_dict"][name][~mask] == 0).all(), "the averaged model is exactly sparse"
        assert not torch.equal(checkpoint["state_dict"][name], checkpoint["raw_state_dict"][name])
    # The validation of that epoch ran on the averages: validating the checkpoint again gives the same loss.
    again = trainer().validate(lm, datamodule=dm, ckpt_path=str(last), verbose=False)[0]
    assert again["val_loss"] == pytest.approx(losses.losses[checkpoint["epoch"]], rel=1e-6)


def test_checkpoint_keeps_the_best_validation_model(corpus_dir: Path, tmp_path: Path) -> None:
    dm = datamodule(corpus_dir)
    lm = LanguageModel(tiny_lstm(dm.vocab_size), lr=1.0, bptt=6, sparsity={"sparsity": 0.5})
    t = trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
    )
    t.fit(lm, datamodule=dm)
    assert Path(t.checkpoint_callback.best_model_path).is_file()
    assert (Path(t.checkpoint_callback.dirpath) / "last.ckpt").is_file()
    best = torch.load(t.checkpoint_callback.best_model_path, weights_only=False)
    assert "network" not in best["hyper_parameters"], "the module is in the state dict, not pickled in hparams"
    result = t.test(lm, datamodule=dm, ckpt_path="best", verbose=False)[0]
    assert result["test_ppl"] == pytest.approx(math.exp(result["test_loss"]), rel=1e-5)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        LanguageModel(tiny_lstm(), lr=1.0, optimizer="rmsprop")
    with pytest.raises(ValueError, match="sparsity"):
        LanguageModel(tiny_lstm(), lr=1.0, sparsity={"sparsity": 1.0})
    with pytest.raises(ValueError, match="lr"):
        LanguageModel(tiny_lstm(), lr=0)
    with pytest.raises(TypeError, match="init_hidden"):
        LanguageModel(nn.Linear(2, 2), lr=1.0)


# ------------------------------------------------------------------------------------------------------- resuming


class Crash(Exception):
    """Stands for a killed process: the run stops where it is, with only its checkpoints left."""


class CrashAt(Callback):
    def __init__(self, step: int | None = None, epoch: int | None = None) -> None:
        self.step, self.epoch = step, epoch

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step or trainer.current_epoch == self.epoch:
            raise Crash


def fit_with_dropout(
    corpus_dir: Path, variable: bool, extra=(), ckpt_path=None, root: Path | None = None
) -> LanguageModel:
    """A recipe run with dropout 0.5: sparse, variable or fixed BPTT, SNT-ASGD, 3 epochs; with ``root``, the recipe's
    own checkpoint (best and last) under it."""
    pl.seed_everything(7, verbose=False)
    dm = datamodule(corpus_dir, bptt=6, variable_bptt=variable, seed=3)
    lm = LanguageModel(
        tiny_lstm(dm.vocab_size, dropout=0.5),
        lr=2.0,
        bptt=6,
        sparsity={"sparsity": 0.5, "seed": 1, "update_every": 5},
        nonmono=1,
        checkpoint=root is not None,
        topology_monitor=False,
        flops=False,
    )
    where = dict(default_root_dir=str(root)) if root else {}
    checkpointing = root is not None or any(isinstance(cb, ModelCheckpoint) for cb in extra)
    run = trainer(max_epochs=3, limit_val_batches=2, callbacks=list(extra), enable_checkpointing=checkpointing, **where)
    run.fit(lm, datamodule=dm, ckpt_path=ckpt_path)
    return lm


@pytest.mark.parametrize(
    "variable,where",
    [(True, "mid-epoch"), (False, "mid-epoch"), (True, "end of epoch"), (False, "last.ckpt")],
    ids=["variable-mid-epoch", "fixed-mid-epoch", "variable-end-of-epoch", "fixed-recipe-last"],
)
def test_a_resume_with_dropout_is_exact(variable: bool, where: str, corpus_dir: Path, tmp_path: Path) -> None:
    """Issue 15.7: with dropout a resumed run drew other masks (Lightning restores no global random state); it also
    started the hidden state at zero, re-read a mid-epoch checkpoint's epoch from its first window, and, with variable
    BPTT, an end-of-epoch checkpoint's next epoch read the windows of the epoch before."""
    straight = fit_with_dropout(corpus_dir, variable)
    root = None
    if where == "mid-epoch":  # a checkpoint at step 20, in the middle of the second epoch, then the process dies
        saver = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=20, save_top_k=-1, filename="{step}")]
        crash, path = CrashAt(step=20), tmp_path / "step=20.ckpt"
    elif where == "end of epoch":  # a checkpoint at the end of the first epoch, then the process dies in the second
        saver = [ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")]
        crash, path = CrashAt(epoch=1), tmp_path / "epoch=0.ckpt"
    else:  # the recipe's own last.ckpt (written after validation), what selfish-rnn fit --ckpt_path last resumes
        saver, root = [], tmp_path / "run"
        crash, path = CrashAt(step=30), None
    with pytest.raises(Crash):
        fit_with_dropout(corpus_dir, variable, extra=[*saver, crash], root=root)
    path = path or next(root.rglob("last.ckpt"))
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 20 if where == "mid-epoch" else saved["epoch"] in (0, 1)
    resumed = fit_with_dropout(corpus_dir, variable, ckpt_path=path, root=root and tmp_path / "resumed")
    assert resumed.trainer.global_step == straight.trainer.global_step
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for name, mask in straight._sparsity_callback.masks.items():
        assert torch.equal(mask, resumed._sparsity_callback.masks[name]), name


def figure4_run(corpus_dir: Path, training_seed: int, growth_seed: int) -> tuple[dict, dict, dict, dict]:
    """One run of the Figure 4 (right) pair: the same seed_everything and sparsity.seed, its own training seed."""
    pl.seed_everything(7, verbose=False)
    dm = datamodule(corpus_dir, bptt=6, seed=training_seed)
    lm = LanguageModel(
        tiny_lstm(dm.vocab_size, dropout=0.5),
        lr=2.0,
        bptt=6,
        optimizer="sgd",
        sparsity={"sparsity": 0.5, "seed": 1, "growth_seed": growth_seed, "update_every": 3},
        training_seed=training_seed,
        checkpoint=False,
        topology_monitor=False,
        flops=False,
    )
    start: dict = {}

    class Start(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            cb = pl_module._sparsity_callback
            start["masks"] = {n: m.clone() for n, m in cb.masks.items()}
            start["weights"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    trainer(max_epochs=2, limit_val_batches=1, callbacks=[Start()]).fit(lm, datamodule=dm)
    masks = {n: m.clone() for n, m in lm._sparsity_callback.masks.items()}
    return start["masks"], start["weights"], masks, {n: p.detach().clone() for n, p in lm.named_parameters()}


def test_the_figure_4_pair_shares_initial_weights_and_masks_and_trains_apart(corpus_dir: Path) -> None:
    """Paper, Figure 4 (right): two runs from the same initial masks and weights with different training seeds."""
    masks_a, weights_a, end_masks_a, end_a = figure4_run(corpus_dir, training_seed=1, growth_seed=1)
    masks_b, weights_b, end_masks_b, end_b = figure4_run(corpus_dir, training_seed=2, growth_seed=2)
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    assert any(not torch.equal(end_masks_a[n], end_masks_b[n]) for n in end_masks_a)  # grown apart
    assert any(not torch.equal(end_a[n], end_b[n]) for n in end_a)
    _, _, _, dropout_only = figure4_run(corpus_dir, training_seed=2, growth_seed=1)  # the training seed alone
    assert any(not torch.equal(dropout_only[n], end_a[n]) for n in end_a)
    _, _, again_masks, again = figure4_run(corpus_dir, training_seed=1, growth_seed=1)  # and a run repeats exactly
    assert all(torch.equal(again_masks[n], end_masks_a[n]) for n in again_masks)
    assert all(torch.equal(again[n], end_a[n]) for n in again)
