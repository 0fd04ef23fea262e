"""One topology update of the paper's 66M-parameter stacked LSTM with its parameters sharded by rows over 2 processes
(FSDP2's ``fully_shard``), against the same update of the whole model in one process (issue #23).

Prints one JSON line per method. The model and the update are ``bench_update.py``'s: embedding 10,000 x 1,500,
2 x 1,500 ``nn.LSTM``, decoder 1,500 -> 10,000, density 0.33, prune rate 0.5, SGD with momentum state present; the
methods are the default (``selfish``: magnitude removal, random growth from a ``DrawStream``) and RigL (gradient
growth, from the dense gradients handed to the update). Three processes run under one gloo process group: ranks 0
and 1 hold the model sharded by ``fully_shard`` on a mesh of the two of them; rank 2 holds the whole model (the
single-process update). All three start from the same weights, momentum, gradients and seeds, and run the same
updates. Each timing round times one update per method on each side, alternating which side goes first, while the
other side waits at a barrier (gloo's wait takes no CPU); the figures are medians over rounds (a sharded round's
time is its slowest rank's). Memory is measured in a second run of the three processes, one round.

* ``single_update_s``, ``sharded_update_s``: wall time of ``SparseEngine.update``, under the default allocator;
  ``*_cpu_s``: the CPU time of each process over the same updates (medians), which the other work of a shared
  machine changes less: two ranks need two free cores at once, one process one. ``load_average``: the machine's
  at the end.
* ``extra_mb``: the peak memory an update adds to its process: the kernel's peak resident set (``VmHWM``) is reset
  (``/proc/self/clear_refs``) before the update, and the figure is the peak during the update less the resident set
  before it. ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` cannot be reset. So that the resident
  set follows the live tensors, the memory run's processes start with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc maps
  every allocation of 64 KiB or more on its own and unmaps it when freed; by default allocations below a threshold
  that grows to 32 MiB come from a heap that keeps freed pages). Not in the timing run: the page faults of every
  fresh mapping slow the updates, the sharded ones most (they allocate more often: 6.4 s under it in one run, 2.0 s
  without it in another).
  On a GPU: ``torch.cuda.max_memory_allocated`` less the memory allocated before the update.
* ``sent_bytes``: per rank and update, the bytes of the tensors handed to the library's collective
  (``ProcessGroup.all_reduce_`` and ``broadcast_`` of ``lightning_selfish.method.shards``, counted by patching those
  methods here); ``torch_distributed_bytes`` counts every ``torch.distributed`` collective the update made, as a
  check that nothing crosses ranks another way. With two ranks a ring all-reduce sends about the tensor's bytes.
* ``masks_equal``: after every update, every sharded rank's masks equal its rows of the single process's masks
  (the script exits with 1 if not).

Run from the repository root (``PYTHONPATH=.``: the spawned processes import this checkout)::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_sharded.py   # CPU targets: memory <= 0.6x, time <= 1x
    PYTHONPATH=. python benchmarks/bench_sharded.py --device cuda        # on a GPU (ranks share GPUs round robin)
    PYTHONPATH=. python benchmarks/bench_sharded.py --small              # a quick check of the script (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SHARDED_RANKS = 2  # ranks 0 and 1 hold the sharded model; rank 2 the whole one
WORLD = SHARDED_RANKS + 1
SINGLE = SHARDED_RANKS
METHODS = ("selfish", "rigl")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "gather")


def resident_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmHWM", "VmRSS")}


class PeakMemory:
    """The peak memory an update adds to this process, in MiB (see the module's docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            self.before = resident_kib()["VmRSS"] * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resident_kib()["VmHWM"] * 1024
        self.extra_mb = (peak - self.before) / 2**20


class Traffic:
    """Counts what an update hands to the library's collective and to ``torch.distributed`` (patched here, in this
    benchmark's processes only)."""

    def __init__(self) -> None:
        from lightning_selfish.method import shards

        self.counting = False
        self.library = {"calls": 0, "bytes": 0}
        self.torch = {"calls": 0, "bytes": 0}
        for method in ("all_reduce_", "broadcast_"):
            original = getattr(shards.ProcessGroup, method)
            setattr(shards.ProcessGroup, method, self._counted(original, self.library))
        for name in COLLECTIVES:
            setattr(dist, name, self._counted(getattr(dist, name), self.torch))

    def _counted(self, original, into: dict[str, int]):
        def counted(*args, **kwargs):
            if self.counting:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
                into["calls"] += 1
                into["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
            return original(*args, **kwargs)

        return counted

    def start(self) -> None:
        for counts in (self.library, self.torch):
            counts.update(calls=0, bytes=0)
        self.counting = True

    def stop(self) -> dict[str, int]:
        self.counting = False
        return {
            "sent_bytes": self.library["bytes"],
            "collective_calls": self.library["calls"],
            "torch_distributed_bytes": self.torch["bytes"],
            "torch_distributed_calls": self.torch["calls"],
        }


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "encoder": nn.Embedding(args.vocab, args.hidden),
            "rnn": nn.LSTM(args.hidden, args.hidden, 2),
            "decoder": nn.Linear(args.hidden, args.vocab),
        }
    ).to(device)


