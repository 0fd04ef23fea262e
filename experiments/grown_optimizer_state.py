"""Which optimizer state should a grown weight start with? The experiment behind ``grown_optimizer_state``.

The quickstart's model and optimizer (a 2 x 200 LSTM language model, untied, no dropout, on Penn Treebank; Adam with
lr 3e-3, betas (0, 0.999), eps 1e-9, clip 0.25) trained sparse (0.5) with
Selfish-RNN's parts, the topology updated every ``--update-every`` steps with prune rate 0.5, under each candidate
rule for the optimizer state of grown weights, several seeds each, the same steps and batches for every candidate:

* ``zero``: every state tensor zero at inactive positions, a grown weight starts with zero state;
* ``dense``: Adam's moments never masked (the Selfish-RNN authors' code);
* ``tensor_mean``: as ``zero``, but a grown weight's second moment starts at its tensor's mean.

Prints one JSON line per run (validation perplexity on the whole PTB validation set, and the mean |step| of grown
and of surviving weights relative to the learning rate on the 1st and the 20th step after each update), then one
summary line per optimizer and rule (mean and spread over the seeds). One thread per run::

    OMP_NUM_THREADS=1 python experiments/grown_optimizer_state.py --data ../shared/data/ptb --steps 800

docs/methods.md ("The optimizer state of grown weights") has the table this printed and the decision it supports.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_selfish import SelfishSparsityCallback

RULES = ("zero", "dense", "tensor_mean")


def tokenize(path: Path, vocab: dict[str, int]) -> torch.Tensor:
    ids = []
    for line in path.read_text().splitlines():
        for word in line.split() + ["<eos>"]:
            ids.append(vocab.setdefault(word, len(vocab)))
    return torch.tensor(ids)


class Windows(Dataset):
    """Fixed BPTT windows over ``batch`` parallel streams (the recipes' batchify), one window per item."""

    def __init__(self, tokens: torch.Tensor, batch: int, bptt: int) -> None:
        rows = tokens.numel() // batch
        self.data = tokens[: rows * batch].view(batch, rows).t().contiguous()
        self.bptt = bptt

    def __len__(self) -> int:
        return (self.data.size(0) - 1) // self.bptt

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.bptt
        return self.data[start : start + self.bptt], self.data[start + 1 : start + 1 + self.bptt]


class LanguageModel(pl.LightningModule):
    def __init__(self, vocab: int, optimizer: str, lr: float) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, 200)
        self.rnn = nn.LSTM(200, 200, num_layers=2)
        self.decoder = nn.Linear(200, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.optimizer, self.lr = optimizer, lr
        self.hidden = None
        self.val_loss: list[tuple[float, int]] = []

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden

    def training_step(self, batch, batch_idx):
        x, y = batch[0][0], batch[1][0]
        hidden = None if self.hidden is None else tuple(h.detach() for h in self.hidden)
        logits, self.hidden = self(x, hidden)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def on_validation_epoch_start(self):
        self.val_hidden, self.val_loss = None, []

    def validation_step(self, batch, batch_idx):
        x, y = batch[0][0], batch[1][0]
        logits, self.val_hidden = self(x, self.val_hidden)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.val_loss.append((float(loss), y.numel()))

    def configure_optimizers(self):
        if self.optimizer == "adam":
            # the quickstart's Adam (recipes: LanguageModel adam_betas=(0, 0.999), adam_eps=1e-9, as the awd-lstm code)
            return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.0, 0.999), eps=1e-9, weight_decay=1.2e-6)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1.2e-6)


