"""Selections over DTensor row shards on N gloo processes: ``python global_selection_ranks.py OUT WORLD_SIZE``.

Each rank takes its shard of the same tensors from ``distribute_tensor(..., [Shard(0)])`` (FSDP2's placement),
selects with lightning_selfish.run.collective over the process group, and writes its part; the test joins the parts
and compares them with one process selecting over the whole tensors."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_selfish.run.collective import ProcessGroup, lowest_positions, random_positions


def cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * 31, 23, generator=generator)  # an LSTM-like stack of 4 gates, rows not a multiple of 4
    weight[5:40:3] = 0.125  # exact ties around the removal threshold
    mask = torch.rand(weight.shape, generator=generator) < 0.33
    n_removed = int(mask.count_nonzero()) // 2
    return {"removal": (weight.abs(), mask, n_removed), "growth": (weight, ~mask, n_removed)}


def main(rank: int, world_size: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    collectives = ProcessGroup()
    parts = {}
    for name, (score, candidates, n) in cases().items():
        local_score = distribute_tensor(score, mesh, [Shard(0)]).to_local()
        local_candidates = distribute_tensor(candidates, mesh, [Shard(0)]).to_local()
        chunk = -(-score.shape[0] // world_size)
        start_row = min(rank * chunk, score.shape[0])
        assert torch.equal(local_score, score[start_row : start_row + local_score.shape[0]])  # FSDP2's row ranges
        start = start_row * score.shape[1]
        if name == "growth":
            parts[name] = random_positions(local_candidates, n, seed=7, draw=3, start=start, collective=collectives)
        else:
            parts[name] = lowest_positions(local_score, local_candidates, n, start, collectives)
    weight = distribute_tensor(cases()["growth"][0], mesh, [Shard(0)]).to_local()
    parts["kth"] = collectives.kth_value(weight, 100)  # the 100th smallest weight of all ranks
    torch.save(parts, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world_size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(main, args=(world_size, out, port), nprocs=world_size)
