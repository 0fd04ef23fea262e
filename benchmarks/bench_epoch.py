"""The recipe's training epoch against a plain PyTorch loop of the same model, data and masking.

Prints one JSON line per phase. The recipe is what ``selfish-rnn fit`` runs: ``LanguageModel`` (stacked LSTM on the
bundled PTB) + ``LanguageModelingDataModule`` + ``SelfishSparsityCallback`` + ``SNTASGD`` + ``NonMonotonicTrigger``
+ metrics + TensorBoard logging + the progress bar ``selfish-rnn`` installs, in a Lightning ``Trainer``. The plain
loop is the authors' way: forward, NLL, backward, clip the dense gradient, ``SNTASGD.step()``, multiply the weights
by the masks, on the same windows, without Lightning. Both run in one process, alternating (so machine noise hits
both alike), and the figure is the median over rounds of the time per step from the ``--warmup``-th step to the last
(one device sync at each end, none per step). Phases:

* ``sgd``: before NT-ASGD's trigger (plain SGD steps);
* ``averaging``: after it (SNT-ASGD's lifetime averaging every step);
* ``validation``: a validation pass with the averaged weights swapped in (the recipe's ``NonMonotonicTrigger``
  swap, metrics and logging) against a plain ``no_grad`` loop inside ``SNTASGD.swap_averaged()``.

    python benchmarks/bench_epoch.py --hidden 200 --threads 1            # CPU target: <= 1.05x
    python benchmarks/bench_epoch.py --hidden 1500 --device cuda          # GPU target: <= 1.10x, <= 7.5-9 ms/step
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_selfish import SNTASGD, SparseEngine
from lightning_selfish.core.gates import detect_gate_layouts
from lightning_selfish_recipes.cli import PROGRESS_BAR_REFRESH_RATE, progress_bar
from lightning_selfish_recipes.data import LanguageModelingDataModule
from lightning_selfish_recipes.lm import LanguageModel, detach_hidden
from lightning_selfish_recipes.models import StackedLSTM
from lightning_selfish_recipes.runtime import keep_freed_memory_for_reuse


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch(pl.Callback):
    """Time from the end of training batch ``warmup`` to the end of the last one, or of a validation pass."""

    def __init__(self, device: str, warmup: int, averaging: bool) -> None:
        self.device, self.warmup, self.averaging = device, warmup, averaging
        self.start = self.stop = self.cpu_start = self.cpu_stop = 0.0
        self.steps = 0
        self.validation_s = self.validation_cpu_s = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging:
            for optimizer in trainer.optimizers:
                optimizer.start_averaging()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        batch_idx = args[-1]
        if batch_idx == self.warmup:
            sync(self.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        elif batch_idx > self.warmup:
            sync(self.device)  # only the last one counts: each overwrites the previous
            self.stop, self.cpu_stop = time.perf_counter(), time.process_time()
            self.steps = batch_idx - self.warmup

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(self.device)
        self._validation_start, self._validation_cpu_start = time.perf_counter(), time.process_time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(self.device)
        self.validation_s = time.perf_counter() - self._validation_start
        self.validation_cpu_s = time.process_time() - self._validation_cpu_start


def network(args: argparse.Namespace, vocab: int) -> StackedLSTM:
    return StackedLSTM(ntoken=vocab, ninp=args.hidden, nhid=args.hidden, nlayers=2, dropout=args.dropout)


def recipe_run(args: argparse.Namespace, data: LanguageModelingDataModule, averaging: bool, seed: int) -> Stopwatch:
    pl.seed_everything(seed, verbose=False)
    model = LanguageModel(
        network(args, data.vocab_size), lr=20.0, sparsity={"sparsity": 1 - args.density, "prune_rate": 0.5}
    )
    watch = Stopwatch(args.device, args.warmup, averaging)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())  # progress bar
    with tempfile.TemporaryDirectory() as logs, quiet[0], quiet[1]:
        trainer = pl.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            max_epochs=1,
            limit_train_batches=args.steps,
            limit_val_batches=args.val_batches,
            num_sanity_val_steps=0,
            log_every_n_steps=50,
            default_root_dir=logs,
            logger=pl.loggers.TensorBoardLogger(logs, name="bench"),
            enable_model_summary=False,
            enable_progress_bar=not args.no_progress_bar,
            callbacks=[watch] if args.no_progress_bar else [watch, progress_bar(args.refresh_rate)],
        )
        trainer.fit(model, datamodule=data)
    return watch


def plain_run(args: argparse.Namespace, data: LanguageModelingDataModule, averaging: bool, seed: int) -> dict:
    """The authors' loop: the same windows, clip, SNT-ASGD step, masks re-applied after every step."""
    torch.manual_seed(seed)
    device = torch.device(args.device)
    net = network(args, data.vocab_size).to(device)
    sparse = {n: p for n, p in net.named_parameters() if p.dim() >= 2}
    engine = SparseEngine.initialize(
        sparse,
        1 - args.density,
        torch.Generator(device=device).manual_seed(seed),
        gate_layouts=detect_gate_layouts(net),
    )
    params = list(net.parameters())
    optimizer = SNTASGD(params, lr=20.0, weight_decay=1.2e-6)
    optimizer.set_masks({p: engine.tensors[n].mask for n, p in sparse.items()})
    if averaging:
        optimizer.start_averaging()
    net.train()
    hidden = net.init_hidden(data.batch_size)
    start = stop = 0.0
    for step, batch in enumerate(data.train_dataloader()):
        if step == args.steps:
            break
        inp, target = batch.input.to(device), batch.target.to(device)
        hidden = detach_hidden(hidden)
        optimizer.zero_grad()
        out = net(inp, hidden)
        hidden = out.hidden
        F.nll_loss(out.log_probs, target).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        optimizer.step()
        engine.apply_masks_()
        if step == args.warmup:
            sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
    sync(args.device)
    stop, cpu_stop = time.perf_counter(), time.process_time()
    steps = min(args.steps, step + 1) - 1 - args.warmup
    # validation with the averages swapped in
    net.eval()
    sync(args.device)
    val_start, val_cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad(), optimizer.swap_averaged():
        hidden = net.init_hidden(data.eval_batch_size)
        total = torch.zeros((), device=device)
        for index, batch in enumerate(data.val_dataloader()):
            if index == args.val_batches:
                break
            out = net(batch.input.to(device), hidden)
            hidden = out.hidden
            total += F.nll_loss(out.log_probs, batch.target.to(device)) * batch.target.numel()
        total.item()
    val_s, val_cpu_s = time.perf_counter() - val_start, time.process_time() - val_cpu_start
    return {
        "step_s": (stop - start) / steps,
        "cpu_step_s": (cpu_stop - cpu_start) / steps,
        "validation_s": val_s,
        "validation_cpu_s": val_cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--density", type=float, default=0.33)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="recipe/plain alternations per phase")
    parser.add_argument("--phases", default="sgd,averaging", help="comma-separated: sgd, averaging")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress-bar", action="store_true", help="the recipe without its progress bar")
    parser.add_argument(
        "--refresh-rate", type=int, default=PROGRESS_BAR_REFRESH_RATE, help="batches between redraws (1: Lightning's)"
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's default thresholds (selfish-rnn raises them)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = not args.default_malloc and keep_freed_memory_for_reuse()  # as selfish-rnn does, for both loops
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning|torchmetrics")

    data = LanguageModelingDataModule("ptb", batch_size=20, eval_batch_size=10, bptt=35)
    data.prepare_data()
    data.setup("fit")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    for phase in args.phases.split(","):
        averaging = phase == "averaging"
        recipe, plain, recipe_val, plain_val, recipe_cpu, plain_cpu = [], [], [], [], [], []
        recipe_val_cpu, plain_val_cpu = [], []
        for round_ in range(args.rounds):  # alternate which goes first
            for is_recipe in (True, False) if round_ % 2 == 0 else (False, True):
                if is_recipe:
                    watch = recipe_run(args, data, averaging, seed=round_)
                    recipe.append((watch.stop - watch.start) / watch.steps)
                    recipe_cpu.append((watch.cpu_stop - watch.cpu_start) / watch.steps)
                    recipe_val.append(watch.validation_s)
                    recipe_val_cpu.append(watch.validation_cpu_s)
                else:
                    result = plain_run(args, data, averaging, seed=round_)
                    plain.append(result["step_s"])
                    plain_cpu.append(result["cpu_step_s"])
                    plain_val.append(result["validation_s"])
                    plain_val_cpu.append(result["validation_cpu_s"])
        recipe_ms, plain_ms = 1e3 * statistics.median(recipe), 1e3 * statistics.median(plain)
        line = {
            "benchmark": "recipe_epoch_vs_plain_loop",
            "phase": phase,
            "device": device_name,
            "threads": torch.get_num_threads(),
            "malloc_tuned": tuned,
            "progress_bar_refresh_rate": 0 if args.no_progress_bar else args.refresh_rate,
            "hidden": args.hidden,
            "density": args.density,
            "steps_timed": args.steps - 1 - args.warmup,
            "recipe_ms_per_step": round(recipe_ms, 3),
            "plain_ms_per_step": round(plain_ms, 3),
            "ratio": round(recipe_ms / plain_ms, 4),
            "per_round_ratios": [round(r / p, 3) for r, p in zip(recipe, plain)],
            # CPU time of this process per step (all its threads): on a busy machine, steadier than wall time
            "recipe_cpu_ms_per_step": round(1e3 * statistics.median(recipe_cpu), 3),
            "plain_cpu_ms_per_step": round(1e3 * statistics.median(plain_cpu), 3),
            "cpu_ratio": round(statistics.median(recipe_cpu) / statistics.median(plain_cpu), 4),
        }
        if averaging:  # validation runs on the averages only once averaging has started
            line["validation_batches"] = args.val_batches
            line["recipe_validation_ms"] = round(1e3 * statistics.median(recipe_val), 2)
            line["plain_validation_ms"] = round(1e3 * statistics.median(plain_val), 2)
            line["validation_ratio"] = round(statistics.median(recipe_val) / statistics.median(plain_val), 4)
            line["recipe_validation_cpu_ms"] = round(1e3 * statistics.median(recipe_val_cpu), 2)
            line["plain_validation_cpu_ms"] = round(1e3 * statistics.median(plain_val_cpu), 2)
            line["validation_cpu_ratio"] = round(
                statistics.median(recipe_val_cpu) / statistics.median(plain_val_cpu), 4
            )
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
