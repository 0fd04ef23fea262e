"""Topology updates of FSDP2-sharded parameters on N gloo processes: ``python sharded_update_ranks.py OUT WORLD PORT``.

Every case of :func:`cases` builds the same parameters (an LSTM's stacked gates with rows that do not divide by the
number of ranks, a decoder), distributes them ``Shard(0)`` (FSDP2's placement) when ``WORLD > 1``, draws the initial
masks, steps an optimizer on the same gradients and runs three topology updates; :func:`run_case` is also what the
test runs in one process on plain tensors, the reference. Each rank writes its rows of the masks, weights and
optimizer state after every update, and what crossed the ranks during the updates: the test joins the rows and
compares them with the one-process run, position for position.

During the updates and the optimizer steps (with the engine's enforcement after each) a spy refuses every
operation that would materialise a whole tensor (``DTensor.full_tensor``, all-gathers, broadcasts) and records the
size of every all-reduce: a step makes none.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_selfish.core.engine import SparseEngine, UpdateContext
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.keys import DrawStream
from lightning_selfish.method.parts import UpdateAmount

HIDDEN, INPUT, VOCAB = 9, 5, 11  # 36 gate rows: 18 + 18 on 2 ranks, 9 x 4 on 4 (gates span ranks); 11 = 6 + 5, 3+3+3+2
GATES = [(gate, slice(i * HIDDEN, (i + 1) * HIDDEN)) for i, gate in enumerate("ifgo")]


def cases() -> dict[str, dict[str, Any]]:
    """name -> the method's overrides and the optimizer."""
    return {
        "selfish": {"method": "selfish", "optimizer": "momentum"},
        "selfish_per_gate": {"method": "selfish", "gate_redistribution": "none", "optimizer": "momentum"},
        "selfish_gate_magnitude": {"method": "selfish", "gate_redistribution": "magnitude", "optimizer": "momentum"},
        "selfish_gate_gradient": {"method": "selfish", "gate_redistribution": "gradient", "optimizer": "momentum"},
        "rigl": {"method": "rigl", "optimizer": "momentum"},
        "rigl_adam_tensor_mean": {"method": "rigl", "optimizer": "adam", "grown_optimizer_state": "tensor_mean"},
        "set": {"method": "set", "optimizer": "momentum"},
        "set_selfish_rnn": {"method": "set_selfish_rnn", "optimizer": "adam"},
        "dsr": {"method": "dsr", "threshold": 0.3, "optimizer": "momentum"},
        "snfs": {"method": "snfs", "optimizer": "momentum"},
        "snfs_adam": {"method": "snfs", "optimizer": "adam"},
    }


def shapes() -> dict[str, tuple[int, int]]:
    return {"weight_ih": (4 * HIDDEN, INPUT), "weight_hh": (4 * HIDDEN, HIDDEN), "decoder": (VOCAB, HIDDEN)}


def whole_tensors(seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The initial weights and the gradient of every step (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=generator) for name, shape in shapes().items()}
    weights["weight_hh"][3:30:4, 2] = 0.25  # exact ties of |w| across the ranks' rows
    grads = [{name: torch.randn(shape, generator=generator) for name, shape in shapes().items()} for _ in range(8)]
    return weights, grads


def run_case(name: str, world_size: int, mesh: Any = None) -> dict[str, Any]:
    """One case on this rank (``mesh`` None: one process, plain tensors): rows of masks, weights and state after
    each of three updates, and each update's statistics."""
    spec = dict(cases()[name])
    optimizer_name = spec.pop("optimizer")
    method_name = spec.pop("method")
    config = resolve(method_name, 0.6, prune_rate=0.4, **spec)
    weights, grads = whole_tensors(seed=sum(map(ord, name)))
    distribute = _distribute(mesh)
    params = {name: nn.Parameter(distribute(tensor)) for name, tensor in weights.items()}
    layouts = {"weight_ih": GATES, "weight_hh": GATES}
    engine = SparseEngine.initialize(
        params, config.sparsity, torch.Generator().manual_seed(5), config.init, layouts, config.gate_redistribution
    )
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(params.values(), lr=0.05)
    else:
        optimizer = torch.optim.SGD(params.values(), lr=0.05, momentum=0.9)
    engine.attach(optimizer, mask_state=not config.reads_momentum, grown_state=config.grown_optimizer_state)
    draws, threshold = DrawStream(17), config.threshold
    out: dict[str, Any] = {"updates": []}
    for update in range(3):
        for step in (2 * update, 2 * update + 1):
            for key, p in params.items():
                p.grad = distribute(grads[step][key])
            with spy() as crossed_in_step:  # the step and the engine's enforcement after it: local work only
                optimizer.step()
            assert not crossed_in_step, f"a step sent {crossed_in_step} elements between ranks"
        for key, p in params.items():
            p.grad = distribute(grads[6 + update % 2][key])  # the dense gradient the update reads (RigL)
        amount = UpdateAmount(0.4)
        with spy() as crossed:
            context = UpdateContext(torch.Generator(), [optimizer], None, None, threshold, draws)
            stats = engine.update(amount, config, context)
        threshold = stats.threshold
        out["updates"].append(
            {
                "masks": {key: record.mask.clone() for key, record in engine.tensors.items()},
                "weights": {key: record.param.detach().clone() for key, record in engine.tensors.items()},
                "state": {
                    key: {k: _local(v).clone() for k, v in optimizer.state[p].items() if v.shape == p.shape}
                    for key, p in params.items()
                },
                "removed": stats.removed,
                "grown": stats.grown,
                "active": stats.active,
                "threshold": threshold,
                "next_draw": draws.next_draw,
                "largest_all_reduce": max(crossed, default=0),
                "all_reduces": len(crossed),
                "bytes": sum(crossed) * 8,
            }
        )
    out["report"] = engine.sparsity_report()
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _distribute(mesh: Any):
    if mesh is None:
        return lambda tensor: tensor.clone()
    from torch.distributed.tensor import Shard, distribute_tensor

    return lambda tensor: distribute_tensor(tensor.clone(), mesh, [Shard(0)], src_data_rank=None)


@contextmanager
def spy():
    """Refuse whole-tensor gathers and broadcasts; record the element count of every all-reduce."""
    from torch.distributed.tensor import DTensor

    crossed: list[int] = []
    saved = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast")}
    full_tensor = DTensor.full_tensor

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a topology update gathered or broadcast a tensor")

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        crossed.append(tensor.numel())
        return saved["all_reduce"](tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    dist.all_gather = dist.all_gather_into_tensor = dist.broadcast = refuse
    DTensor.full_tensor = refuse
    try:
        yield crossed
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)
        DTensor.full_tensor = full_tensor


def main(rank: int, world_size: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    results = {name: run_case(name, world_size, mesh) for name in cases()}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world_size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(main, args=(world_size, out, port), nprocs=world_size)
