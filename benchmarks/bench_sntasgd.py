"""Cost of one SNTASGD step in averaging mode with masks, next to torch.optim.ASGD and torch.optim.SGD.

Prints one JSON line per device. All optimizers step the same parameters with the same (dense) gradients: the
tensors of the paper's stacked LSTM (embedding 10,000 x 1,500, 2 x 1,500 LSTM, decoder 1,500 -> 10,000, 66.0M
parameters; the six weight matrices masked at density 0.33, biases dense). ``torch.optim.ASGD`` runs with
``t0=0, lambd=0`` (NT-ASGD's averaging phase). The optimizers take turns, one step each per round, so machine noise
hits all alike; the figure is the median over rounds after warm-up.

    python benchmarks/bench_sntasgd.py                     # CPU, and CUDA when available
    python benchmarks/bench_sntasgd.py --scale 0.25        # smaller tensors (quick check)

Target: SNT-ASGD in averaging mode <= 1.15 x torch.optim.ASGD.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lightning_selfish.optim.sntasgd import SNTASGD

VOCAB, HIDDEN, LAYERS, DENSITY = 10_000, 1_500, 2, 0.33


def stacked_lstm_tensors(device: torch.device, scale: float) -> tuple[list[torch.nn.Parameter], list[bool]]:
    """The stacked LSTM's parameters (in model.parameters() order) and whether each one is sparsified."""
    v, h = max(1, round(VOCAB * scale)), max(1, round(HIDDEN * scale))
    shapes: list[tuple[tuple[int, ...], bool]] = [((v, h), True)]
    for _ in range(LAYERS):
        shapes += [((4 * h, h), True), ((4 * h, h), True), ((4 * h,), False), ((4 * h,), False)]
    shapes += [((v, h), True), ((v,), False)]
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g, device=device) * 0.05) for shape, _ in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    return params, [masked for _, masked in shapes]


def time_steps(steppers: dict[str, Callable[[], None]], device: torch.device, rounds: int, warmup: int) -> dict:
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(warmup + rounds):
        for name, step in steppers.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench(device: torch.device, scale: float, rounds: int, warmup: int) -> dict:
    params, masked = stacked_lstm_tensors(device, scale)
    g = torch.Generator(device=device).manual_seed(1)
    masks = {p: torch.rand(p.shape, generator=g, device=device) < DENSITY for p, m in zip(params, masked) if m}
    with torch.no_grad():
        for p, mask in masks.items():
            p.mul_(mask)
    lr, wd = 1e-3, 1.2e-6  # tiny steps: the weights barely move over the rounds, the cost is the same
    sntasgd = SNTASGD(params, lr=lr, weight_decay=wd)
    sntasgd.set_masks(masks)
    sntasgd.start_averaging()
    dense = SNTASGD(params, lr=lr, weight_decay=wd)  # NT-ASGD, no masks
    dense.start_averaging()
    asgd = torch.optim.ASGD(params, lr=lr, t0=0, lambd=0, weight_decay=wd)
    sgd = torch.optim.SGD(params, lr=lr, weight_decay=wd)
    ms = time_steps(
        {"sntasgd_masked": sntasgd.step, "sntasgd_dense": dense.step, "asgd": asgd.step, "sgd": sgd.step},
        device,
        rounds,
        warmup,
    )
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in params),
        "masked_density": DENSITY,
        "ms_per_step": {name: round(value, 2) for name, value in ms.items()},
        "sntasgd_masked_over_asgd": round(ms["sntasgd_masked"] / ms["asgd"], 3),
        "sntasgd_dense_over_asgd": round(ms["sntasgd_dense"] / ms["asgd"], 3),
        "sntasgd_masked_over_sgd": round(ms["sntasgd_masked"] / ms["sgd"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the layer sizes (1.0: the paper's)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        print(json.dumps(bench(device, args.scale, args.rounds, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