def whole_signal(name: str, shape: torch.Size, kind: int, device: torch.device) -> torch.Tensor:
    """The same pseudo-random tensor of the whole parameter on every process (momentum: kind 0, gradient: 1)."""
    seed = zlib.crc32(f"{kind}:{name}".encode())  # (not hash(): it differs between processes)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def worker(rank: int, args: argparse.Namespace, phase: str, rendezvous: str, results: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    line = run(rank, args, device, phase)
    Path(results, f"{phase}{rank}.json").write_text(json.dumps(line))
    dist.barrier()  # every rank's figures written and its last collective done
    # Leave without tearing the process groups down: in two of the suite's full runs a rank of this script aborted
    # with "terminate called without an active exception" (a C++ thread destroyed while joinable, which points to
    # the teardown), a barrier before destroy_process_group notwithstanding; not reproduced in 14 runs by hand.
    # Nothing is left to send or write here; the OS closes the sockets.
    os._exit(0)


def run(rank: int, args: argparse.Namespace, device: torch.device, phase: str) -> dict:
    """The same updates on both sides: timed (``phase="time"``, ``args.repeats`` rounds) or measured for memory
    (one round)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lightning_selfish import SparseEngine
    from lightning_selfish.core.engine import UpdateContext
    from lightning_selfish.core.gates import detect_gate_layouts
    from lightning_selfish.method.catalogue import resolve
    from lightning_selfish.method.keys import DrawStream
    from lightning_selfish.method.parts import UpdateAmount

    traffic = Traffic()
    sharded_group = dist.new_group(list(range(SHARDED_RANKS)))  # (every rank takes part in making it)
    sharded = rank != SINGLE
    model = build_model(args, device)
    if sharded:
        mesh = DeviceMesh.from_group(sharded_group, device.type)
        for module in model.values():  # (a ModuleDict has no forward: its modules are the FSDP units)
            fully_shard(module, mesh=mesh)
    params = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gradients = {}
    for name, param in params.items():  # momentum state present; dense gradients for RigL
        momentum, gradient = (whole_signal(name, param.shape, kind, device) for kind in (0, 1))
        if sharded:
            rows = slice(*_rows(param))
            local = momentum[rows].clone()
            momentum = DTensor.from_local(
                local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
            )
            gradient = gradient[rows].clone()
        optimizer.state[param]["momentum_buffer"] = momentum
        gradients[name] = gradient
    engine = SparseEngine.initialize(
        params, 1 - args.density, torch.Generator(device=device).manual_seed(0), "uniform", detect_gate_layouts(model)
    )
    methods = {name: resolve(name, 1 - args.density) for name in METHODS}
    draws = DrawStream(1)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    memory: dict[str, list[float]] = {name: [] for name in METHODS}
    cpu_times: dict[str, list[float]] = {name: [] for name in METHODS}
    sent: dict[str, list[dict]] = {name: [] for name in METHODS}
    masks_equal = True
    for round_ in range(args.repeats if phase == "time" else 1):
        for name, method in methods.items():
            for side in (SINGLE, 0) if round_ % 2 == 0 else (0, SINGLE):
                dist.barrier()
                if sharded != (side != SINGLE):
                    continue
                context = UpdateContext(
                    torch.Generator(device=device).manual_seed(0),
                    [optimizer],
                    gradients if method.growth.name == "gradient" else None,
                    draws=draws,
                )
                update = UpdateAmount(args.prune_rate)
                if phase == "memory":
                    with PeakMemory(device) as peak:
                        engine.update(update, method, context)
                    memory[name].append(peak.extra_mb)
                    continue
                traffic.start()
                _synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                engine.update(update, method, context)
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)
                sent[name].append(traffic.stop())
            masks_equal &= _masks_match(engine, sharded, device)
    return {
        "rank": rank,
        "times": times,
        "cpu_times": cpu_times,
        "memory": memory,
        "sent": sent,
        "masks_equal": masks_equal,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sparsified": sum(p.numel() for p in params.values()),
        "threads": torch.get_num_threads(),
        "local_rows": {name: _rows(p) for name, p in params.items()},
    }


def _rows(param: torch.Tensor) -> tuple[int, int]:
    from lightning_selfish.core.sharding import row_shard

    shard = row_shard(param)
    return shard.row_start, shard.row_start + shard.rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _masks_match(engine, sharded: bool, device: torch.device) -> bool:
    """The single process sends its whole masks; each sharded rank compares its rows (outside the timed update)."""
    equal = True
    for record in engine.tensors.values():
        whole = record.mask.to(torch.uint8)  # (a sharded rank's rows: overwritten by the whole mask)
        whole = torch.empty(record.shape, dtype=torch.uint8, device=device) if sharded else whole
        dist.broadcast(whole, src=SINGLE)
        if sharded:
            start = record.shard.row_start
            equal &= torch.equal(whole[start : start + record.shard.rows].bool(), record.mask)
    verdict = torch.tensor([0 if equal else 1], device=device)
    dist.all_reduce(verdict)
    return int(verdict) == 0


def summarize(ranks: list[dict], args: argparse.Namespace) -> list[dict]:
    single, shards = ranks[SINGLE], ranks[:SHARDED_RANKS]
    lines = []
    for name in METHODS:
        rounds = len(single["times"][name])
        sharded_times = [max(rank["times"][name][i] for rank in shards) for i in range(rounds)]
        single_s, sharded_s = statistics.median(single["times"][name]), statistics.median(sharded_times)
        single_mb = statistics.median(single["memory"][name])
        sharded_mb = [statistics.median(rank["memory"][name]) for rank in shards]
        traffic = [rank["sent"][name][-1] for rank in shards]  # (the same every round)
        lines.append(
            {
                "benchmark": "sharded_update",
                "method": name,
                "device": (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"),
                "backend": args.backend,
                "ranks": SHARDED_RANKS,
                "threads": single["threads"],
                "parameters": single["parameters"],
                "sparsified": single["sparsified"],
                "density": args.density,
                "prune_rate": args.prune_rate,
                "single_update_s": round(single_s, 4),
                "sharded_update_s": round(sharded_s, 4),
                "time_ratio": round(sharded_s / single_s, 3),
                "single_cpu_s": round(statistics.median(single["cpu_times"][name]), 4),
                "sharded_cpu_s_per_rank": [round(statistics.median(rank["cpu_times"][name]), 4) for rank in shards],
                "load_average": [round(load, 2) for load in os.getloadavg()],
                "single_extra_mb": round(single_mb, 1),
                "sharded_extra_mb_per_rank": [round(mb, 1) for mb in sharded_mb],
                "memory_ratio": round(max(sharded_mb) / single_mb, 3) if single_mb > 0 else None,
                "sent_bytes_per_rank": [t["sent_bytes"] for t in traffic],
                "collective_calls_per_rank": [t["collective_calls"] for t in traffic],
                "torch_distributed_bytes_per_rank": [t["torch_distributed_bytes"] for t in traffic],
                "masks_equal": all(rank["masks_equal"] for rank in ranks),
                "single_per_round_s": [round(t, 4) for t in single["times"][name]],
                "sharded_per_round_s": [round(t, 4) for t in sharded_times],
                "single_per_round_mb": [round(mb, 1) for mb in single["memory"][name]],
                "sharded_per_round_mb": [[round(mb, 1) for mb in rank["memory"][name]] for rank in shards],
            }
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo also carries CUDA tensors)")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--hidden", type=int, default=1_500)
    parser.add_argument("--density", type=float, default=0.33)
    parser.add_argument("--prune-rate", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each: one update per method on each side)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--small", action="store_true", help="a tiny model and one round: checks the script")
    args = parser.parse_args()
    if args.small:
        args.vocab, args.hidden, args.repeats = 1_000, 64, 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # (the spawned processes read these at their start)
    ranks = {}
    for phase, allocator in (("time", {}), ("memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        os.environ.update(allocator)  # (read by the spawned processes' C library at their start)
        with tempfile.TemporaryDirectory() as folder:
            spawn_args = (args, phase, str(Path(folder, "rendezvous")), folder)
            mp.spawn(worker, args=spawn_args, nprocs=WORLD, join=True)
            ranks[phase] = [json.loads(Path(folder, f"{phase}{rank}.json").read_text()) for rank in range(WORLD)]
        for key in allocator:
            del os.environ[key]
    ranks = [
        {**timed, "memory": measured["memory"], "masks_equal": timed["masks_equal"] and measured["masks_equal"]}
        for timed, measured in zip(ranks["time"], ranks["memory"])
    ]
    lines = summarize(ranks, args)
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0 if all(line["masks_equal"] for line in lines) else 1  # (different masks: a failed run)


if __name__ == "__main__":
    sys.exit(main())
