"""What users write: their own models, ordinary Lightning habits, other callbacks beside ours, short runs.

Each test builds what a user would with the public API and a real ``Trainer``, and checks that the callback trains
what was asked or refuses with a message that says why (docs/callback.md, "On your own training code").
"""

from __future__ import annotations

import importlib
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import BATCH, STEPS, VOCAB, TinyLM, make_trainer, tiny_module_of, token_loader
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelPruning, StochasticWeightAveraging
from torch import nn

from lightning_selfish import METHODS, SelfishSparsityCallback

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def assert_sparse_as_reported(model: nn.Module, callback: SelfishSparsityCallback) -> None:
    """Every sparsified weight is zero where its mask is inactive, and the counts are the asked-for ones."""
    params = dict(model.named_parameters())
    for name, mask in callback.masks.items():
        assert not params[name].detach()[~mask].any(), name
    active = sum(int(mask.sum()) for mask in callback.masks.values())
    total = sum(mask.numel() for mask in callback.masks.values())
    assert active == sum(round((1 - callback.config.sparsity) * m.numel()) for m in callback.masks.values()), (
        active,
        total,
    )


class OwnModel(pl.LightningModule):
    """A user's own sequence model: an embedding, one of several recurrent or attention cores, a decoder."""

    def __init__(self, core: str = "gru", optimizer: str = "sgd", dropout: float = 0.0) -> None:
        super().__init__()
        self.core_name, self.optimizer_name = core, optimizer
        self.embed = nn.Embedding(VOCAB, 16)
        if core == "gru":
            self.core = nn.GRU(16, 16, num_layers=2, batch_first=True)
        elif core == "lstmcell":
            self.core = nn.LSTMCell(16, 16)
        elif core == "transformer":
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
            self.core = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.dropout(self.embed(x))  # (B, T, 16)
        if self.core_name == "gru":
            out, _ = self.core(e)
        elif self.core_name == "lstmcell":
            h = c = e.new_zeros(e.size(0), 16)
            outs = []
            for t in range(e.size(1)):
                h, c = self.core(e[:, t], (h, c))
                outs.append(h)
            out = torch.stack(outs, 1)
        else:
            out = self.core(e)
        return self.head(self.dropout(out))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1)))

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.optimizer_name == "momentum":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(callback: SelfishSparsityCallback, *extra: Callback, model=None, max_epochs: int = 2, **kwargs):
    model = model or TinyLM()
    trainer = make_trainer([callback, *extra], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader(), token_loader(1, 2))
    return model, trainer


# --------------------------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------------------------


