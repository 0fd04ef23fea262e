"""The model of ``fsdp2_fit.py`` trained by a plain ``fully_shard`` loop, without Lightning, on CPU processes (gloo).

    python tests/ddp_scripts/fsdp2_loop.py OUT_DIR --devices N [--ckpt FOLDER] [--epochs E] [--port P]

Each rank takes its rows of every global batch (``fsdp2_fit.rank_loader``), steps SGD with momentum and at each
epoch's end saves a distributed checkpoint ``OUT_DIR/epoch=K`` with ``torch.distributed.checkpoint``: the model and
optimizer state of ``get_state_dict`` and an ``extra`` part as a sparsity callback would keep it (uint8 and bool
``DTensor`` masks sharded like their parameters, a plain tensor and an int that differ per rank, the step).
``--ckpt`` loads one into templates of this run (``dcp.load`` + ``set_state_dict``) before training on; the rank
writes ``rank{r}.pt`` (the full weights after training, its losses and windows) and ``rank{r}.json`` (what the
``extra`` part brought back on this rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from fsdp2_fit import (  # noqa: E402
    BATCHES_PER_EPOCH,
    INIT_SEED,
    LanguageModel,
    full_weights,
    make_optimizer,
    probe_mask,
    rank_loader,
    shard,
)


def extra_state(lm: torch.nn.Module, step: int, rank: int) -> dict[str, Any]:
    """What a sparsity callback would add to the checkpoint: masks sharded like their weights, and per-rank values
    (to see which rank's copy DCP keeps of a plain tensor or an int that every rank saves under one key)."""
    uint8 = {
        name: distribute_tensor(probe_mask(p.shape, step), p.device_mesh, p.placements, src_data_rank=None)
        for name, p in lm.named_parameters()
    }
    return {
        "step": torch.tensor(step),
        "uint8": uint8,
        "bool": {name: mask.bool() for name, mask in uint8.items()},
        "rank_tensor": torch.tensor([rank]),
        "rank_int": rank,
    }


def what_came_back(lm: torch.nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    step = int(extra["step"])
    expected = extra_state(lm, step, rank=-1)
    masks = {}
    for kind in ("uint8", "bool"):
        for name, got in extra[kind].items():
            want = expected[kind][name]
            masks[f"{kind}:{name}"] = {
                "type": type(got).__name__,
                "dtype": str(got.dtype),
                "local_shape": list(got.to_local().shape) if isinstance(got, DTensor) else list(got.shape),
                "equals_own_shard": isinstance(got, DTensor) and torch.equal(got.to_local(), want.to_local()),
            }
    return {"step": step, "rank_tensor": extra["rank_tensor"].tolist(), "rank_int": extra["rank_int"], "masks": masks}


def run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(INIT_SEED)  # every rank builds the same whole weights before sharding
    lm = LanguageModel()
    shard(lm, init_device_mesh("cpu", (world_size,)))
    optimizer = make_optimizer("momentum", lm.parameters())
    step, seen = 0, {"world_size": world_size}
    if args.ckpt is not None:
        model_state, optimizer_state = get_state_dict(lm, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "extra": extra_state(lm, 0, rank)}
        dcp.load(state, checkpoint_id=args.ckpt)  # in place, into this run's shards
        set_state_dict(lm, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        seen["loaded"] = what_came_back(lm, state["extra"])
        step = seen["loaded"]["step"]
    losses, windows = [], []
    loader = rank_loader(world_size, rank)
    for epoch in range(step // BATCHES_PER_EPOCH, args.epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = lm.loss(batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            windows.append(batch[0].tolist())
            step += 1
        model_state, optimizer_state = get_state_dict(lm, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "extra": extra_state(lm, step, rank)}
        dcp.save(state, checkpoint_id=args.out_dir / f"epoch={epoch}")
    weights = full_weights(lm)  # a collective: after training, for the tests only
    torch.save({"weights": weights, "losses": losses, "windows": windows}, args.out_dir / f"rank{rank}.pt")
    (args.out_dir / f"rank{rank}.json").write_text(json.dumps(seen, indent=1))
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--devices", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument("--ckpt", type=Path, default=None, help="a folder this script saved")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", "29511")))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(run, args=(args.devices, args), nprocs=args.devices)


if __name__ == "__main__":
    main()
