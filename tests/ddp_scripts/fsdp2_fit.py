"""A tiny LSTM language model trained by Lightning's ``ModelParallelStrategy`` (FSDP2) on CPU processes (gloo).

    python tests/ddp_scripts/fsdp2_fit.py OUT_DIR --devices N [--package pytorch_lightning|lightning.pytorch]
        [--ckpt PATH] [--distributed-ckpt | --full-ckpt] [--max-steps K] [--callback SPEC ...] [--plain] [--export]

``configure_model`` calls ``fully_shard`` on the embedding, the 2-layer ``nn.LSTM``, the decoder and the module
(rows of 23 and 4 x 13: no world size of 2 or 4 splits them evenly, and an LSTM's gates span ranks). Every rank sees
``GLOBAL_BATCH // N`` windows of the same global batch (Lightning's ``DistributedSampler`` over an unshuffled
loader), so N processes take the steps one process takes with the whole batch. At the end every rank takes part in
saving ``OUT_DIR/ckpt`` (a folder of shards with ``--distributed-ckpt``, the default; one file with ``--full-ckpt``)
and writes what the tests compare: ``rank{r}.pt`` (the full weights, gathered with ``full_tensor()`` after training,
and the rank's loss per step) and ``rank{r}.json`` (the hooks it saw in order, with what held at each; what the
callbacks loaded). ``--plain`` trains the same module without sharding under a single-device Trainer (``N`` = 1).

``--callback`` specs: ``probe`` (a callback whose state holds uint8 and bool ``DTensor`` masks sharded like the
parameters, and a plain tensor that differs per rank), ``selfish`` (``SelfishSparsityCallback``; see
:func:`sparsity_callback`, where the sharded callback plugs in), ``selfish:METHOD:SPARSITY:monitor`` (the same, with
``TopologyMonitor``, ``MaskHistory`` writing ``OUT_DIR/masks`` and ``FlopsCallback``, logging to a
:class:`MemoryLogger` whose records, per rank, go into ``rank{r}.pt``). ``--export`` writes, from every rank, the
final model with ``save_compressed`` (``OUT_DIR/compressed.pt``) and ``save_dense`` (``OUT_DIR/dense.pt``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]  # the checkout under test, not an installed copy

VOCAB, EMBEDDING, HIDDEN, LAYERS, WINDOW = 23, 11, 13, 2, 5
GLOBAL_BATCH, BATCHES_PER_EPOCH = 4, 3
DATA_SEED, INIT_SEED = 0, 1234


def token_windows() -> TensorDataset:
    """``GLOBAL_BATCH * BATCHES_PER_EPOCH`` random windows of ``WINDOW + 1`` tokens (inputs, next-token targets)."""
    tokens = torch.randint(
        0, VOCAB, (GLOBAL_BATCH * BATCHES_PER_EPOCH, WINDOW + 1), generator=torch.Generator().manual_seed(DATA_SEED)
    )
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class LanguageModel(nn.Module):
    """Embedding -> 2-layer nn.LSTM -> Linear; every window starts from a zero state."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMBEDDING)
        self.rnn = nn.LSTM(EMBEDDING, HIDDEN, num_layers=LAYERS)
        self.decoder = nn.Linear(HIDDEN, VOCAB)

    def loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch[0].t(), batch[1].t()  # (T, B)
        out, _ = self.rnn(self.encoder(x))
        return nn.functional.cross_entropy(self.decoder(out).reshape(-1, VOCAB), y.reshape(-1))


def shard(lm: LanguageModel, mesh: Any) -> None:
    """FSDP2 as users apply it: each part, then the whole (parameters become DTensors sharded on dim 0)."""
    from torch.distributed.fsdp import fully_shard

    for part in (lm.encoder, lm.rnn, lm.decoder):
        fully_shard(part, mesh=mesh)
    fully_shard(lm, mesh=mesh)


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if name == "sntasgd":  # (averaging starts after the first step: TinyLSTM.training_step)
        from lightning_selfish import SNTASGD

        return SNTASGD(params, lr=0.5)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def rank_loader(world_size: int, rank: int) -> DataLoader:
    """This rank's part of every global batch, in order: windows ``rank, rank + N, ...`` of each batch of
    ``GLOBAL_BATCH``. (Given a loader, Lightning would put a *shuffling* ``DistributedSampler`` in it under any
    distributed strategy, one process included, and leave a single-device Trainer's order alone.)"""
    dataset = token_windows()
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective on sharded ones: every rank must call it)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in module.named_parameters()
    }


