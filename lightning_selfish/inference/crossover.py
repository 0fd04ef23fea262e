"""Which format is fastest for a weight, on the machine that runs it: the crossover table and the per-tensor choice.

The formats' speed against dense depends on the CPU (its vector units, caches and memory), the torch build and the
thread count: a table measured on one CPU is wrong on another (an AMD EPYC runs torch CSR faster than dense up to a
density of 0.5 at one row where an Intel Xeon stops at 0.3). So :func:`machine_crossover` measures the table on
first use, keyed by CPU model, torch version, thread count and kernel instruction set, caches it as JSON under
:func:`~lightning_selfish.inference.kernels.cache_dir` and reads it back after; ``remeasure=True`` measures again;
``$LIGHTNING_SELFISH_CROSSOVER`` (or ``to_sparse(crossover=path)``) ships a table measured elsewhere.

The table's model: for each measured row count and sparse format, its time over dense's time is ``a + b·density``
(the sparse products' work is proportional to the non-zeros), fitted through two densities. A weight takes the
format with the smallest predicted ratio if that is at most :data:`DENSE_MARGIN` (keep dense where unsure). Dense
is the faster of torch's two dense paths (oneDNN on and off).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_selfish.inference.formats import hold, kernel_formats_available, multiply
from lightning_selfish.inference.kernels import KernelLibrary, cache_dir, load_kernels

__all__ = [
    "CPU_CROSSOVER",
    "CROSSOVER_ENV",
    "DENSE_MARGIN",
    "MIN_CSR_ELEMENTS",
    "Choose",
    "CrossoverTable",
    "MachineKey",
    "TensorChoice",
    "choose_format",
    "cpu_name",
    "crossover_density",
    "machine_crossover",
    "measure_crossover",
    "measure_formats",
    "measure_product",
]

log = logging.getLogger(__name__)

Choose = Literal["crossover", "measure", "sparse", "csr", "csr16", "bitmask"]
#: ``choose`` values that put every weight of a supported module in one format.
FORCED = {"sparse": "csr", "csr": "csr", "csr16": "csr16", "bitmask": "bitmask"}

#: ``(rows, density)``: the table measured on the project's Intel Xeon (one thread, torch CSR with 32-bit indices
#: against dense, benchmarks/bench_inference.py --parts kernel): what ``to_sparse(crossover=CPU_CROSSOVER)`` assumes
#: everywhere. The default is the table measured on the machine that runs (:func:`machine_crossover`).
CPU_CROSSOVER: tuple[tuple[int, float], ...] = ((1, 0.30), (4, 0.30), (20, 0.30), (100, 0.20), (700, 0.10))

#: Below this many entries a weight stays dense under ``choose="crossover"``: a small matrix sits in the CPU's
#: caches, where the dense product wins at most densities.
MIN_CSR_ELEMENTS = 500_000

#: A sparse format is chosen only when predicted at most this fraction of dense's time (keep dense where unsure).
DENSE_MARGIN = 0.9

#: A crossover table file (JSON of :meth:`CrossoverTable.save`) to use instead of measuring.
CROSSOVER_ENV = "LIGHTNING_SELFISH_CROSSOVER"

#: The measurement: row counts, the two densities of the fit, and the weight shapes (smaller for many rows, where
#: the products are compute-bound; large enough at few rows to stream from memory as a model's weights do).
MEASURE_ROWS = (1, 20, 100, 700)
MEASURE_DENSITIES = (0.1, 0.4)
_MEASURE_SHAPES = {1: (4096, 1536), 20: (1536, 1024), 100: (384, 512), 700: (384, 512)}
#: One row at a time (generation) a model reads each of its weights once per word, one after the other, so none is
#: in the caches when its turn comes: the one-row products are timed over this many distinct weights in turn
#: (200 MB dense, the paper's stacked LSTM's size). Timed on one weight called again and again, dense's product
#: ran from the caches and the bit mask, which reads 0.36x the bytes, looked no faster (0.93x to 0.96x of dense's
#: time in three measurements), while in the model it is 1.4x to 1.7x faster.
_STREAMED_COPIES = {1: 8}
#: How the table is measured, in the cache's file names: a table measured another way is measured again (version 2:
#: the one-row products stream over distinct weights).
MEASUREMENT_VERSION = 2


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, as ``lscpu`` shows it), else ``platform``'s."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if found:
        return found.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class MachineKey:
    """What a crossover table depends on."""

    cpu: str
    torch: str
    threads: int
    kernels: str  # the kernels' instruction set and build digest ("avx512-<digest>"), or "none"

    @classmethod
    def current(cls, kernels: KernelLibrary | None = None, threads: int | None = None) -> MachineKey:
        isa = f"{kernels.isa()}-{kernels.build}" if kernels is not None else "none"
        return cls(cpu_name(), torch.__version__, threads or torch.get_num_threads(), isa)

    def file_name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{self.cpu}_{self.torch}_{self.threads}t_{self.kernels}").strip("-")
        return f"crossover_v{MEASUREMENT_VERSION}_{slug}.json"

    def describe(self) -> str:
        return f"{self.cpu}, {self.threads} thread{'s' if self.threads > 1 else ''}, torch {self.torch}"


@dataclass(frozen=True)
class CrossoverTable:
    """Per measured row count and sparse format, ``(a, b)``: its time / dense's ≈ ``a + b·density``.

    ``source``: ``"measured"`` (now, on this machine), ``"cached"`` (measured earlier on a machine with the same
    key), ``"given"`` (a table passed in or named by ``$LIGHTNING_SELFISH_CROSSOVER``).
    """

    machine: MachineKey
    fits: Mapping[int, Mapping[str, tuple[float, float]]]
    source: str = "measured"
    path: str | None = None
    seconds: float | None = None  # what the measurement took

    def ratio(self, format: str, rows: int, density: float) -> float | None:
        """Predicted time of ``format`` over dense's for a product of ``rows`` rows (None: not measured)."""
        fits = self.fits[_row_bucket(rows, self.fits)]
        if format not in fits:
            return None
        a, b = fits[format]
        return a + b * density

    def best(self, rows: int, density: float, formats: Sequence[str]) -> tuple[str, float]:
        """The format of ``formats`` with the smallest predicted ratio, and the ratio (``("dense", 1.0)`` if none
        beats :data:`DENSE_MARGIN`)."""
        predicted = {f: self.ratio(f, rows, density) for f in formats if f != "dense"}
        predicted = {f: r for f, r in predicted.items() if r is not None}
        if not predicted:
            return "dense", 1.0
        format = min(predicted, key=predicted.__getitem__)
        return (format, predicted[format]) if predicted[format] <= DENSE_MARGIN else ("dense", 1.0)

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        how = {"measured": "measured now", "cached": "measured earlier, cached", "given": "given"}[self.source]
        return f"crossover {how}{where} for {self.machine.describe()}, kernels {self.machine.kernels}"

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": asdict(self.machine),
            "fits": {str(rows): {f: list(ab) for f, ab in fits.items()} for rows, fits in self.fits.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "given", path: str | None = None) -> CrossoverTable:
        try:
            machine = MachineKey(**data["machine"])
            fits = {int(r): {f: (float(a), float(b)) for f, (a, b) in v.items()} for r, v in data["fits"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a crossover table{f' ({path})' if path else ''}: {error!r}") from error
        if not fits:
            raise ValueError(f"crossover table{f' {path}' if path else ''} has no measurements")
        return cls(machine, fits, source, path, data.get("seconds"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (to ship it: ``to_sparse(crossover=path)`` or ``$LIGHTNING_SELFISH_CROSSOVER``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, source: str = "given") -> CrossoverTable:
        return cls.from_json(json.loads(Path(path).read_text()), source, str(path))


def _row_bucket(rows: int, table: Mapping[int, Any]) -> int:
    """The smallest measured row count >= ``rows`` (sparse formats lose ground with more rows), else the largest."""
    larger = [r for r in table if r >= rows]
    return min(larger) if larger else max(table)


def machine_crossover(
    *,
    cache: str | os.PathLike | None = None,
    remeasure: bool = False,
    kernels: KernelLibrary | None | Literal["load"] = "load",
) -> CrossoverTable:
    """The crossover table of this machine at the current thread count: ``$LIGHTNING_SELFISH_CROSSOVER`` if set,
    else the cached one, else measured now (:func:`measure_crossover`, well under a second) and cached."""
    shipped = os.environ.get(CROSSOVER_ENV)
    if shipped and not remeasure:
        return CrossoverTable.load(shipped)
    kernels = load_kernels(cache) if kernels == "load" else kernels
    key = MachineKey.current(kernels)
    path = cache_dir(cache) / key.file_name()
    if path.exists() and not remeasure:
        try:
            return CrossoverTable.load(path, source="cached")
        except ValueError as error:  # a damaged cache file: measure again
            log.warning("lightning_selfish.inference: %s; measuring again", error)
    table = measure_crossover(kernels)
    try:
        table.save(path)
    except OSError as error:
        log.warning("lightning_selfish.inference: could not cache the crossover table at %s (%s)", path, error)
        return table
    return CrossoverTable(table.machine, table.fits, "measured", str(path), table.seconds)


def measure_crossover(
    kernels: KernelLibrary | None,
    rows: Sequence[int] = MEASURE_ROWS,
    densities: tuple[float, float] = MEASURE_DENSITIES,
    shapes: Mapping[int, tuple[int, int]] | None = None,
    rounds: int = 3,
) -> CrossoverTable:
    """Time dense (the faster of oneDNN on and off) and every sparse format at two densities per row count, on
    random weights, and fit each format's time over dense's as ``a + b·density``."""
    start = time.perf_counter()
    shapes = {**_MEASURE_SHAPES, **dict(shapes or {})}
    generator = torch.Generator().manual_seed(0)
    fits: dict[int, dict[str, tuple[float, float]]] = {}
    built: dict[tuple[tuple[int, int], float, int], dict[str, list[Any]]] = {}
    for count in rows:
        shape = shapes.get(count) or shapes[_row_bucket(count, shapes)]
        copies = _STREAMED_COPIES.get(count, 1)
        x = torch.randn(count, shape[1], generator=generator)
        ratios: dict[str, list[float]] = {}
        for density in densities:
            if (shape, density, copies) not in built:
                weight = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < density)
                formats = ("dense", "csr", *kernel_formats_available(weight, kernels))
                held_once = {f: hold(weight, f, kernels) for f in formats}
                # (copies in memory of their own: the same values, read from other addresses)
                built[(shape, density, copies)] = {
                    f: [h, *(_copy_of(h) for _ in range(copies - 1))] for f, h in held_once.items()
                }
            held = built[(shape, density, copies)]
            ms = measure_formats(held, x, rounds)
            for format, value in ms.items():
                if format in held and format != "dense":
                    ratios.setdefault(format, []).append(value / ms["dense"])
        d0, d1 = densities
        fits[count] = {f: (r0 - (r1 - r0) / (d1 - d0) * d0, (r1 - r0) / (d1 - d0)) for f, (r0, r1) in ratios.items()}
    seconds = round(time.perf_counter() - start, 3)
    return CrossoverTable(MachineKey.current(kernels), fits, "measured", None, seconds)


def _copy_of(held: Any) -> Any:
    """A held weight in memory of its own (a torch CSR tensor by ``clone``, which ``deepcopy`` does not do)."""
    return held.clone() if isinstance(held, Tensor) else copy.deepcopy(held)


def measure_formats(
    held: Mapping[str, Any], x: Tensor, rounds: int = 5, min_seconds: float = 0.001
) -> dict[str, float]:
    """Median ms of ``x W^T`` per format of ``held`` (``{format: weight as hold() gives}``, or a list of such
    weights, multiplied in turn and timed together), the formats alternated round by round; ``dense`` is timed with
    oneDNN on and off and counts as the faster. CPU time of the process on one thread (robust to other processes
    on a shared machine), wall time with more."""
    on_cpu = x.device.type == "cpu"
    clock = time.process_time if on_cpu and torch.get_num_threads() == 1 else time.perf_counter
    synchronize = (lambda: None) if on_cpu else (lambda: torch.cuda.synchronize(x.device))
    calls: dict[str, Callable[[], Any]] = {}
    for format, held_weights in held.items():
        weights = held_weights if isinstance(held_weights, list) else [held_weights]
        if format == "dense" and not on_cpu:
            calls["dense"] = lambda ws=weights: [multiply(w, x) for w in ws]
        elif format == "dense":
            for enabled in (True, False):
                calls[f"dense_onednn_{'on' if enabled else 'off'}"] = _with_onednn(enabled, weights, x)
        else:
            calls[format] = lambda ws=weights: [multiply(w, x) for w in ws]
    with torch.no_grad():
        warm = {}
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            synchronize()
            warm[name] = max(time.perf_counter() - begin, 1e-6)
        repeats = {name: max(1, math.ceil(min_seconds / seconds)) for name, seconds in warm.items()}
        timings: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                synchronize()
                begin = clock()
                for _ in range(repeats[name]):
                    call()
                synchronize()
                timings[name].append((clock() - begin) / repeats[name])
    ms = {name: statistics.median(values) * 1e3 for name, values in timings.items()}
    if "dense_onednn_on" in ms:
        ms["dense"] = min(ms["dense_onednn_on"], ms["dense_onednn_off"])
    return ms


def _with_onednn(enabled: bool, weights: list[Tensor], x: Tensor) -> Callable[[], list[Tensor]]:
    def call() -> list[Tensor]:
        with torch.backends.mkldnn.flags(enabled=enabled, allow_tf32=None):  # (allow_tf32=None: no TF32 warning)
            return [torch.nn.functional.linear(x, weight) for weight in weights]

    return call


def crossover_density(rows: int, table: Sequence[tuple[int, float]] = CPU_CROSSOVER) -> float:
    """The density at or below which CSR is faster than dense for a product with ``rows`` rows (from ``table``)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"crossover_density: rows must be a positive int, got {rows!r}")
    ordered = sorted(table)
    for limit, density in ordered:
        if rows <= limit:
            return density
    return ordered[-1][1]


@dataclass(frozen=True)
class TensorChoice:
    """What :func:`to_sparse` decided for one weight tensor, and why. ``format``: ``dense``, ``csr``, ``csr16`` or
    ``bitmask`` (default: ``csr`` when ``sparse``, else ``dense``)."""

    name: str
    shape: tuple[int, ...]
    density: float
    rows: int
    sparse: bool
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None
    format: str | None = None

    def __post_init__(self) -> None:
        if self.format is None:
            object.__setattr__(self, "format", "csr" if self.sparse else "dense")


def density_of(weight: Tensor) -> float:
    return float(torch.count_nonzero(weight.detach())) / max(1, weight.numel())


def choose_format(
    name: str,
    weight: Tensor,
    rows: int,
    choose: Choose = "crossover",
    crossover: CrossoverTable | Sequence[tuple[int, float]] = CPU_CROSSOVER,
    min_elements: int = MIN_CSR_ELEMENTS,
    kernels: KernelLibrary | None = None,
) -> TensorChoice:
    """The format of ``weight`` multiplying ``rows`` rows at a time, and why (see :func:`to_sparse`'s ``choose``).

    ``crossover``: a :class:`CrossoverTable` (every format it measured that ``kernels`` can hold), or a
    ``(rows, density)`` sequence (torch CSR at most that dense, as :data:`CPU_CROSSOVER`).
    """
    density = density_of(weight)
    shape = tuple(weight.shape)
    if choose in FORCED:
        format = FORCED[choose]
        return TensorChoice(name, shape, density, rows, True, f"{format} requested (choose={choose!r})", format=format)
    available = ("dense", "csr", *kernel_formats_available(weight, kernels))
    if choose == "crossover":
        if weight.numel() < min_elements:
            reason = f"{weight.numel()} entries < {min_elements}: a small matrix is faster dense"
            return TensorChoice(name, shape, density, rows, False, reason)
        if isinstance(crossover, CrossoverTable):
            format, ratio = crossover.best(rows, density, available)
            if format == "dense":
                reason = f"no format predicted <= {DENSE_MARGIN:g} of dense's time at density {density:.3f}, "
                reason += f"{rows} rows"
            else:
                reason = f"{format} predicted {1 / ratio:.2f}x dense at density {density:.3f}, {rows} rows"
            return TensorChoice(name, shape, density, rows, format != "dense", reason, format=format)
        limit = crossover_density(rows, crossover)
        sparse = density <= limit
        reason = f"density {density:.3f} {'<=' if sparse else '>'} {limit:g} at {rows} rows"
        return TensorChoice(name, shape, density, rows, sparse, reason)
    held = {f: hold(weight, f, kernels) for f in available}
    generator = torch.Generator(device=weight.device).manual_seed(0)  # (the global RNG is left alone)
    x = torch.randn(rows, shape[1], dtype=weight.dtype, device=weight.device, generator=generator)
    ms = {f: v for f, v in measure_formats(held, x).items() if f in available}
    format = min(ms, key=ms.__getitem__)
    sparse_ms = min(v for f, v in ms.items() if f != "dense")
    timings = ", ".join(f"{f} {v:.3f}" for f, v in ms.items())
    reason = f"measured ms at {rows} rows: {timings}"
    return TensorChoice(
        name, shape, density, rows, format != "dense", reason, round(ms["dense"], 4), round(sparse_ms, 4), format
    )


def measure_product(weight: Tensor, rows: int, rounds: int = 7, min_seconds: float = 0.002) -> tuple[float, float]:
    """Median ms of ``x W^T`` for ``x`` ``(rows, in)``: dense (the faster of oneDNN on and off), then torch CSR."""
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device, generator=generator)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        ms = measure_formats({f: hold(weight, f) for f in ("dense", "csr")}, x, rounds, min_seconds)
    return ms["dense"], ms["csr"]
