"""``selfish-rnn generate SOURCE``: sample text from a trained model, dense and sparse, and time both.

::

    selfish-rnn generate lightning_logs/stacked_lstm_ptb/<label>/version_0 --words 100
    selfish-rnn generate model.compressed.pt --inference sparse --temperature 0.8

``SOURCE`` is a checkpoint, a run's version directory or an export (:mod:`lightning_selfish_recipes.tools.export`). The
network samples one word at a time (batch 1), the way a language model generates; the sparse network is
:func:`lightning_selfish_recipes.inference.sparse_network` at batch 1, one step per call. Both run the same loop from
the same seed (``--rounds`` alternated rounds, after ``--warmup`` words) on ``--threads`` threads, and the command
prints the sampled text, the words per second of each and whether they sampled the same words (they compute the same
probabilities up to float rounding, so they do unless a draw falls within rounding of a boundary).

PyTorch's CPU ``nn.LSTM`` goes through oneDNN, which re-packs the weights on every call: about 10 times slower
than without it when called once per word. The dense baseline here runs without oneDNN
(``torch.backends.mkldnn.flags(enabled=False, allow_tf32=None)``: ``allow_tf32=None`` leaves oneDNN's TF32 flag
alone, which torch 2.13 warns about whenever it is set), the faster of the two, so the speed-up is the sparse
kernels' own.
The command names the CPU and what the per-tensor choice rested on (the crossover table measured now, cached from
an earlier measurement on this machine, given, or assumed). When nothing was converted the two networks are the
same and no ratio is printed; otherwise the ratio of the medians and the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_selfish.inference import cpu_name, sparse_inference_basis, sparse_inference_report
from lightning_selfish_recipes.inference import sparse_network
from lightning_selfish_recipes.tools.export import ExportError, load_network
from lightning_selfish_recipes.tools.options import positive_int

__all__ = ["generate", "main", "sample_words"]


@torch.no_grad()
def sample_words(network: nn.Module, words: int, start: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
    """``words`` word ids sampled one at a time from ``network`` (batch 1), starting after word ``start``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = network.init_hidden(1)
    token = torch.full((1, 1), start, dtype=torch.long)
    out: list[int] = []
    for _ in range(words):
        result = network(token, hidden)
        hidden = result.hidden
        probs = torch.softmax(result.log_probs[-1] / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).view(1, 1)
        out.append(int(token))
    return out


def _timed(network: nn.Module, words: int, start: int, temperature: float, seed: int) -> tuple[list[int], float]:
    begin = time.perf_counter()
    ids = sample_words(network, words, start, temperature, seed)
    return ids, words / (time.perf_counter() - begin)


