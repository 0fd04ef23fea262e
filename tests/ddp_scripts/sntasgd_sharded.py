"""SNTASGD on FSDP2-sharded parameters, 2 gloo processes: ``python sntasgd_sharded.py OUT WORLD_SIZE PORT``.

Every rank builds the same model, shards it with ``fully_shard`` (``DTensor`` parameters, ``Shard(0)``), attaches the
masks as its local rows, trains with averaging and one topology update (:func:`train`), and saves what it ended with,
gathered with ``full_tensor()`` (here only, never in the optimizer). Then two checkpoint round trips on the same ranks:
``state_dict()`` -> ``load_state_dict()`` and ``torch.distributed.checkpoint`` (each rank writes its shards). The test
runs :func:`train` on one process with the whole masks and compares. Every rank trains on the same batches, so
FSDP2's averaged gradient ``(g + g) / 2`` is ``g`` exactly and the runs can be compared bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_selfish.core.types import MaskUpdate
from lightning_selfish.optim.sntasgd import SNTASGD

LR, WEIGHT_DECAY = 0.3, 1e-3
STEPS, AVERAGING_FROM, MASK_UPDATE_AT = 7, 2, 4  # averaging starts before step 2; the topology changes before step 4


class Net(nn.Module):
    """An LSTM (4 gates of 3 rows), a Linear of 5 rows (3 and 2 per rank) and one of 1 row (rank 1 holds none)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 3)
        self.mid = nn.Linear(3, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.rnn(x)[0])))


def build() -> Net:
    torch.manual_seed(0)
    return Net()


def masked_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.dim() == 2]


def full_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: torch.rand(p.shape, generator=generator) < 0.5
        for name, p in model.named_parameters()
        if name in masked_names(model)
    }


