"""AWD-LSTM-MoS's ``small_batch_size``: column groups with their own state, gradients accumulated before one step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.models import AWDLSTMMoS
from tests.conftest import write_random_corpus

V = 14


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_corpus(tmp_path_factory.mktemp("corpus"), seed=3, vocab=V - 2, lines=(60, 10, 10), words=6)


def tiny_mos(dropout: float) -> AWDLSTMMoS:
    torch.manual_seed(0)
    rates = dict(dropout_e=dropout, dropout_i=dropout, dropout_h=dropout, dropout_o=dropout, dropout_l=dropout)
    return AWDLSTMMoS(ntoken=V, ninp=6, nhid=8, nhidlast=6, nlayers=2, n_experts=3, wdrop=dropout, **rates)


class Grab(Callback):
    """The accumulated (dense, unclipped) gradients of every step, and the hidden state after it."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.hidden: list = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.hidden.append(copy.deepcopy(pl_module._train_hidden))


class CountForwards(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        def count(module, args, output) -> None:
            self.calls += 1

        pl_module.network.register_forward_hook(count)


def run(corpus_dir: Path, small_batch_size: int | None, dropout: float = 0.0, steps: int = 2, extra=()):
    data = LanguageModelingDataModule("tiny", data_dir=str(corpus_dir), batch_size=6, eval_batch_size=2, bptt=5)
    lm = LanguageModel(
        tiny_mos(dropout), lr=0.5, optimizer="sgd", bptt=5, small_batch_size=small_batch_size, checkpoint=False
    )
    grab = Grab()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[grab, *extra],
    )
    trainer.fit(lm, datamodule=data)
    return lm, grab


def test_without_dropout_the_accumulated_gradient_is_the_full_batch_gradient(corpus_dir: Path) -> None:
    _, whole = run(corpus_dir, None)
    _, split = run(corpus_dir, 2)
    assert len(whole.grads) == len(split.grads) == 2
    for step in range(2):  # the second step also checks that each group carried its own hidden state
        assert whole.grads[step].keys() == split.grads[step].keys()
        for name, grad in whole.grads[step].items():
            torch.testing.assert_close(split.grads[step][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_each_group_carries_its_own_hidden_state(corpus_dir: Path) -> None:
    _, whole = run(corpus_dir, None)
    _, split = run(corpus_dir, 2)
    groups = split.hidden[-1]
    assert [size for size, _ in groups] == [2, 2, 2]
    batch_size, full = whole.hidden[-1]
    assert batch_size == 6
    for k, (_, state) in enumerate(groups):
        for layer, (h, c) in enumerate(state):
            torch.testing.assert_close(h, full[layer][0][:, 2 * k : 2 * k + 2], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, full[layer][1][:, 2 * k : 2 * k + 2], rtol=1e-5, atol=1e-6)


def test_with_dropout_every_group_runs_its_own_forward(corpus_dir: Path) -> None:
    counter = CountForwards()
    lm, split = run(corpus_dir, 2, dropout=0.3, steps=3, extra=[counter])
    assert counter.calls == 3 * 3, "three groups of two columns, one forward (own dropout masks) each"
    assert all(torch.isfinite(g).all() for step in split.grads for g in step.values())
    # an uneven split: groups of 4 and 2, losses weighted by their share of the tokens
    lm, uneven = run(corpus_dir, 4, steps=1)
    assert [size for size, _ in uneven.hidden[-1]] == [4, 2]
    _, whole = run(corpus_dir, None, steps=1)
    for name, grad in whole.grads[0].items():
        torch.testing.assert_close(uneven.grads[0][name], grad, rtol=1e-4, atol=1e-6)


def test_small_batch_size_is_validated() -> None:
    with pytest.raises(ValueError, match="small_batch_size must be a positive int"):
        LanguageModel(tiny_mos(0.0), lr=1.0, small_batch_size=0)