def generate(
    source: str | Path,
    words: int = 100,
    temperature: float = 1.0,
    seed: int = 0,
    inference: str = "both",
    rounds: int = 2,
    warmup: int = 5,
    threads: int = 1,
    choose: str = "crossover",
) -> dict[str, Any]:
    """Sample ``words`` words dense and/or sparse; returns the text, words per second and the sparse choices."""
    if inference not in ("both", "dense", "sparse"):
        raise ValueError(f"inference must be 'both', 'dense' or 'sparse', got {inference!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    loaded = load_network(source)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _compare(loaded, words, temperature, seed, inference, rounds, warmup, threads, choose)
    finally:
        torch.set_num_threads(previous_threads)


def _compare(loaded, words, temperature, seed, inference, rounds, warmup, threads, choose) -> dict[str, Any]:
    dense = loaded.network
    vocabulary = loaded.vocabulary
    ntoken = getattr(dense, "ntoken", None)
    start = vocabulary.index("<eos>") if vocabulary and "<eos>" in vocabulary else 0
    networks: dict[str, nn.Module] = {}
    if inference in ("both", "dense"):
        networks["dense"] = dense
    if inference in ("both", "sparse"):
        networks["sparse"] = sparse_network(dense, batch_size=1, steps=1, choose=choose)
    speeds: dict[str, list[float]] = {name: [] for name in networks}
    ids: dict[str, list[int]] = {}
    with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
        for network in networks.values():
            sample_words(network, warmup, start, temperature, seed)
        for _ in range(rounds):
            for name, network in networks.items():
                ids[name], speed = _timed(network, words, start, temperature, seed)
                speeds[name].append(speed)
    shown = ids.get("sparse", ids.get("dense", []))
    result: dict[str, Any] = {
        "source": str(loaded.source),
        "text": " ".join(vocabulary[i] if vocabulary and i < len(vocabulary) else f"<{i}>" for i in shown),
        "words_per_second": {name: statistics.median(values) for name, values in speeds.items()},
        "words_per_second_rounds": speeds,
        "threads": threads,
        "ntoken": ntoken,
        "cpu": cpu_name(),
    }
    if "sparse" in networks:
        report = sparse_inference_report(networks["sparse"])
        result["csr_tensors"] = [c.name for c in report if c.sparse]  # (every sparse format, as before)
        result["dense_tensors"] = [c.name for c in report if not c.sparse]
        result["formats"] = {c.name: c.format for c in report}
        result["basis"] = sparse_inference_basis(networks["sparse"])
    if len(ids) == 2:
        result["same_words"] = ids["dense"] == ids["sparse"]
        result["same_network"] = not result["csr_tensors"]
        if not result["same_network"]:
            ratios = [s / d for s, d in zip(speeds["sparse"], speeds["dense"])]
            result["speedup"] = result["words_per_second"]["sparse"] / result["words_per_second"]["dense"]
            result["speedup_range"] = (min(ratios), max(ratios))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfish-rnn generate",
        description="Sample text one word at a time from a trained model (a checkpoint, a run directory or an "
        "export), dense and with sparse CPU kernels, and compare their words per second.",
    )
    parser.add_argument("source", type=Path, help="a checkpoint, a run's version directory or an export")
    parser.add_argument("--words", type=positive_int, default=100, help="words to sample per round (default 100)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same for dense and sparse)")
    parser.add_argument(
        "--inference", choices=("both", "dense", "sparse"), default="both", help="which models to run (default both)"
    )
    parser.add_argument("--rounds", type=positive_int, default=2, help="alternated timed rounds (default 2)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed words sampled first by each model")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--choose",
        choices=("crossover", "measure", "csr", "csr16", "bitmask"),
        default="crossover",
        help="the format per tensor: by this machine's crossover table (measured on first use, cached), timed on "
        "each tensor, or one format for every weight",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """``selfish-rnn generate SOURCE [--words N] ...``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    try:
        result = generate(
            args.source,
            words=args.words,
            temperature=args.temperature,
            seed=args.seed,
            inference=args.inference,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            choose=args.choose,
        )
    except (ExportError, FileNotFoundError, ValueError) as error:
        print(f"selfish-rnn generate: error: {error}", file=sys.stderr)
        return 2
    print(result["text"])
    speeds = result["words_per_second"]
    line = ", ".join(f"{name} {value:.1f} words/s" for name, value in speeds.items())
    print(f"\n{line} ({result['threads']} thread{'s' if result['threads'] > 1 else ''}, batch 1)", file=sys.stderr)
    print(f"CPU: {result['cpu']}", file=sys.stderr)
    if "same_network" in result:
        same = "the same words" if result["same_words"] else "different words (float rounding at a draw)"
        if result["same_network"]:
            print("sparse / dense: nothing was converted, the two are the same network (no speed-up)", file=sys.stderr)
        else:
            low, high = result["speedup_range"]
            rounds = len(result["words_per_second_rounds"]["dense"])
            print(
                f"sparse / dense: {result['speedup']:.2f}x (median of {rounds} rounds; per round {low:.2f}x to "
                f"{high:.2f}x); {same}",
                file=sys.stderr,
            )
    if "formats" in result:
        total = len(result["formats"])
        sparse = {name: f for name, f in result["formats"].items() if f != "dense"}
        print(f"sparse formats: {len(sparse)} of {total} weight tensors {sparse}", file=sys.stderr)
        print(f"chosen by: {result['basis']}", file=sys.stderr)
    return 0
