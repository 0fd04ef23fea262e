"""Cost of SelfishSparsityCallback: ms per training step with and without it, and one topology update.

Prints one JSON line. The same LSTM language model (embedding -> nn.LSTM -> linear, SGD, clip 0.25) is trained in
Lightning for a fixed number of steps, dense and sparse in alternation within one process (so machine noise hits
both alike); the step time is the median interval between consecutive ``on_train_batch_end`` calls after warm-up.
The per-step work alone (the step post-hook's re-zeroing) is also timed in isolation, a figure the machine's
noise does not drown. The topology update is timed on the same model and, with ``--paper-update``, on the paper's
66M-parameter stacked LSTM (2 x 1500, vocabulary 10,000), next to the time of one of its epochs (1,328 steps)
estimated from measured steps.

    python benchmarks/bench_callback.py --hidden 200            # CPU target: overhead <= 5 %
    python benchmarks/bench_callback.py --hidden 1500 --device cuda --paper-update   # GPU target: <= 3 %, < 1 %
    python benchmarks/bench_callback.py --hidden 200 --method rigl --threads 1       # any preset of METHODS

With ``--method`` the sparse runs use that preset (SNFS trains with momentum SGD, dense and sparse alike, since its
growth reads the momentum). ``enforce_ms`` is then the preset's per-step work in isolation (the re-zeroing, plus,
for a method that reads gradients, one dense-gradient copy: what a step costs when it precedes an update, or every
step for epoch updates over a loader without a length), and ``update_ms`` one update with the preset's parts.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_selfish import SelfishSparsityCallback, SparseEngine
from lightning_selfish.core.engine import UpdateContext
from lightning_selfish.core.gates import detect_gate_layouts
from lightning_selfish.method.catalogue import METHODS, resolve
from lightning_selfish.method.parts import UpdateAmount


class LSTMLM(pl.LightningModule):
    def __init__(self, vocab: int, hidden: int, layers: int, momentum: float = 0.0) -> None:
        super().__init__()
        self.momentum = momentum
        self.encoder = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=layers)
        self.decoder = nn.Linear(hidden, vocab)
        self.hidden = None

    def training_step(self, batch, batch_idx):
        x, y = batch[0][0].t(), batch[1][0].t()
        if self.hidden is not None:
            self.hidden = tuple(h.detach() for h in self.hidden)
        out, self.hidden = self.rnn(self.encoder(x), self.hidden)
        return nn.functional.cross_entropy(self.decoder(out).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0, weight_decay=1.2e-6, momentum=self.momentum)


class StepTimer(pl.Callback):
    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def step_ms(args, sparse: bool, seed: int) -> float:
    pl.seed_everything(seed, verbose=False)
    model = LSTMLM(args.vocab, args.hidden, args.layers, momentum=momentum_of(args.method))
    tokens = torch.randint(0, args.vocab, (args.steps, args.batch, args.bptt + 1))
    loader = DataLoader(TensorDataset(tokens[:, :, :-1], tokens[:, :, 1:]), batch_size=1)
    timer = StepTimer(args.device)
    callbacks = [timer]
    if sparse:
        callbacks.insert(0, SelfishSparsityCallback(sparsity=1 - args.density, method=args.method, seed=seed))
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.25,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    gaps = [b - a for a, b in zip(timer.stamps[args.warmup :], timer.stamps[args.warmup + 1 :])]
    return 1e3 * statistics.median(gaps)


def momentum_of(method: str) -> float:
    return 0.9 if resolve(method, 0.5).reads_momentum else 0.0


def sparse_engine(
    vocab: int, hidden: int, layers: int, density: float, device: str, method: str = "selfish"
) -> tuple[SparseEngine, LSTMLM, torch.optim.Optimizer]:
    config = resolve(method, 1 - density)
    model = LSTMLM(vocab, hidden, layers, momentum=momentum_of(method)).to(device)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    gen = torch.Generator(device=device).manual_seed(0)
    layouts = detect_gate_layouts(model)
    engine = SparseEngine.initialize(params, 1 - density, gen, config.init, layouts, config.gate_redistribution)
    optimizer = model.configure_optimizers()
    engine.attach(optimizer, mask_state=not config.reads_momentum, grown_state=config.grown_optimizer_state)
    for p in model.parameters():  # one step, so that momentum and gradients exist
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return engine, model, optimizer


def enforce_ms(
    vocab: int, hidden: int, layers: int, density: float, device: str, method: str = "selfish", repeats: int = 50
) -> float:
    """The per-step work of the callback alone: the step post-hook's re-zeroing, and for a method that reads the
    dense gradient one copy of it (the cost of a step before an update, or of every step over an unsized loader)."""
    engine, model, optimizer = sparse_engine(vocab, hidden, layers, density, device, method)
    copies = resolve(method, 1 - density).reads_gradient
    buffers = engine.copy_dense_gradients_(None) if copies else None
    engine.enforce_after_step_(optimizer)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        if copies:
            buffers = engine.copy_dense_gradients_(buffers)
        engine.enforce_after_step_(optimizer)
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def update_ms(
    vocab: int, hidden: int, layers: int, density: float, device: str, method: str = "selfish", repeats: int = 3
) -> float:
    config = resolve(method, 1 - density)
    engine, _, optimizer = sparse_engine(vocab, hidden, layers, density, device, method)
    gen = torch.Generator(device=device).manual_seed(1)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        to_target = config.schedule.prunes_to_target
        amount = UpdateAmount(0.0 if to_target else max(config.prune_rate, 0.5), density if to_target else None)
        engine.update(amount, config, UpdateContext(gen, [optimizer], threshold=config.threshold))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--density", type=float, default=0.33)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="dense/sparse alternations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--paper-update", action="store_true", help="also time an update of the 66M stacked LSTM")
    parser.add_argument("--method", default="selfish", choices=list(METHODS), help="the sparse runs' preset")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    dense, sparse = [], []
    for round_ in range(args.rounds):  # alternate which goes first, so drift hits both alike
        for is_sparse in (False, True) if round_ % 2 == 0 else (True, False):
            (sparse if is_sparse else dense).append(step_ms(args, sparse=is_sparse, seed=round_))
    dense_ms, sparse_ms = statistics.median(dense), statistics.median(sparse)
    result = {
        "benchmark": "selfish_sparsity_callback",
        "method": args.method,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "model": {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "batch": args.batch,
            "bptt": args.bptt,
        },
        "density": args.density,
        "dense_ms_per_step": round(dense_ms, 3),
        "sparse_ms_per_step": round(sparse_ms, 3),
        "overhead_ratio": round(sparse_ms / dense_ms, 4),
        "per_round_ratios": [round(s / d, 3) for s, d in zip(sparse, dense)],
        "enforce_ms": round(
            enforce_ms(args.vocab, args.hidden, args.layers, args.density, args.device, args.method), 3
        ),
        "update_ms": round(update_ms(args.vocab, args.hidden, args.layers, args.density, args.device, args.method), 2),
    }
    if args.paper_update:
        paper_update = update_ms(10000, 1500, 2, 0.33, args.device, args.method)
        result["paper_update_ms"] = round(paper_update, 1)
        if args.hidden == 1500 and args.vocab == 10000 and args.layers == 2:
            epoch_ms = dense_ms * 1328
            result["paper_epoch_ms_estimate"] = round(epoch_ms, 1)
            result["paper_update_fraction_of_epoch"] = round(paper_update / epoch_ms, 5)
    result["enforce_fraction_of_dense_step"] = round(result["enforce_ms"] / dense_ms, 5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
