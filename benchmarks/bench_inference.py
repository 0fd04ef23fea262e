"""Sparse inference and export of the paper's stacked LSTM: dense vs CSR per word (batch 1) and per window (batch 20).

Prints JSON lines, one per measurement. The model is Table 4's stacked LSTM (embedding 10,000 x 1,500, 2 x 1,500
``nn.LSTM``, decoder 1,500 -> 10,000) with every 2-D weight masked uniformly at random to each ``--densities``
(the trained masks' density per tensor; their pattern is unstructured like these). The parts:

* ``kernel``: one 6000 x 1500 weight (an LSTM layer's stacked gates) times ``rows`` rows: dense, CSR with 32-bit
  indices (ours), CSR with torch's default 64-bit indices, BSR with ``--bsr-blocks``; on CUDA also cuSPARSE CSR and
  2:4 semi-structured (fp16, rows padded to what the kernel needs; the weight is re-pruned to 2:4, which our
  unstructured masks are not: a speed reference only). The ``crossover`` lines give, per ``rows``, the largest
  density at which CSR (32-bit) still beat dense: the data of ``lightning_selfish.inference.CPU_CROSSOVER``.
* ``generation``: words per second sampling one word at a time (batch 1), the same loop for every model from the
  same seed, after ``--warmup`` words, ``--rounds`` rounds alternated A/B: ``dense`` (PyTorch's ``nn.LSTM`` without
  oneDNN, the faster dense), ``dense_onednn`` (PyTorch's default CPU path, which re-packs the LSTM weights on every
  call), ``sparse`` (``to_sparse`` with the crossover table) and ``sparse_all_csr`` (every weight CSR).
* ``evaluation``: tokens per second over 35-step windows at batch 20, the same four models (the conversion is
  made for batch 20 and 35 steps);
* ``export``: bytes of the dense and the compressed export (``lightning_selfish.export``) at each density, and
  whether the compressed file loads back exactly (``torch.equal``).

Each part runs at every ``--threads`` count (default ``1`` and all cores). On CUDA (``--device cuda``) the models
are timed on the GPU: ``dense`` is cuDNN and ``sparse`` is ``to_sparse(choose="measure")`` (cuSPARSE where faster).

    python benchmarks/bench_inference.py                      # CPU, 1 thread and all threads (about 10 minutes)
    python benchmarks/bench_inference.py --parts kernel --threads 1
    python benchmarks/bench_inference.py --device cuda
    python benchmarks/bench_inference.py --quick              # tiny sizes: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_selfish.inference import (
    CPU_CROSSOVER,
    BitmaskMatrix,
    cpu_name,
    csr_matrix,
    load_kernels,
    sparse_inference_basis,
    sparse_inference_report,
    to_sparse,
)
from lightning_selfish_recipes.models import StackedLSTM

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*semi-structured.*")


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(functions: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds, the functions alternated within every round."""
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            sync(device)
            start = time.perf_counter()
            function()
            sync(device)
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def masked_weight(shape: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator)
    return weight * (torch.rand(shape, generator=generator) < density)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


def kernel_part(args: argparse.Namespace, device: torch.device, threads: int) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (4 * args.hidden, args.hidden)
    for rows in args.rows:
        best_density = previous = None
        for density in sorted(args.kernel_densities):
            weight = masked_weight(shape, density, generator).to(device)
            x = torch.randn(rows, shape[1], device=device)
            xt = x.t().contiguous()
            formats: dict[str, Callable[[], None]] = {"dense": lambda w=weight, x=x: torch.nn.functional.linear(x, w)}
            formats["csr"] = csr_product(csr_matrix(weight), x, xt)
            if device.type == "cpu":
                formats["csr_int64"] = csr_product(weight.to_sparse_csr(), x, xt)
                for block in args.bsr_blocks if rows <= args.bsr_max_rows else ():  # (BSR is slow on the CPU)
                    if shape[0] % block or shape[1] % block:
                        continue  # (the blocks must tile the matrix)
                    bsr = weight.to_sparse_bsr((block, block))
                    formats[f"bsr{block}"] = lambda b=bsr, xt=xt: b @ xt
            semi = semi_structured(weight, rows, x) if device.type == "cuda" else None
            if isinstance(semi, str):
                emit(part="kernel", skipped="2:4 semi-structured", reason=semi, device=device.type)
            elif semi is not None:
                formats["dense_fp16"], formats["semi_structured_2_4"] = semi
            with torch.no_grad():
                repeats = {}
                for name, function in formats.items():
                    for _ in range(args.warmup_calls):
                        function()
                    once = alternate({name: function}, 1, device)[name]
                    repeats[name] = max(1, min(args.kernel_repeats, round(args.kernel_min_ms / 1e3 / once)))
                timed = alternate({k: _repeat(f, repeats[k]) for k, f in formats.items()}, args.rounds, device)
            ms = {k: round(v / repeats[k] * 1e3, 4) for k, v in timed.items()}
            speedup = {k: round(ms["dense"] / v, 3) for k, v in ms.items() if k != "dense"}
            if ms["csr"] < ms["dense"] and best_density == previous:  # CSR won at every density up to this one
                best_density = density
            previous = density
            emit(
                part="kernel",
                shape=list(shape),
                rows=rows,
                density=density,
                threads=threads,
                device=device.type,
                ms=ms,
                speedup_vs_dense=speedup,
            )
        emit(part="crossover", rows=rows, threads=threads, device=device.type, csr_faster_up_to_density=best_density)