class LSTMLM(nn.Module):
    """Built right after ``seed_everything(s)``: its LSTM weights are the first uniforms of the global stream."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(48, 48)


@pytest.mark.parametrize("seed", [0, 1, 2, 1111])
def test_a_seed_equal_to_the_global_seed_gives_masks_independent_of_the_weights(seed: int) -> None:
    """``seed_everything(s)`` and ``SelfishSparsityCallback(seed=s)``: the masks must not replay the uniforms that
    initialised the weights (they kept exactly the most negative third before the seed was mixed)."""
    pl.seed_everything(seed, verbose=False)
    module = LSTMLM()
    callback = SelfishSparsityCallback(sparsity=0.67, seed=seed)
    params = {n: p for n, p in module.named_parameters() if p.dim() == 2}
    generator = callback.controller.seed_run(seed, None, torch.device("cpu"))
    from lightning_selfish.core.engine import SparseEngine

    engine = SparseEngine.initialize(params, 0.67, generator)
    for name, mask in engine.masks.items():
        kept = params[name].detach()[mask]
        n = kept.numel()
        negative = float((kept < 0).float().mean())
        assert abs(negative - 0.5) < 4 * math.sqrt(0.25 / n), (name, negative)  # a random mask: half negative
        # and no rank relation: the kept weights' mean rank among all is the middle one, within chance
        ranks = params[name].detach().flatten().argsort().argsort().float() / (mask.numel() - 1)
        mean_rank = float(ranks[mask.flatten()].mean())
        assert abs(mean_rank - 0.5) < 4 * math.sqrt(1 / 12 / n), (name, mean_rank)


def test_the_mask_seed_reaches_a_real_fit_mixed() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    weights = dict(model.named_parameters())["rnn.weight_hh_l0"].detach().clone()
    callback = SelfishSparsityCallback(sparsity=0.67, seed=0, method="static")  # (the masks as drawn)
    make_trainer([callback], max_epochs=1).fit(model, token_loader())
    kept = weights[callback.masks["rnn.weight_hh_l0"]]
    assert 0.3 < float((kept < 0).float().mean()) < 0.7  # (it was 1.0: the most negative third)


# --------------------------------------------------------------------------------------------------------------
# a second fit, fine-tuning, already sparse weights
# --------------------------------------------------------------------------------------------------------------


class Snapshot(Callback):
    def __init__(self, callback: SelfishSparsityCallback) -> None:
        self.callback = callback
        self.at_start: dict | None = None

    def on_train_start(self, trainer, pl_module):
        self.at_start = {
            "masks": {n: m.clone() for n, m in self.callback.masks.items()},
            "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
        }


@pytest.mark.parametrize("same_trainer", [True, False], ids=["same Trainer", "new Trainer"])
def test_a_second_fit_continues_from_the_current_masks(same_trainer: bool) -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    model, trainer = fit(callback, max_epochs=3)
    masks = {n: m.clone() for n, m in callback.masks.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    updates = callback.num_updates
    snapshot = Snapshot(callback)
    if same_trainer:
        trainer.fit_loop.max_epochs = 5
        trainer.callbacks.append(snapshot)
        trainer.fit(model, token_loader(), token_loader(1, 2))
    else:
        fit(callback, snapshot, model=model, max_epochs=2)
    for name, mask in masks.items():
        assert torch.equal(snapshot.at_start["masks"][name], mask), name  # no re-drawn masks
    for name, weight in weights.items():
        assert torch.equal(snapshot.at_start["weights"][name], weight), name  # no trained weight zeroed
    assert callback.num_updates > updates  # and the topology keeps evolving
    assert_sparse_as_reported(model, callback)


def test_a_new_callback_adopts_weights_that_are_already_sparse_at_its_counts() -> None:
    first = SelfishSparsityCallback(sparsity=0.6, seed=0)
    model, _ = fit(first)
    pattern = {n: p.detach() != 0 for n, p in model.named_parameters() if n in first.masks}
    fine_tune = SelfishSparsityCallback(sparsity=0.6, seed=5)
    snapshot = Snapshot(fine_tune)
    fit(fine_tune, snapshot, model=model, max_epochs=1)
    for name, mask in snapshot.at_start["masks"].items():
        assert torch.equal(mask, pattern[name]), name


def test_a_new_callback_refuses_weights_sparse_at_other_counts() -> None:
    model, _ = fit(SelfishSparsityCallback(sparsity=0.6, seed=0))
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"the model's weights are already sparse \(encoder.weight 0.600 zero"):
        fit(SelfishSparsityCallback(sparsity=0.8, seed=0), model=model, max_epochs=1)
    for name, weight in model.named_parameters():
        assert torch.equal(weight, trained[name]), name  # refused before anything changed


# --------------------------------------------------------------------------------------------------------------
# two pruning systems, weight averaging
# --------------------------------------------------------------------------------------------------------------


def test_model_pruning_beside_the_callback_is_refused() -> None:
    with pytest.raises(ValueError, match=r"SelfishSparsityCallback and ModelPruning are both in the trainer's"):
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0), ModelPruning("l1_unstructured", amount=0.3))


def test_weights_pruned_by_torch_are_refused() -> None:
    model = TinyLM()
    torch.nn.utils.prune.l1_unstructured(model.decoder, "weight", amount=0.3)
    with pytest.raises(ValueError, match=r"decoder.weight is pruned by torch.nn.utils.prune \(L1Unstructured\)"):
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0), model=model)


def test_parametrized_weights_are_refused() -> None:
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    model = TinyLM()
    torch.nn.utils.parametrize.register_parametrization(model.decoder, "weight", Scale())
    with pytest.raises(ValueError, match=r"decoder.weight is reparametrised by torch.nn.utils.parametrize"):
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0), model=model)


@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_across_topology_updates_is_refused(averaging: str) -> None:
    from pytorch_lightning.callbacks import EMAWeightAveraging

    other = StochasticWeightAveraging(swa_lrs=0.1) if averaging == "swa" else EMAWeightAveraging()
    with pytest.raises(ValueError, match=r"averages weights across topology updates"):
        fit(SelfishSparsityCallback(sparsity=0.5, seed=0), other)


def test_weight_averaging_of_a_static_sparse_model_stays_sparse() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, method="static")
    model, _ = fit(callback, StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=1), max_epochs=3)
    assert_sparse_as_reported(model, callback)


def test_early_stopping_beside_the_callback_ends_a_sparse_model() -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, update_every=2)
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after the 2nd validation
    model, trainer = fit(callback, stop, max_epochs=6)
    assert trainer.current_epoch < 6
    assert_sparse_as_reported(model, callback)


# --------------------------------------------------------------------------------------------------------------
# short runs, the last step
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_every_preset_changes_the_topology_in_a_short_run(method: str) -> None:
    """32 optimizer steps (RigL and GMP default to an update every 100 steps: their cadence is scaled)."""
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0, method=method)
    initial: dict = {}

    class First(Callback):
        def on_train_start(self, trainer, pl_module):
            initial.update({n: m.clone() for n, m in callback.masks.items()})

    model, _ = fit(callback, First(), model=TinyLM(optimizer="momentum"), max_epochs=4)
    changed = any(not torch.equal(initial[n], m) for n, m in callback.masks.items())
    assert changed == (method != "static"), method
    if method in ("rigl", "gmp"):
        assert callback.num_updates >= 10 and callback.controller.config.update_every < 100
    if method == "gmp":
        assert_sparse_as_reported(model, callback)  # ends exactly at the target


def test_an_explicit_cadence_that_gives_no_update_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match=r"method='rigl' with update_every=100 makes no topology update"):
        fit(SelfishSparsityCallback(sparsity=0.6, seed=0, method="rigl", update_every=100))


def test_no_update_on_the_last_step_leaves_no_grown_weight_at_zero() -> None:
    """update_every=2 with 4 batches per step: 4 steps, the last one on the cadence."""
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, update_every=2)
    model, trainer = fit(callback, max_epochs=2, accumulate_grad_batches=4)
    assert trainer.global_step == 4 and callback.num_updates == 1
    params = dict(model.named_parameters())
    zeros = sum(int((params[n].detach() == 0).sum()) for n in callback.masks)
    assert zeros == sum(int((~m).sum()) for m in callback.masks.values())  # exactly the inactive ones


# --------------------------------------------------------------------------------------------------------------
# own models, optimizers, precision
# --------------------------------------------------------------------------------------------------------------


def windows_loader(seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (8 * BATCH, STEPS + 1), generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=BATCH, shuffle=False
    )


@pytest.mark.parametrize("core", ["gru", "lstmcell", "transformer"])
def test_own_models_train_sparse(core: str) -> None:
    callback = SelfishSparsityCallback(sparsity=0.7, seed=0, update_every=3)
    model = OwnModel(core)
    trainer = make_trainer([callback], max_epochs=2)
    trainer.fit(model, windows_loader(), windows_loader(1))
    assert callback.num_updates == 5  # steps 3, 6, 9, 12, 15 of 16
    assert_sparse_as_reported(model, callback)
    if core == "gru":  # the gates of a GRU weight are detected and ranked jointly
        assert callback.engine.tensors["core.weight_hh_l0"].gates is not None


@pytest.mark.parametrize(
    "optimizer,trainer_kwargs",
    [
        ("adam", {}),
        ("momentum", {"accumulate_grad_batches": 2}),
        ("sntasgd", {}),
        ("sgd", {"precision": "bf16-mixed"}),
    ],
    ids=["adam", "momentum-accumulation", "sntasgd", "bf16"],
)
def test_optimizers_and_precision_keep_the_model_as_sparse_as_reported(optimizer: str, trainer_kwargs: dict) -> None:
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0, update_every=3)
    model, _ = fit(callback, model=TinyLM(optimizer=optimizer), **trainer_kwargs)
    assert callback.num_updates >= 1
    assert_sparse_as_reported(model, callback)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_a_second_fit_under_either_package(package: str) -> None:
    lightning = importlib.import_module(package)
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)

    module = tiny_module_of(lightning)
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    lightning.Trainer(max_epochs=2, callbacks=[callback], **options).fit(module, token_loader())
    masks = {n: m.clone() for n, m in callback.masks.items()}
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    seen = {}

    class Look(lightning.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    lightning.Trainer(max_epochs=1, callbacks=[callback, Look()], **options).fit(module, token_loader())
    assert all(torch.equal(seen[n], w) for n, w in weights.items())
    assert all(torch.equal(callback.masks[n], m) for n, m in masks.items())  # (1 epoch: no update yet)


# --------------------------------------------------------------------------------------------------------------
# what the user sees
# --------------------------------------------------------------------------------------------------------------


def test_verbose_updates_reach_a_plain_script_on_their_own_lines(capsys: pytest.CaptureFixture) -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0, update_every=3, verbose=True)
    fit(callback, enable_progress_bar=True)
    out = capsys.readouterr()
    text = out.out + out.err
    lines = text.replace("\r", "\n").split("\n")
    assert sum(line.startswith("topology update ") for line in lines) == callback.num_updates == 5
    assert sum(line.startswith("  rnn.weight_hh_l0: sparsity 0.5000") for line in lines) == 5
