"""One topology update of the paper's 66M-parameter stacked LSTM, against the previous host-side implementation.

Prints one JSON line. The model is the stacked LSTM of Table 4 (embedding 10,000 x 1,500, 2 x 1,500 ``nn.LSTM``,
decoder 1,500 -> 10,000) at density 0.33 with cell-gate redistribution, on ``--device``; the update removes and
regrows half of the active weights (prune rate 0.5, the largest of the run) with the engine's generator on the
parameters' device. Each round times the library's ``SparseEngine.update`` twice, alternating: as it is, and with the
previous selections swapped into its registries (``topk`` over every element for removal, a CPU ``randperm`` over
every inactive position for growth); the figures are medians over rounds.

    python benchmarks/bench_update.py --threads 1        # CPU target: <= 2.37 s (a third of the previous 7.1 s)
    python benchmarks/bench_update.py --device cuda      # GPU target: <= 0.1 s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time

import torch
from torch import nn

from lightning_selfish import SparseEngine
from lightning_selfish.core.engine import UpdateContext
from lightning_selfish.core.gates import detect_gate_layouts
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.parts import Growth, Removal, UpdateAmount


def previous_strategies(cpu_generator: torch.Generator) -> tuple:
    """Removal and growth as they were before device-side growth (for timing only): a ``topk`` over every element
    for removal, a CPU ``randperm`` over every inactive position for growth, copied to the device."""

    def removal(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        kept = mask.clone()
        if n > 0:
            scores = weight.detach().abs().masked_fill(~mask, math.inf).flatten()
            kept.view(-1)[torch.topk(scores, n, largest=False, sorted=False).indices] = False
        return kept

    def growth(mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        grown = mask.clone()
        if n > 0:
            inactive = (~mask).flatten().nonzero().squeeze(1)
            pick = torch.randperm(inactive.numel(), generator=cpu_generator)[:n].to(inactive.device)
            grown.view(-1)[inactive[pick]] = True
        return grown

    return removal, growth


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--hidden", type=int, default=1_500)
    parser.add_argument("--density", type=float, default=0.33)
    parser.add_argument("--prune-rate", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each: one update of each implementation)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-previous", action="store_true", help="time only the library's update")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "encoder": nn.Embedding(args.vocab, args.hidden),
            "rnn": nn.LSTM(args.hidden, args.hidden, 2),
            "decoder": nn.Linear(args.hidden, args.vocab),
        }
    ).to(device)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    engine = SparseEngine.initialize(params, 1 - args.density, generator, "uniform", detect_gate_layouts(model))
    sync(device)
    init_s = time.perf_counter() - start
    removal, growth = previous_strategies(torch.Generator().manual_seed(1))
    ours, previous = [], []
    ours_method = resolve("selfish", 1 - args.density)
    previous_method = dataclasses.replace(
        ours_method,
        removal=Removal("magnitude", removal),
        growth=Growth("random", growth, reads="generator"),
    )
    for _ in range(args.repeats):  # the same engine.update, with the current and the previous selections
        sync(device)
        start = time.perf_counter()
        engine.update(UpdateAmount(args.prune_rate), ours_method, UpdateContext(generator))
        sync(device)
        ours.append(time.perf_counter() - start)
        if not args.no_previous:
            start = time.perf_counter()
            engine.update(UpdateAmount(args.prune_rate), previous_method, UpdateContext(generator))
            sync(device)
            previous.append(time.perf_counter() - start)
    line = {
        "benchmark": "topology_update",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsified": sum(p.numel() for p in params.values()),
        "density": args.density,
        "prune_rate": args.prune_rate,
        "init_s": round(init_s, 3),
        "update_s": round(statistics.median(ours), 4),
        "per_round_s": [round(t, 4) for t in ours],
    }
    if previous:
        line["previous_update_s"] = round(statistics.median(previous), 4)
        line["speedup_vs_previous"] = round(statistics.median(previous) / statistics.median(ours), 2)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