def shard_checksum(module: nn.Module) -> float:
    """The sum of this rank's parameter shards: tells, without communication, whether weights changed."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in module.parameters()]
    return float(sum(t.detach().double().sum() for t in local))


def probe_mask(shape: torch.Size, step: int) -> torch.Tensor:
    """The probe's whole mask at ``step``: a function of the flat position and the step alone."""
    numel = shape.numel()
    return ((torch.arange(numel) * 7 + step) % 5 == 0).reshape(shape).to(torch.uint8)


def classes(package: str) -> dict[str, Any]:
    """The LightningModule and callbacks of the Lightning package ``package``."""
    pl = importlib.import_module(package)

    class TinyLSTM(pl.LightningModule):
        """:class:`LanguageModel` under Lightning; ``configure_model`` shards it when the strategy has a mesh."""

        def __init__(self, optimizer: str, events: list) -> None:
            super().__init__()
            self.lm = LanguageModel()
            self.optimizer_name, self.events, self.losses, self.windows = optimizer, events, [], []

        def configure_model(self) -> None:
            self.events.append({"hook": "LightningModule.configure_model", "sharded": is_sharded(self)})
            if self.device_mesh is not None and not is_sharded(self):
                shard(self.lm, self.device_mesh["data_parallel"])

        def configure_optimizers(self):
            self.events.append({"hook": "LightningModule.configure_optimizers", "sharded": is_sharded(self)})
            return make_optimizer(self.optimizer_name, self.parameters())

        def train_dataloader(self) -> DataLoader:
            return rank_loader(self.trainer.world_size, self.trainer.global_rank)

        def training_step(self, batch, batch_idx):
            optimizer = self.trainer.optimizers[0]
            if self.trainer.global_step == 1 and hasattr(optimizer, "start_averaging") and not optimizer.averaging:
                optimizer.start_averaging()  # (SNT-ASGD: averaged from the second step on)
            loss = self.lm.loss(batch)
            self.losses.append(float(loss.detach()))  # this rank's mean over its windows (harness only)
            self.windows.append(batch[0].tolist())
            return loss

    class Recorder(pl.Callback):
        """Records the hooks it sees in order, what held at each, and what its state brought back on load."""

        def __init__(self, events: list) -> None:
            self.events = events

        def _note(self, hook: str, trainer, **extra: Any) -> None:
            module = trainer.lightning_module
            optimizers = trainer.optimizers
            self.events.append(
                {
                    "hook": f"Callback.{hook}",
                    "sharded": is_sharded(module),
                    "strategy_model_is_module": trainer.strategy.model is module,
                    "optimizers": len(optimizers),
                    "optimizer_state": sum(len(o.state) for o in optimizers),
                    "weights": shard_checksum(module),
                    "global_step": trainer.global_step,
                    **extra,
                }
            )

        def setup(self, trainer, pl_module, stage):
            self._note("setup", trainer)

        def on_fit_start(self, trainer, pl_module):
            self._note("on_fit_start", trainer)

        def on_train_start(self, trainer, pl_module):
            self._note("on_train_start", trainer)

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            self._note("on_load_checkpoint", trainer)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self._note("on_save_checkpoint", trainer)

        def state_dict(self) -> dict[str, Any]:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            return {"saved_by_rank": rank, "rank_tensor": torch.tensor([rank])}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.events.append(
                {
                    "hook": "Callback.load_state_dict",
                    "saved_by_rank": state_dict["saved_by_rank"],
                    "rank_tensor": state_dict["rank_tensor"].tolist(),
                }
            )

    class ShardProbe(pl.Callback):
        """A stand-in for a callback that keeps masks sharded like their weights (uint8 and bool ``DTensor``s with
        each parameter's placements), carried through a checkpoint by one of three ``routes``, and recording on load
        what came back on this rank:

        - ``state``: in the callback's ``state_dict()`` (Lightning writes it to ``meta.pt`` from rank 0 alone);
        - ``model-state``: added to ``checkpoint["state_dict"]`` in ``on_save_checkpoint`` (DTensors when the
          strategy's model state is sharded, gathered when it is full), read back from ``trainer.ckpt_path`` with
          ``dcp.load`` (a folder) or ``torch.load`` (a file) in ``on_load_checkpoint``;
        - ``buffers``: registered as ``DTensor`` buffers of the modules that own the weights, so that the strategy
          saves and loads them with the model."""

        PREFIX = "probe_masks."

        def __init__(self, events: list, route: str = "state") -> None:
            self.events, self.route = events, route
            self.module: nn.Module | None = None
            self.step = 0
            self.came_back: dict[str, torch.Tensor] = {}

        @property
        def state_key(self) -> str:
            return f"ShardProbe[{self.route}]"  # (one probe per route in one Trainer)

        def on_fit_start(self, trainer, pl_module):
            self.module = pl_module
            if self.route == "buffers":
                for key, mask in self._keyed(self._masks(0)).items():
                    owner, name = key.rsplit(".", 1)
                    pl_module.get_submodule(owner).register_buffer(name, mask)

        def on_train_epoch_end(self, trainer, pl_module):  # (before ModelCheckpoint's: Lightning runs it last)
            self.step = trainer.global_step
            if self.route == "buffers":
                for key, mask in self._keyed(self._masks(self.step)).items():
                    pl_module.get_buffer(key).copy_(mask)

        def _masks(self, step: int) -> dict[str, torch.Tensor]:
            masks = {}
            for name, p in self.module.named_parameters():
                whole = probe_mask(p.shape, step)
                masks[name] = (
                    distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor)
                    else whole
                )
            return masks

        def _keyed(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """``{owner.probe_KIND_NAME: mask}``: under the module owning each weight (for ``buffers``)."""
            keyed = {}
            for name, mask in masks.items():
                owner, leaf = name.rsplit(".", 1)
                keyed[f"{owner}.probe_uint8_{leaf}"] = mask
                keyed[f"{owner}.probe_bool_{leaf}"] = mask.bool()
            return keyed

        def state_dict(self) -> dict[str, Any]:
            if self.route != "state":
                return {"step": self.step}
            masks = self._masks(self.step)
            return {"step": self.step, "uint8": masks, "bool": {n: m.bool() for n, m in masks.items()}}

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            if self.route != "model-state":
                return
            weights = checkpoint["state_dict"]  # sharded: DTensors on every rank; full: tensors on rank 0 only
            sharded = any(isinstance(w, DTensor) for w in weights.values())
            for key, mask in self._keyed(self._masks(self.step)).items():
                whole = isinstance(mask, DTensor) and not sharded
                weights[self.PREFIX + key] = mask.full_tensor() if whole else mask  # (a collective when whole)

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            if self.route != "model-state":
                return
            import torch.distributed.checkpoint as dcp

            path = Path(trainer.ckpt_path)
            template = {self.PREFIX + key: mask for key, mask in self._keyed(self._masks(0)).items()}
            if path.is_dir():  # the strategy's folder of shards: this rank reads its own rows, whatever wrote them
                dcp.load({"state_dict": template}, checkpoint_id=path)
                self.came_back = template
            else:
                whole = torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"]
                self.came_back = {
                    key: distribute_tensor(whole[key], t.device_mesh, t.placements, src_data_rank=None)
                    if isinstance(t, DTensor)
                    else whole[key]
                    for key, t in template.items()
                }

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            if self.route == "state":
                got = {f"{kind}:{name}": m for kind in ("uint8", "bool") for name, m in state_dict[kind].items()}
            else:
                source = self.came_back if self.route == "model-state" else dict(self.module.named_buffers())
                got = {}
                for name in dict(self.module.named_parameters()):
                    owner, leaf = name.rsplit(".", 1)
                    prefix = self.PREFIX if self.route == "model-state" else ""
                    for kind in ("uint8", "bool"):
                        got[f"{kind}:{name}"] = source[f"{prefix}{owner}.probe_{kind}_{leaf}"]
            expected = self._masks(state_dict["step"])
            seen = {}
            for key, mask in got.items():
                want = expected[key.split(":", 1)[1]]
                local = mask.to_local() if isinstance(mask, DTensor) else mask
                want_local = want.to_local() if isinstance(want, DTensor) else want
                seen[key] = {
                    "type": type(mask).__name__,
                    "dtype": str(mask.dtype),
                    "global_shape": list(mask.shape),
                    "local_shape": list(local.shape),
                    "mesh_size": mask.device_mesh.size() if isinstance(mask, DTensor) else None,
                    "equals_own_shard": local.shape == want_local.shape
                    and bool(torch.equal(local.to(want_local.dtype), want_local)),
                }
            self.events.append({"hook": "ShardProbe.loaded", "route": self.route, "masks": seen})

    class SparsityRecorder(pl.Callback):
        """Beside ``SelfishSparsityCallback``: after every optimizer step, whether every inactive weight is zero
        on this rank's rows, the whole tensors' active counts (summed over ranks), and the whole masks (gathered:
        the test compares them with one process's run)."""

        def __init__(self, sparsity: Any) -> None:
            self.sparsity, self.steps = sparsity, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            engine = self.sparsity.engine
            zeros = all(
                bool((t.param.detach()[~t.mask] == 0).all()) and tuple(t.mask.shape) == tuple(t.param.shape)
                for t in engine.tensors.values()
            )
            counts = {name: t.active for name, t in engine.tensors.items()}
            self.steps.append(
                {
                    "step": trainer.global_step,
                    "zeros": zeros,
                    "active": counts,
                    "masks": engine.whole_masks(),
                    "updates": self.sparsity.num_updates,
                    "next_draw": self.sparsity.controller.draws.next_draw,
                }
            )

    class ImageRecorder:
        """A TensorBoard-like ``experiment``: records the images and custom-scalar layouts it is given."""

        def __init__(self) -> None:
            self.images: list[dict[str, Any]] = []
            self.layouts: list[Any] = []

        def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
            self.images.append({"tag": tag, "step": step, "image": torch.as_tensor(image).clone()})

        def add_custom_scalars(self, layout: Any) -> None:
            self.layouts.append(layout)

    class MemoryLogger(pl.loggers.Logger):
        """Every ``log_metrics`` call this rank's logger gets (no rank-zero filter: a rank that logs shows)."""

        def __init__(self) -> None:
            super().__init__()
            self.records: list[dict[str, Any]] = []
            self._experiment = ImageRecorder()

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        @property
        def experiment(self) -> ImageRecorder:
            return self._experiment

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.records.append({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    return {
        "pl": pl,
        "MemoryLogger": MemoryLogger,
        "TinyLSTM": TinyLSTM,
        "Recorder": Recorder,
        "ShardProbe": ShardProbe,
        "SparsityRecorder": SparsityRecorder,
    }


def sparsity_callback(spec: str) -> Any:
    """Where the sharded sparsity callback plugs in: ``selfish`` or ``selfish:METHOD:SPARSITY[:monitor]``.

    A :class:`SparsityRecorder` beside it records the masks and counts after every step."""
    from lightning_selfish import SelfishSparsityCallback

    parts = spec.split(":")
    method = parts[1] if len(parts) > 1 else "selfish"
    sparsity = float(parts[2]) if len(parts) > 2 else 0.5
    return SelfishSparsityCallback(sparsity=float(sparsity), method=method, seed=0, update_every=2, prune_rate=0.3)


def plain_checkpoint(folder: Path, module: nn.Module, out: Path) -> Path:
    """A distributed checkpoint of ``ModelParallelStrategy`` as a file a single-device Trainer resumes from: the
    shards joined by ``dcp_to_torch_save``, the folder's ``meta.pt`` (loops, callbacks) added, and the optimizer
    state keyed by parameter index, as ``torch.optim`` keys it, instead of by name, as DCP does. (Lightning's own
    ``consolidate_checkpoint`` expects Fabric's ``"model"`` key and fails on a Trainer's folder with
    ``KeyError: 'model'``.)"""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, out)
    checkpoint = torch.load(out, weights_only=False)
    checkpoint.update(torch.load(folder / "meta.pt", weights_only=False))
    from lightning_selfish.run.sharded_checkpoint import move_into_callback_state

    move_into_callback_state(checkpoint, "SelfishSparsityCallback")  # (the masks the model state carried)
    index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    count = sum(key.startswith("optimizer_") and key[len("optimizer_") :].isdigit() for key in checkpoint)
    checkpoint["optimizer_states"] = []
    for i in range(count):
        state = checkpoint.pop(f"optimizer_{i}")
        groups = [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]]
        checkpoint["optimizer_states"].append(
            {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}
        )
    torch.save(checkpoint, out)
    return out


def monitors(out_dir: Path) -> list:
    """The monitors and tools that read the masks: ``TopologyMonitor`` (a picture at every update),
    ``MaskHistory`` (every epoch, in ``OUT_DIR/masks``) and ``FlopsCallback``."""
    from lightning_selfish import FlopsCallback, MaskHistory, TopologyMonitor

    return [TopologyMonitor(image_resolution=8), MaskHistory(dirpath=out_dir / "masks"), FlopsCallback()]


def build_callbacks(specs: list[str], found: dict[str, Any], events: list, out_dir: Path) -> list:
    callbacks = [found["Recorder"](events)]
    for spec in specs:
        if spec.split(":")[0] == "probe" and spec.split(":")[1:] in ([], ["state"], ["model-state"], ["buffers"]):
            callbacks.append(found["ShardProbe"](events, *spec.split(":")[1:]))
        elif spec.split(":")[0] == "selfish":
            if spec.split(":")[3:] == ["monitor"]:  # (before the callback whose masks they read: a user's order)
                callbacks.extend(monitors(out_dir))
            callbacks.append(sparsity_callback(spec))
            callbacks.append(found["SparsityRecorder"](callbacks[-1]))
        else:
            raise ValueError(
                "--callback must be 'probe[:state|model-state|buffers]' or 'selfish[:METHOD:SPARSITY[:monitor]]', "
                f"got {spec!r}"
            )
    return callbacks


def export(trainer: Any, model: nn.Module, out_dir: Path) -> None:
    """The final model as a user exports it: every rank takes part (the masks and weights are gathered), rank 0
    writes the files."""
    from lightning_selfish import SelfishSparsityCallback
    from lightning_selfish.export import save_compressed, save_dense

    (sparsity,) = [c for c in trainer.callbacks if isinstance(c, SelfishSparsityCallback)]
    masks = sparsity.whole_masks()
    save_compressed(model, masks, out_dir / "compressed.pt")
    save_dense(model, masks, out_dir / "dense.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--devices", type=int, default=2, choices=(1, 2, 4))
    parser.add_argument("--package", default="pytorch_lightning", choices=("pytorch_lightning", "lightning.pytorch"))
    parser.add_argument("--ckpt", type=Path, default=None, help="resume from this checkpoint (folder or file)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--distributed-ckpt", dest="distributed", action="store_true", default=True)
    form.add_argument("--full-ckpt", dest="distributed", action="store_false")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-epochs", type=int, default=2, help="(resume from an epoch's end with this, not steps)")
    parser.add_argument(
        "--callback", action="append", default=[], help="probe[:ROUTE] or selfish[:METHOD:SPARSITY[:monitor]]"
    )
    parser.add_argument("--optimizer", default="momentum", choices=("momentum", "adam", "sntasgd"))
    parser.add_argument("--plain", action="store_true", help="a single-device Trainer, no sharding")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="ModelParallelStrategy's tensor_parallel_size")
    parser.add_argument("--export", action="store_true", help="export the final model (every rank; rank 0 writes)")
    args = parser.parse_args()
    if args.plain and args.devices != 1:
        parser.error(f"--plain trains on one device, got --devices {args.devices}")

    torch.set_num_threads(1)
    found = classes(args.package)
    pl = found["pl"]
    pl.seed_everything(INIT_SEED, verbose=False)  # every rank builds the same whole weights before sharding
    events: list = []
    model = found["TinyLSTM"](args.optimizer, events)
    if args.plain:
        strategy: Any = "auto"
    else:
        strategy = importlib.import_module(f"{args.package}.strategies").ModelParallelStrategy(
            data_parallel_size=args.devices // args.tensor_parallel,
            tensor_parallel_size=args.tensor_parallel,
            save_distributed_checkpoint=args.distributed,
        )
    logged = any(spec.split(":")[3:] == ["monitor"] for spec in args.callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        callbacks=[
            *build_callbacks(args.callback, found, events, args.out_dir),
            pl.callbacks.ModelCheckpoint(dirpath=args.out_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
        ],
        logger=found["MemoryLogger"]() if logged else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    ckpt = args.ckpt
    if args.plain and ckpt is not None and ckpt.is_dir():
        args.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = plain_checkpoint(ckpt, model, args.out_dir / "from_distributed.ckpt")
    trainer.fit(model, ckpt_path=ckpt)
    rank = trainer.global_rank
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = full_weights(model)  # a collective: after training, for the tests only
    optimizer = trainer.optimizers[0]
    if hasattr(optimizer, "averaged_parameters"):  # SNT-ASGD's averages, whole (a collective too)
        names = [name for name, _ in model.named_parameters()]
        averaged = [a.full_tensor() if isinstance(a, DTensor) else a for a in optimizer.averaged_parameters()]
        weights.update({f"averaged.{n}": a.detach().clone() for n, a in zip(names, averaged)})
    recorded = [c.steps for c in trainer.callbacks if isinstance(c, found["SparsityRecorder"])]
    if args.export:
        export(trainer, model, args.out_dir)
    logger = trainer.logger if isinstance(trainer.logger, found["MemoryLogger"]) else None
    torch.save(
        {
            "weights": weights,
            "losses": model.losses,
            "windows": model.windows,
            "sparsity": recorded,
            "logged": logger.records if logger else [],
            "images": logger.experiment.images if logger else [],
            "layouts": logger.experiment.layouts if logger else [],
        },
        args.out_dir / f"rank{rank}.pt",
    )
    seen = {
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "package": args.package,
        "global_step": trainer.global_step,
        "events": events,
    }
    (args.out_dir / f"rank{rank}.json").write_text(json.dumps(seen, indent=1))


if __name__ == "__main__":
    main()