class GrownStepSize(pl.Callback):
    """Mean |step| / lr of grown and of surviving LSTM weights on the 1st and 20th optimizer step after each update
    (the embedding's grown rows mostly see no gradient in a batch, which would dilute the figure)."""

    def __init__(self, sparsity: SelfishSparsityCallback, lr: float) -> None:
        self.sparsity, self.lr = sparsity, lr
        self.seen_updates = 0
        self.grown: dict[str, torch.Tensor] | None = None
        self.since = 0
        self.before: dict[str, torch.Tensor] = {}
        self.ratios: dict[str, list[float]] = {"grown_1": [], "surviving_1": [], "grown_20": [], "surviving_20": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        masks = self.sparsity.masks
        if self.sparsity.num_updates != self.seen_updates:  # an update just happened: track its grown weights
            self.seen_updates = self.sparsity.num_updates
            self.grown = {n: m & ~self.previous[n] for n, m in masks.items()}
            self.since = 0
        self.previous = {n: m.clone() for n, m in masks.items()}
        params = dict(pl_module.named_parameters())
        self.before = {n: params[n].detach().clone() for n in masks}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.grown is None:
            return
        self.since += 1
        if self.since not in (1, 20):
            return
        params = dict(pl_module.named_parameters())
        grown = surviving = grown_n = surviving_n = 0.0
        for name, was_grown in self.grown.items():
            if not name.startswith("rnn."):  # (the LSTM's weights: every one of them has a gradient at every step)
                continue
            step = (params[name].detach() - self.before[name]).abs()
            active = self.sparsity.masks[name]
            grown += float(step[was_grown & active].sum())
            grown_n += int((was_grown & active).sum())
            surviving += float(step[active & ~was_grown].sum())
            surviving_n += int((active & ~was_grown).sum())
        if grown_n and surviving_n:
            self.ratios[f"grown_{self.since}"].append(grown / grown_n / self.lr)
            self.ratios[f"surviving_{self.since}"].append(surviving / surviving_n / self.lr)


def run(args, corpus, optimizer: str, rule: str, seed: int) -> dict:
    train, valid, vocab = corpus
    lr = args.adam_lr if optimizer == "adam" else args.sgd_lr
    pl.seed_everything(seed, verbose=False)
    model = LanguageModel(vocab, optimizer, lr)
    sparsity = SelfishSparsityCallback(
        sparsity=0.5, prune_rate=0.5, update_every=args.update_every, seed=seed, grown_optimizer_state=rule
    )
    steps = GrownStepSize(sparsity, lr)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=0.25,
        callbacks=[sparsity, steps],
    )
    trainer.fit(model, DataLoader(train, batch_size=1, shuffle=False))
    evaluator = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    evaluator.validate(model, DataLoader(valid, batch_size=1, shuffle=False), verbose=False)
    loss = sum(value * n for value, n in model.val_loss) / sum(n for _, n in model.val_loss)
    line = {
        "optimizer": optimizer,
        "rule": rule,
        "seed": seed,
        "steps": args.steps,
        "val_ppl": round(math.exp(loss), 2),
    }
    line.update({key: round(statistics.mean(v), 3) for key, v in steps.ratios.items() if v})
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ptb"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--update-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--sgd-lr", type=float, default=1.0)
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd_momentum"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocab: dict[str, int] = {}
    train = Windows(tokenize(args.data / "train.txt", vocab), 20, 35)
    valid = Windows(tokenize(args.data / "valid.txt", vocab), 10, 35)
    corpus = (train, valid, len(vocab))
    results = []
    for optimizer in args.optimizers:
        rules = RULES if optimizer == "adam" else ("zero",)  # (the rules differ only in Adam's moments)
        for seed in args.seeds:
            for rule in rules:
                results.append(run(args, corpus, optimizer, rule, seed))
    for optimizer in args.optimizers:
        for rule in RULES:
            rows = [r for r in results if r["optimizer"] == optimizer and r["rule"] == rule]
            if not rows:
                continue
            ppl = [r["val_ppl"] for r in rows]
            summary = {
                "summary": f"{optimizer}/{rule}",
                "runs": len(rows),
                "val_ppl_mean": round(statistics.mean(ppl), 2),
            }
            summary["val_ppl_min"], summary["val_ppl_max"] = min(ppl), max(ppl)
            for key in ("grown_1", "surviving_1", "grown_20", "surviving_20"):
                values = [r[key] for r in rows if key in r]
                if values:
                    summary[key] = round(statistics.mean(values), 3)
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
