"""The model of ``fsdp2_fit.py`` trained sparse by a plain loop with ``SparseTraining`` (no Lightning): ``fully_shard``
on N CPU processes (gloo), ``--ddp`` (``DistributedDataParallel``, every rank holding whole weights), or ``--plain``
on one process without sharding or a process group.

    python tests/ddp_scripts/sparse_loop.py OUT_DIR --devices N [--plain | --ddp] [--method M] [--ckpt FOLDER]

The loop of docs/distributed.md ("Without Lightning"): every rank takes its rows of every global batch, clips the
gradients and steps SGD with momentum between ``before_optimizer_step`` and ``after_optimizer_step``, calls
``after_epoch`` at each of the 2 epochs' ends and then saves ``OUT_DIR/epoch=K`` with
``torch.distributed.checkpoint`` (model, optimizer and ``SparseTraining.state_dict()``). ``--ckpt`` resumes such a
folder (written by any number of ranks). After every step a rank records whether its rows' inactive weights are
zero, the whole tensors' active counts, the whole masks (gathered with ``engine.whole_masks()``, for the test only),
the update count and the random growth stream's next draw; ``rank{r}.pt`` holds these, the rank's losses and the
full weights after training.
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

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from fsdp2_fit import (  # noqa: E402  (which also puts the checkout under test first on the path)
    BATCHES_PER_EPOCH,
    INIT_SEED,
    LanguageModel,
    full_weights,
    make_optimizer,
    rank_loader,
    shard,
)

from lightning_selfish import SparseTraining  # noqa: E402  (imported once, before the ranks are forked)

EPOCHS = 2
TOTAL_STEPS = EPOCHS * BATCHES_PER_EPOCH
CLIP = 0.1  # (below every step's gradient norm, 0.18 to 0.24 on one process: every step is clipped)


class LossModel(LanguageModel):
    """The language model whose ``forward`` is its loss (DDP synchronises gradients of what goes through forward)."""

    def forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        return self.loss(batch)


def unwrapped(name: str) -> str:
    return name.removeprefix("module.")  # (DDP's parameter names)


def record(training: Any, step: int) -> dict[str, Any]:
    engine = training.engine
    zeros = all(
        bool((t.param.detach()[~t.mask] == 0).all()) and tuple(t.mask.shape) == tuple(t.param.shape)
        for t in engine.tensors.values()
    )
    return {
        "step": step,
        "zeros": zeros,
        "active": {unwrapped(name): t.active for name, t in engine.tensors.items()},
        "masks": {unwrapped(name): m for name, m in engine.whole_masks().items()},  # (a gather: the test only)
        "updates": training.num_updates,
        "next_draw": training.controller.draws.next_draw,
    }


def run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    if not args.plain:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(INIT_SEED)  # every rank builds the same whole weights before sharding
    lm = model = LossModel()
    if args.ddp:
        model = torch.nn.parallel.DistributedDataParallel(lm)
    elif not args.plain:
        from torch.distributed.device_mesh import init_device_mesh

        shard(lm, init_device_mesh("cpu", (world_size,)))
    optimizer = make_optimizer("momentum", lm.parameters())
    training = SparseTraining(
        model, [optimizer], sparsity=0.5, total_steps=TOTAL_STEPS, seed=0, method=args.method, update_every=2,
        prune_rate=0.3,
    )  # fmt: skip
    training.start()
    if args.ckpt is not None:
        model_state, optimizer_state = get_state_dict(lm, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "sparsity": training.state_dict()}
        dcp.load(state, checkpoint_id=args.ckpt)  # in place, into this run's shards
        set_state_dict(lm, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        training.load_state_dict(state["sparsity"])
    step, records, losses = training.step, [], []
    for epoch in range(step // BATCHES_PER_EPOCH, EPOCHS):
        for batch in rank_loader(world_size, rank):
            optimizer.zero_grad()
            loss = model(batch)
            loss.backward()
            step += 1
            training.before_optimizer_step(step)  # (before clipping: the dense gradient RigL reads)
            torch.nn.utils.clip_grad_norm_(lm.parameters(), CLIP)
            optimizer.step()
            training.after_optimizer_step(step)
            losses.append(float(loss.detach()))
            records.append(record(training, step))
        training.after_epoch(epoch)
        model_state, optimizer_state = get_state_dict(lm, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "sparsity": training.state_dict()}
        dcp.save(state, checkpoint_id=args.out_dir / f"epoch={epoch}")
    weights = full_weights(lm)  # a collective when sharded: after training, for the tests only
    torch.save({"weights": weights, "losses": losses, "sparsity": records}, args.out_dir / f"rank{rank}.pt")
    (args.out_dir / f"rank{rank}.json").write_text(
        json.dumps({"world_size": world_size, "plain": args.plain, "ddp": args.ddp})
    )
    if not args.plain:
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--devices", type=int, default=2, choices=(1, 2, 4))
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--plain", action="store_true", help="one process, no fully_shard, no process group")
    form.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of fully_shard")
    parser.add_argument("--method", default="selfish")
    parser.add_argument("--ckpt", type=Path, default=None, help="a folder this script saved")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", "29512")))
    args = parser.parse_args()
    if args.plain and args.devices != 1:
        parser.error(f"--plain trains on one process, got --devices {args.devices}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.plain:
        run(0, 1, args)
    else:
        mp.start_processes(run, args=(args.devices, args), nprocs=args.devices, start_method="fork")


if __name__ == "__main__":
    main()