def csr_product(matrix: torch.Tensor, x: torch.Tensor, xt: torch.Tensor) -> Callable[[], None]:
    """The product as ``SparseLinear`` runs it: a matrix-vector product for one row, else sparse @ dense."""
    if x.size(0) == 1:
        return lambda: torch.mv(matrix, x[0])
    return lambda: matrix @ xt


def _repeat(function: Callable[[], None], repeats: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(repeats):
            function()

    return run


def semi_structured(weight: torch.Tensor, rows: int, x: torch.Tensor):
    """(dense fp16, 2:4 fp16) products on CUDA, or the reason they cannot run. The weight is re-pruned to 2:4 (keep
    the 2 largest of every 4 along a row) and zero-padded to multiples of 64 rows and columns, the input to 8 (fp16)
    columns and to the padded width: the padding the kernel needs, included in its time."""
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as error:
        return f"torch.sparse.to_sparse_semi_structured unavailable: {error}"
    out_features, in_features = weight.shape
    padded_rows, padded_cols = -(-out_features // 64) * 64, -(-in_features // 64) * 64
    w = torch.zeros(padded_rows, padded_cols, dtype=torch.float16, device=weight.device)
    w[:out_features, :in_features] = weight.half()
    groups = w.view(padded_rows, padded_cols // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    pruned = torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).view_as(w)
    columns = max(8, -(-rows // 8) * 8)
    xt = torch.zeros(padded_cols, columns, dtype=torch.float16, device=weight.device)
    xt[:in_features, :rows] = x.t().half()
    try:
        sparse = to_sparse_semi_structured(pruned)
        sparse @ xt
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {str(error)[:200]}"
    return (lambda: pruned @ xt), (lambda: sparse @ xt)


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, density: float, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = StackedLSTM(ntoken=args.vocab, ninp=args.hidden, nhid=args.hidden, nlayers=2).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(torch.rand(param.shape, generator=generator) < density)
    return model.to(device)


@torch.no_grad()
def sample(model: nn.Module, words: int, seed: int, device: torch.device) -> list[int]:
    """The generation loop (the same for every model): one word per call, batch 1."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = model.init_hidden(1)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    out = []
    for _ in range(words):
        result = model(token, hidden)
        hidden = result.hidden
        token = torch.multinomial(result.log_probs[-1].exp(), 1, generator=generator).view(1, 1)
        out.append(token)
    return [int(t) for t in out]


def onednn(enabled: bool, function: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with torch.backends.mkldnn.flags(enabled=enabled, allow_tf32=None):
            function()

    return run


def generation_part(args: argparse.Namespace, device: torch.device, threads: int) -> None:
    for density in args.densities:
        dense = build_model(args, density, device)
        choose = "measure" if device.type == "cuda" else "crossover"
        models = {
            "dense": dense,
            "sparse": to_sparse(dense, batch_size=1, steps=1, choose=choose),
            "sparse_all_csr": to_sparse(dense, batch_size=1, steps=1, choose="sparse"),
        }
        report = sparse_inference_report(models["sparse"])
        runs = {name: onednn(False, lambda m=m: sample(m, args.words, 0, device)) for name, m in models.items()}
        if device.type == "cpu":
            runs["dense_onednn"] = onednn(True, lambda m=dense: sample(m, args.onednn_words, 0, device))
        for name in runs:  # warm-up
            with torch.backends.mkldnn.flags(enabled=name == "dense_onednn", allow_tf32=None):
                sample(models.get(name, dense), args.warmup, 0, device)
        seconds = alternate(runs, args.rounds, device)
        words = {name: (args.onednn_words if name == "dense_onednn" else args.words) for name in runs}
        per_second = {name: round(words[name] / s, 2) for name, s in seconds.items()}
        with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
            same = sample(dense, args.words, 0, device) == sample(models["sparse"], args.words, 0, device)
        emit(
            part="generation",
            density=density,
            batch=1,
            threads=threads,
            device=device.type,
            words_per_second=per_second,
            sparse_vs_dense=round(per_second["sparse"] / per_second["dense"], 3),
            sparse_all_csr_vs_dense=round(per_second["sparse_all_csr"] / per_second["dense"], 3),
            same_words=same,
            csr_tensors=[c.name for c in report if c.sparse],
        )


def evaluation_part(args: argparse.Namespace, device: torch.device, threads: int) -> None:
    batch, steps = args.eval_batch, args.bptt
    for density in args.densities:
        dense = build_model(args, density, device)
        choose = "measure" if device.type == "cuda" else "crossover"
        models = {
            "dense": dense,
            "sparse": to_sparse(dense, batch_size=batch, steps=steps, choose=choose),
            "sparse_all_csr": to_sparse(dense, batch_size=batch, steps=steps, choose="sparse"),
        }
        report = sparse_inference_report(models["sparse"])
        tokens = torch.randint(0, args.vocab, (steps, batch), generator=torch.Generator().manual_seed(2)).to(device)
        hidden = dense.init_hidden(batch)

        def window(model: nn.Module, tokens: torch.Tensor = tokens, hidden=hidden) -> Callable[[], None]:
            return lambda: model(tokens, hidden)

        runs = {name: onednn(False, window(m)) for name, m in models.items()}
        if device.type == "cpu":
            runs["dense_onednn"] = onednn(True, window(dense))
        with torch.no_grad():
            for run in runs.values():
                run()
            seconds = alternate(runs, args.rounds, device)
            with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
                error = (dense(tokens, hidden).log_probs - models["sparse"](tokens, hidden).log_probs).abs().max()
        per_second = {name: round(batch * steps / s, 1) for name, s in seconds.items()}
        emit(
            part="evaluation",
            density=density,
            batch=batch,
            steps=steps,
            threads=threads,
            device=device.type,
            tokens_per_second=per_second,
            sparse_vs_dense=round(per_second["sparse"] / per_second["dense"], 3),
            sparse_all_csr_vs_dense=round(per_second["sparse_all_csr"] / per_second["dense"], 3),
            max_abs_log_prob_difference=float(error),
            csr_tensors=[c.name for c in report if c.sparse],
        )


def export_part(args: argparse.Namespace, device: torch.device, threads: int) -> None:
    """Bytes of the dense and the compressed export at each density, and whether the round trip is exact."""
    import tempfile
    from pathlib import Path

    from lightning_selfish.export import (
        compress_state_dict,
        compressed_sizes,
        load_compressed,
        masked_state_dict,
        save_compressed,
        save_dense,
    )

    for density in args.densities:
        model = build_model(args, 1.0, torch.device("cpu"))
        generator = torch.Generator().manual_seed(1)
        masks = {
            name: torch.rand(p.shape, generator=generator) < density
            for name, p in model.named_parameters()
            if p.dim() == 2
        }
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            dense = save_dense(model, masks, Path(directory) / "dense.pt")
            middle = time.perf_counter()
            compressed = save_compressed(model, masks, Path(directory) / "compressed.pt")
            end = time.perf_counter()
            loaded = load_compressed(compressed)
            load_s = time.perf_counter() - end
            reference = torch.load(dense, weights_only=True)
            exact = list(reference) == list(loaded.state_dict) and all(
                torch.equal(value, loaded.state_dict[key]) for key, value in reference.items()
            )
            sizes = compressed_sizes(compress_state_dict(masked_state_dict(model, masks), masks))
            emit(
                part="export",
                density=density,
                dense_file_bytes=dense.stat().st_size,
                compressed_file_bytes=compressed.stat().st_size,
                file_ratio=round(compressed.stat().st_size / dense.stat().st_size, 4),
                masked_tensors_ratio=round(
                    sizes["masked_tensors_compressed_bytes"] / sizes["masked_tensors_dense_bytes"], 4
                ),
                exact_round_trip=exact,
                save_dense_s=round(middle - start, 2),
                save_compressed_s=round(end - middle, 2),
                load_compressed_s=round(load_s, 2),
                **sizes,
            )


# ----------------------------------------------------------------------------------------------------------------
# the targets, side by side
# ----------------------------------------------------------------------------------------------------------------


def interleaved(functions: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, float]]:
    """Per function: median and range of process CPU time and of wall time over ``rounds`` alternated rounds."""
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    wall: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            function()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {
        name: {
            "cpu_s": statistics.median(cpu[name]),
            "cpu_min_s": min(cpu[name]),
            "cpu_max_s": max(cpu[name]),
            "wall_s": statistics.median(wall[name]),
        }
        for name in functions
    }


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one generated word multiplies (the LSTM's and the decoder's), as the model holds them."""
    from lightning_selfish.inference import SparseLinear, SparseRNN
    from lightning_selfish.inference.formats import weight_bytes

    total = 0
    for module in model.modules():
        if isinstance(module, SparseRNN):
            continue  # (its SparseLinear children are counted)
        if isinstance(module, SparseLinear):
            total += weight_bytes(module.weight)
        elif isinstance(module, (nn.LSTM, nn.Linear)):
            total += sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "weight" in n)
    return total


def targets_part(args: argparse.Namespace, device: torch.device, threads: int) -> None:
    """Generation (batch 1) at each density and evaluation (20 x 35) at 0.33 against the fastest dense path."""
    for density in args.densities:
        dense = build_model(args, density, device)
        models = {"sparse": to_sparse(dense, batch_size=1, steps=1)}
        if load_kernels() is not None:
            models["all_bitmask"] = to_sparse(dense, batch_size=1, steps=1, choose="bitmask")
            models["all_csr16"] = to_sparse(dense, batch_size=1, steps=1, choose="csr16")
        # the previous release's choice (one Intel table, torch CSR with 32-bit indices): a regression check
        models["cpu_crossover_csr"] = to_sparse(dense, batch_size=1, steps=1, crossover=CPU_CROSSOVER)
        runs = {
            "dense_onednn_off": onednn(False, lambda d=dense: sample(d, args.words, 0, device)),
            "dense_onednn_on": onednn(True, lambda d=dense: sample(d, args.onednn_words, 0, device)),
        }
        runs.update({name: onednn(False, lambda m=m: sample(m, args.words, 0, device)) for name, m in models.items()})
        for run in runs.values():
            run()  # warm-up (and the oneDNN packing)
        timed = interleaved(runs, args.rounds)
        words = {name: args.onednn_words if name == "dense_onednn_on" else args.words for name in runs}
        per_word = {name: t["cpu_s"] / words[name] for name, t in timed.items()}
        fastest_dense = min(per_word["dense_onednn_off"], per_word["dense_onednn_on"])
        with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None):
            reference = sample(dense, args.words, 0, device)
            same = {name: sample(m, args.words, 0, device) == reference for name, m in models.items()}
        emit(
            part="targets_generation",
            density=density,
            threads=threads,
            cpu=cpu_name(),
            words_per_second_cpu_time={name: round(1 / v, 2) for name, v in per_word.items()},
            speedup_vs_fastest_dense={
                name: round(fastest_dense / per_word[name], 3) for name in runs if not name.startswith("dense")
            },
            speedup_range_vs_dense_onednn_off={
                name: [
                    round(timed["dense_onednn_off"]["cpu_min_s"] / timed[name]["cpu_max_s"], 3),
                    round(timed["dense_onednn_off"]["cpu_max_s"] / timed[name]["cpu_min_s"], 3),
                ]
                for name in models
            },
            wall_words_per_second={name: round(words[name] / t["wall_s"], 2) for name, t in timed.items()},
            same_words=same,
            weight_bytes_per_word={name: model_weight_bytes(m) for name, m in {"dense": dense, **models}.items()},
            bytes_ratio={
                name: round(model_weight_bytes(m) / model_weight_bytes(dense), 4) for name, m in models.items()
            },
            formats={name: {c.name: c.format for c in sparse_inference_report(m)} for name, m in models.items()},
            basis=sparse_inference_basis(models["sparse"]),
        )
    evaluation_density = args.eval_density
    batch, steps = args.eval_batch, args.bptt
    dense = build_model(args, evaluation_density, device)
    sparse = to_sparse(dense, batch_size=batch, steps=steps)
    tokens = torch.randint(0, args.vocab, (steps, batch), generator=torch.Generator().manual_seed(2))
    hidden = dense.init_hidden(batch)
    runs = {
        "dense_onednn_on": onednn(True, lambda: dense(tokens, hidden)),
        "dense_onednn_off": onednn(False, lambda: dense(tokens, hidden)),
        "sparse": onednn(True, lambda: sparse(tokens, hidden)),
    }
    with torch.no_grad():
        for run in runs.values():
            run()
        timed = interleaved(runs, args.rounds)
        error = (dense(tokens, hidden).log_probs - sparse(tokens, hidden).log_probs).abs().max()
    fastest = min(timed["dense_onednn_on"]["cpu_s"], timed["dense_onednn_off"]["cpu_s"])
    emit(
        part="targets_evaluation",
        density=evaluation_density,
        batch=batch,
        steps=steps,
        threads=threads,
        cpu=cpu_name(),
        tokens_per_second_cpu_time={name: round(batch * steps / t["cpu_s"], 1) for name, t in timed.items()},
        sparse_vs_fastest_dense=round(fastest / timed["sparse"]["cpu_s"], 3),
        sparse_range_vs_dense_onednn_on=[
            round(timed["dense_onednn_on"]["cpu_min_s"] / timed["sparse"]["cpu_max_s"], 3),
            round(timed["dense_onednn_on"]["cpu_max_s"] / timed["sparse"]["cpu_min_s"], 3),
        ],
        max_abs_log_prob_difference=float(error),
        formats={c.name: c.format for c in sparse_inference_report(sparse)},
        basis=sparse_inference_basis(sparse),
    )
    products_part(args, threads)
    bandwidth_part(args, threads)


def products_part(args: argparse.Namespace, threads: int) -> None:
    """One 4H x H weight (and the V x H decoder) at the evaluation's density times the window's rows (batch x bptt)
    and the recurrent product's (batch): dense (both paths) against every sparse format, alternated round by round,
    the calls repeated to ``--kernel-min-ms``; process CPU time, median and range per call."""
    from lightning_selfish.inference.formats import hold, multiply

    kernels = load_kernels()
    generator = torch.Generator().manual_seed(4)
    for shape in ((4 * args.hidden, args.hidden), (args.vocab, args.hidden)):
        weight = masked_weight(shape, args.eval_density, generator)
        formats = ["csr", *(("csr16", "bitmask") if kernels is not None else ())]
        held = {f: hold(weight, f, kernels) for f in formats}
        for rows in (args.eval_batch * args.bptt, args.eval_batch):
            if shape[0] == args.vocab and rows == args.eval_batch:
                continue  # (the decoder multiplies the whole window at once)
            x = torch.randn(rows, shape[1], generator=generator)
            functions: dict[str, Callable[[], None]] = {
                "dense_onednn_off": onednn(False, lambda x=x, w=weight: torch.nn.functional.linear(x, w)),
                "dense_onednn_on": onednn(True, lambda x=x, w=weight: torch.nn.functional.linear(x, w)),
            }
            functions.update({f: lambda h=h, x=x: multiply(h, x) for f, h in held.items()})
            with torch.no_grad():
                for function in functions.values():
                    function()
                once = interleaved(functions, 1)
                repeats = {
                    name: max(1, min(args.kernel_repeats, round(args.kernel_min_ms / 1e3 / max(t["cpu_s"], 1e-6))))
                    for name, t in once.items()
                }
                timed = interleaved({n: _repeat(f, repeats[n]) for n, f in functions.items()}, args.rounds)
            ms = {
                name: [round(t[key] / repeats[name] * 1e3, 3) for key in ("cpu_s", "cpu_min_s", "cpu_max_s")]
                for name, t in timed.items()
            }
            fastest = min(ms["dense_onednn_off"][0], ms["dense_onednn_on"][0])
            emit(
                part="targets_products",
                shape=list(shape),
                rows=rows,
                density=args.eval_density,
                threads=threads,
                cpu=cpu_name(),
                ms_median_min_max=ms,
                speedup_vs_fastest_dense={name: round(fastest / v[0], 3) for name, v in ms.items()},
                isa=kernels.isa() if kernels else None,
            )


def bandwidth_part(args: argparse.Namespace, threads: int) -> None:
    """One 4H x H weight at density 0.33, one row: GB/s of the weight's bytes, dense (both paths) and bit mask."""
    kernels = load_kernels()
    shape = (4 * args.hidden, args.hidden)
    weight = masked_weight(shape, args.eval_density, torch.Generator().manual_seed(3))
    x = torch.randn(shape[1])
    functions: dict[str, Callable[[], None]] = {
        "dense_onednn_off": onednn(False, lambda: torch.mv(weight, x)),
        "dense_onednn_on": onednn(True, lambda: torch.mv(weight, x)),
    }
    sizes = {"dense_onednn_off": weight.numel() * 4, "dense_onednn_on": weight.numel() * 4}
    if kernels is not None:
        bitmask = BitmaskMatrix(weight, kernels)
        functions["bitmask"] = lambda: bitmask.mv(x)
        sizes["bitmask"] = bitmask.nbytes
    repeat = {name: _repeat(f, args.kernel_repeats) for name, f in functions.items()}
    for f in repeat.values():
        f()
    timed = interleaved(repeat, args.rounds)
    ms = {name: t["cpu_s"] / args.kernel_repeats * 1e3 for name, t in timed.items()}
    emit(
        part="targets_bandwidth",
        shape=list(shape),
        density=args.eval_density,
        threads=threads,
        cpu=cpu_name(),
        ms=ms and {k: round(v, 4) for k, v in ms.items()},
        weight_mb={k: round(v / 1e6, 2) for k, v in sizes.items()},
        gb_per_s={name: round(sizes[name] / (ms[name] / 1e3) / 1e9, 2) for name in ms},
        isa=kernels.isa() if kernels else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", default="export,kernel,generation,evaluation")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    parser.add_argument("--densities", default="0.33,0.2,0.1,0.05")
    parser.add_argument("--kernel-densities", default="0.05,0.1,0.2,0.3,0.33,0.4,0.5")
    parser.add_argument("--rows", default="1,4,20,100,700")
    parser.add_argument("--bsr-blocks", default="4,20", help="BSR block sizes (those that tile the matrix are run)")
    parser.add_argument("--hidden", type=int, default=1500)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--words", type=int, default=40, help="words per timed generation round")
    parser.add_argument("--onednn-words", type=int, default=8, help="words per round of the (slow) oneDNN model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--warmup-calls", type=int, default=2)
    parser.add_argument("--kernel-repeats", type=int, default=50, help="at most this many calls per timing")
    parser.add_argument("--kernel-min-ms", type=float, default=20.0, help="calls per timing to last this long")
    parser.add_argument("--bsr-max-rows", type=int, default=20, help="BSR only up to this many rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval-batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--eval-density", type=float, default=0.33, help="density of the targets' evaluation")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.vocab, args.words, args.onednn_words, args.rounds = 64, 200, 4, 2, 1
        args.kernel_densities, args.rows, args.bptt, args.eval_batch = "0.1,0.5", "1,20", 5, 4
        args.bsr_blocks, args.kernel_repeats, args.warmup = "4", 1, 1
    args.densities = [float(d) for d in args.densities.split(",")]
    args.kernel_densities = [float(d) for d in args.kernel_densities.split(",")]
    args.rows = [int(r) for r in args.rows.split(",")]
    args.bsr_blocks = [int(b) for b in args.bsr_blocks.split(",") if b]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        emit(skipped="cuda", reason="torch.cuda.is_available() is False: nothing measured")
        return
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    if args.quick and not args.threads:
        threads = [1]
    if device.type == "cuda":
        threads = [torch.get_num_threads()]
    emit(
        benchmark="inference",
        model=f"stacked LSTM 2 x {args.hidden}, vocab {args.vocab}",
        device=device.type,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        machine=platform.processor() or platform.machine(),
        cpu=cpu_name(),
        cores=cores,
        torch=torch.__version__,
        mkl=torch.backends.mkl.is_available(),
        quick=args.quick,
    )
    parts = {
        "kernel": kernel_part,
        "generation": generation_part,
        "evaluation": evaluation_part,
        "targets": targets_part,
    }
    chosen = args.parts.split(",")
    unknown = sorted(set(chosen) - {*parts, "export"})
    if unknown:
        parser.error(f"--parts: unknown {unknown}; allowed: {sorted({*parts, 'export'})}")
    if "export" in chosen:  # (bytes, not speed: once, whatever the threads)
        export_part(args, device, threads[0])
    for count in threads:
        torch.set_num_threads(count)
        for name in chosen:
            if name != "export":
                parts[name](args, device, count)


if __name__ == "__main__":
    main()
