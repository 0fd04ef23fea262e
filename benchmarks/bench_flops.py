"""Cost of FlopsCallback: the per-batch hook alone, and one recount of the costs after a topology update.

Prints one JSON line. The per-batch work (``on_train_batch_start``: add the batch's token count) is timed in
isolation over many calls; the recount after an update (``on_topology_update``: one ``count_nonzero`` per mask) is
timed on the paper's stacked LSTM (2 x 1500, vocabulary 10,000).

    python benchmarks/bench_flops.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from types import SimpleNamespace

import torch

from lightning_selfish import SelfishSparsityCallback
from lightning_selfish.callbacks.flops import FlopsCallback
from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.types import UpdateStats
from lightning_selfish_recipes.models import StackedLSTM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = StackedLSTM()  # the paper's 66M-parameter model
    sparsity = SelfishSparsityCallback(sparsity=0.67, seed=0)
    params = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    sparsity.engine = SparseEngine.initialize(params, 0.67, torch.Generator().manual_seed(0))
    flops = FlopsCallback()
    trainer = SimpleNamespace(callbacks=[sparsity], world_size=1)
    flops.on_fit_start(trainer, model)
    batch = (torch.zeros(35, 20, dtype=torch.long), torch.zeros(700, dtype=torch.long), 35)

    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(args.calls):
            flops.on_train_batch_start(trainer, model, batch, i)
        timings.append((time.perf_counter() - start) / args.calls)
    per_batch_us = statistics.median(timings) * 1e6

    stats = UpdateStats(0.5, {}, {}, {}, {})
    recounts = []
    for _ in range(5):
        start = time.perf_counter()
        flops.on_topology_update(trainer, model, sparsity.engine, stats)
        recounts.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "benchmark": "flops_callback",
                "per_batch_hook_us": round(per_batch_us, 3),
                "recount_after_update_ms": round(statistics.median(recounts) * 1e3, 3),
                "model": "stacked LSTM 2x1500, vocab 10000 (66M parameters)",
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
