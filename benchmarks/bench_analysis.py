"""Cost of the topology analyses on the paper's 2 x 1500 stacked LSTM: seconds per comparison. Prints one JSON line.

Random masks at the paper's sparsity (0.67) for the four recurrent tensors (``weight_ih``/``weight_hh`` of two
layers, 6000 x 1500 each) and random activations of the 1500 units of each layer (and of the 1500 input features):

* ``mask_distance_s``: the unaligned distance of all four tensors, per tensor and per gate;
* ``correlation_s``: the unit-by-unit correlation of the three unit groups over ``--samples`` activations and the
  semi-matching in both directions (the activations themselves come from a forward pass, not timed here);
* ``aligned_distance_s``: the aligned distance of all four tensors given those matchings;
* ``pairwise_s``: the all-pairs unit edit distance of one tensor by one matrix product (the data-free alignment);
* ``monitor_update_s``: what ``TopologyMonitor`` adds to one topology update of the whole 66M-parameter model
  (embedding and decoder 10000 x 1500 too): the ever-active union, the exploration/drift report, the count of
  weights above 0.1 and the four mask pictures.

    python benchmarks/bench_analysis.py                      # CPU
    python benchmarks/bench_analysis.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lightning_selfish import analysis
from lightning_selfish.analysis import plots


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=20_000, help="activation samples (tokens) per unit")
    parser.add_argument("--sparsity", type=float, default=0.67)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, device = args.units, args.device
    gates = [(g, slice(k * h, (k + 1) * h)) for k, g in enumerate("ifgo")]
    g = torch.Generator().manual_seed(0)

    def masks():
        return {
            f"{kind}{layer}": (torch.rand(4 * h, h, generator=g) >= args.sparsity).to(device)
            for layer in range(2)
            for kind in ("ih", "hh")
        }

    a, b = masks(), masks()
    acts = {name: torch.randn(args.samples, h, generator=g).to(device) for name in ("input", "l0", "l1")}
    acts_b = {name: x + 0.5 * torch.randn(x.shape, generator=g).to(device) for name, x in acts.items()}
    groups = {"ih0": ("l0", "input"), "hh0": ("l0", "l0"), "ih1": ("l1", "l0"), "hh1": ("l1", "l1")}

    mask_s = timed(lambda: [analysis.mask_distance(a[n], b[n], gates) for n in a], device)
    matches = {}

    def correlate():
        for name in acts:
            corr = analysis.correlation_matrix(acts[name], acts_b[name])
            matches[name] = (analysis.semi_matching(corr), analysis.semi_matching(corr.T))

    corr_s = timed(correlate, device)

    def aligned():
        for name, (rows, cols) in groups.items():
            analysis.topology_distance(
                a[name],
                b[name],
                gates,
                rows_ab=matches[rows][0],
                cols_ab=matches[cols][0],
                rows_ba=matches[rows][1],
                cols_ba=matches[cols][1],
            )

    aligned_s = timed(aligned, device)
    pairwise_s = timed(
        lambda: analysis.pairwise_edit_distance(
            analysis.unit_view(a["hh0"], gates), analysis.unit_view(b["hh0"], gates)
        ),
        device,
    )
    full = {**a, "encoder": torch.rand(10_000, h, generator=g).to(device) >= args.sparsity}
    full["decoder"] = torch.rand(10_000, h, generator=g).to(device) >= args.sparsity
    ever = {name: mask.clone() for name, mask in full.items()}
    weights = {name: torch.randn(mask.shape, generator=g).to(device) * 0.1 for name, mask in full.items()}

    def monitor_update():
        for name, mask in full.items():
            ever[name] |= mask
        analysis.exploration_report(ever, full, full, {n: gates for n in a})
        analysis.magnitude_above(weights, 0.1)
        for name in a:
            plots.mask_density_image(full[name], gates)

    monitor_s = timed(monitor_update, device)
    print(
        json.dumps(
            {
                "units": h,
                "samples": args.samples,
                "device": device,
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "mask_distance_s": round(mask_s, 3),
                "correlation_s": round(corr_s, 3),
                "aligned_distance_s": round(aligned_s, 3),
                "pairwise_s": round(pairwise_s, 3),
                "monitor_update_s": round(monitor_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