def full_mask_update(masks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(kept, new)`` of every masked tensor: about half the live weights removed, as many grown, one of them a
    removed one (regrown in place)."""
    generator = torch.Generator().manual_seed(2)
    out = {}
    for name, old in masks.items():
        removed = old & (torch.rand(old.shape, generator=generator) < 0.5)
        grown = ~old & (torch.rand(old.shape, generator=generator) < 0.4)
        regrown = removed.flatten().nonzero()[:1].flatten()
        grown.view(-1)[regrown] = True
        out[name] = (old & ~removed, (old & ~removed) | grown)
    return out


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 2, 4, generator=generator), torch.randn(5, 2, 1, generator=generator)) for _ in range(9)]


class Collectives(TorchDispatchMode):
    """Records every collective (``c10d`` and functional ``_c10d_functional`` ops) run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in func.namespace:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def averages_by_name(model: nn.Module, opt: SNTASGD) -> dict[str, torch.Tensor]:
    """``averaged_parameters()`` (in ``param_groups`` order), gathered, by parameter name."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    return dict(zip(order, map(gathered, opt.averaged_parameters()), strict=True))


def one_step(model: nn.Module, opt: SNTASGD, masks: dict[nn.Parameter, torch.Tensor], batch, watch=None) -> None:
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with watch or contextlib.nullcontext():
        opt.step()
    with torch.no_grad():  # the engine's enforcement: this rank's rows times its mask
        for p, mask in masks.items():
            local(p).mul_(mask)


def train(model: nn.Module, shard_of: Callable[[torch.Tensor], torch.Tensor], watch=None) -> tuple[SNTASGD, dict]:
    """Train ``model`` (sharded or not; ``shard_of`` maps a whole tensor to this rank's rows) and gather the result.

    Masks (this rank's rows) are attached with ``set_masks``; averaging starts after two steps; before step 4 about
    half the live weights of each tensor are removed and as many grown, and the optimizer is told with
    ``on_mask_update``. Every call of the optimizer runs inside ``watch`` (a context manager), if given."""
    watch = watch or contextlib.nullcontext()
    params = dict(model.named_parameters())
    masks = {params[name]: shard_of(mask).clone() for name, mask in full_masks(model).items()}
    with torch.no_grad():
        for p, mask in masks.items():
            local(p).mul_(mask)
    opt = SNTASGD(
        [
            {"params": [params[name] for name in masked_names(model)]},
            {"params": [p for name, p in params.items() if name not in masked_names(model)], "lr": LR / 2},
        ],
        lr=LR,
        weight_decay=WEIGHT_DECAY,
    )
    with watch:
        opt.set_masks(masks)
    updates = full_mask_update(full_masks(model))
    for step, batch in enumerate(batches()[:STEPS]):
        if step == AVERAGING_FROM:
            with watch:
                opt.start_averaging()
        if step == MASK_UPDATE_AT:
            with torch.no_grad():
                for name, (kept, new) in updates.items():
                    p, mask = params[name], masks[params[name]]
                    old = mask.clone()
                    local(p).mul_(shard_of(kept))
                    mask.copy_(shard_of(new))
                    with watch:
                        opt.on_mask_update(p, MaskUpdate(old, shard_of(kept), mask))
        one_step(model, opt, masks, batch, watch)
    with watch:
        averaged_and_raw = {name: opt.averaged_and_raw(p) for name, p in params.items()}
    result = {
        "params": {name: gathered(p) for name, p in params.items()},
        "averages": averages_by_name(model, opt),
        "ages": {name: gathered(opt.state[p]["age"]) for name, p in params.items() if "age" in opt.state[p]},
        "counts": {name: opt.state[p]["n"] for name, p in params.items() if "n" in opt.state[p]},
        "averaged_and_raw": {name: tuple(map(gathered, pair)) for name, pair in averaged_and_raw.items()},
    }
    swap = opt.swap_averaged()
    with watch:
        swap.__enter__()
    result["swapped"] = {name: gathered(p) for name, p in params.items()}
    result["swapped_averages"] = averages_by_name(model, opt)
    with watch:
        swap.__exit__(None, None, None)
    result["after_swap"] = {name: gathered(p) for name, p in params.items()}
    result["masks"] = masks
    return opt, result


def cloned(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: cloned(item) for key, item in value.items()}
    if isinstance(value, list):
        return [cloned(item) for item in value]
    return value


def state_tensors(opt: SNTASGD) -> list[tuple[str, str, tuple[int, ...], torch.Tensor | int]]:
    """Every state entry: (kind, placements, local shape, this rank's values) in parameter order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in sorted(opt.state[p].items()):
                if isinstance(value, DTensor):
                    out.append((key, str(value.placements), tuple(value.to_local().shape), value.to_local().clone()))
                else:
                    out.append((key, type(value).__name__, (), value))
    return out


def continued(model: nn.Module, opt: SNTASGD, masks: dict[nn.Parameter, torch.Tensor]) -> list[torch.Tensor]:
    for batch in batches()[STEPS:]:
        one_step(model, opt, masks, batch)
    return [gathered(p) for p in model.parameters()] + list(averages_by_name(model, opt).values())


def main(rank: int, world_size: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    model = build()
    for module in (model.rnn, model.mid, model.out, model):
        fully_shard(module, mesh=mesh)

    def shard_of(tensor: torch.Tensor) -> torch.Tensor:  # FSDP2's rows: torch.chunk's split, empty on the last ranks
        chunk = -(-tensor.shape[0] // world_size)
        return tensor[min(rank * chunk, tensor.shape[0]) : min((rank + 1) * chunk, tensor.shape[0])]

    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) and torch.equal(local(p), shard_of(p.full_tensor())), name
    for name, mask in full_masks(model).items():  # what docs/sntasgd.md tells users to write, without communication
        with Collectives() as spy:
            rows = distribute_tensor(mask, mesh, [Shard(0)], src_data_rank=None).to_local()
        assert torch.equal(rows, shard_of(mask)) and spy.calls == [], (name, spy.calls)
    result: dict = {"local_rows": {name: local(p).shape[0] for name, p in model.named_parameters()}}

    spy = Collectives()
    with spy:  # the spy sees what crosses ranks: a gather, as the test itself does below
        model.mid.weight.full_tensor()
    result["spy_sees_a_gather"] = spy.calls
    spy = Collectives()
    opt, trained = train(model, shard_of, watch=spy)
    masks = trained.pop("masks")
    result.update(trained)
    result["state_kinds"] = {
        name: {key: type(value).__name__ for key, value in opt.state[p].items()} for name, p in model.named_parameters()
    }

    whole = next(iter(masks))  # a mask of the whole tensor, not this rank's rows: refused, naming the local shape
    try:
        opt.set_masks({whole: torch.ones(whole.shape, dtype=torch.bool)})
    except ValueError as error:
        result["whole_mask_error"] = str(error)

    # Checkpoint round trips on the same ranks: the state dict as it is, and torch.distributed.checkpoint.
    saved_weights = [local(p).clone() for p in model.parameters()]
    with spy:
        saved_state = cloned(opt.state_dict())
    saved_tensors = state_tensors(opt)
    dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=f"{out}/dcp")
    result["continued"] = continued(model, opt, masks)

    def restored(load: Callable[[SNTASGD], None]) -> SNTASGD:
        with torch.no_grad():
            for p, weights in zip(model.parameters(), saved_weights):
                local(p).copy_(weights)
        fresh = SNTASGD([{"params": group["params"]} for group in opt.param_groups], lr=LR, weight_decay=WEIGHT_DECAY)
        fresh.set_masks(masks)  # the masks' owner attaches them again
        load(fresh)
        return fresh

    def from_state_dict(fresh: SNTASGD) -> None:
        with spy:
            fresh.load_state_dict(cloned(saved_state))

    fresh = restored(from_state_dict)
    result["state_dict_restores"] = all(
        a[:3] == b[:3] and (torch.equal(a[3], b[3]) if isinstance(a[3], torch.Tensor) else a[3] == b[3])
        for a, b in zip(state_tensors(fresh), saved_tensors, strict=True)
    )
    result["state_dict_continued"] = continued(model, fresh, masks)

    def from_dcp(fresh: SNTASGD) -> None:
        template = get_optimizer_state_dict(model, opt)  # the layout to read into (opt's values are overwritten)
        dcp.load(template, checkpoint_id=f"{out}/dcp")
        set_optimizer_state_dict(model, fresh, template)

    fresh = restored(from_dcp)
    result["dcp_restores"] = all(
        a[:3] == b[:3] and (torch.equal(a[3], b[3]) if isinstance(a[3], torch.Tensor) else a[3] == b[3])
        for a, b in zip(state_tensors(fresh), saved_tensors, strict=True)
    )
    result["dcp_continued"] = continued(model, fresh, masks)
    result["dcp_files"] = sorted(os.listdir(f"{out}/dcp"))
    result["optimizer_collectives"] = spy.calls  # step, mask updates, swaps, averages, state dicts: none

    # a state of whole tensors handed to load_state_dict directly is refused, naming the way that places it
    whole = cloned(saved_state)
    whole["state"][0]["ax"] = whole["state"][0]["ax"].full_tensor()
    try:
        fresh.load_state_dict(whole)
    except ValueError as error:
        result["whole_state_error"] = str(error)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    out, world_size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(main, args=(world_size, out, port), nprocs=world_size)
