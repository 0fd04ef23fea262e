"""``MaskHistory``: every epoch's masks, bit-packed, beside the run, for the topology analyses after training.

One file per epoch, ``<dirpath>/epoch_0003.pt``, holding the masks at the end of that training epoch (the topology
the epoch trained, and the one a checkpoint of that epoch holds), packed eight positions per byte: the 2 x 1500
stacked LSTM's 66.0M mask positions (embedding, decoder and the four LSTM tensors) take 8.25 MB per epoch, 1/32
of a float32 copy of those weights. ``init.pt`` holds the masks at the start of the run. :func:`load_mask_history`
reads them back.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_selfish import analysis
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.core.engine import SparseEngine, UpdateStats

log = logging.getLogger(__name__)

__all__ = ["MaskHistory", "MaskSnapshot", "load_mask_history", "load_mask_snapshot"]

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


@dataclass(frozen=True)
class MaskSnapshot:
    """One saved topology: the masks, the gate layouts of the stacked tensors, and when it was taken."""

    masks: dict[str, torch.Tensor]
    gates: dict[str, list[tuple[str, slice]]]
    epoch: int | None  # None: the masks at the start of the run
    step: int


class MaskHistory(Callback):
    """Save the sparsity masks at the end of every ``every_n_epochs``-th training epoch, bit-packed (rank zero).

    Nothing is written under ``fast_dev_run``, as with checkpoints. Under FSDP2 (``ModelParallelStrategy``) the
    files hold the whole masks too: when a file is due every rank's rows are gathered (every rank takes part, rank
    zero writes), at those times only.

    Args:
        dirpath: where the files go; default ``<trainer.log_dir>/masks`` (beside the run's logs, e.g.
            ``lightning_logs/<name>/version_0/masks``).
        every_n_epochs: save every this many epochs (and always the initial masks).
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_epochs: int = 1) -> None:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"dirpath must be a path (str or os.PathLike) or None, got {dirpath!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise TypeError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_epochs = every_n_epochs
        self.engine: SparseEngine | None = None
        self._directory: Path | None = None

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def directory(self, trainer: pl.Trainer) -> Path:
        """Where the files go; call it on every rank (``trainer.log_dir`` broadcasts under DDP)."""
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir) / "masks"

    def on_topology_update(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: SparseEngine, stats: UpdateStats | None
    ) -> None:
        self.engine = engine
        if stats is None:
            if trainer.fast_dev_run:  # like checkpointing: a smoke test leaves no files behind
                self._directory = None
                return
            self._directory = self.directory(trainer)  # on every rank: trainer.log_dir is a collective under DDP
            path = self._directory / "init.pt"
            if engine.sharded:  # (rank zero's file system decides: every rank gathers, or none)
                if trainer.strategy.broadcast(not path.exists() if trainer.is_global_zero else False, src=0):
                    self._save(trainer, path, epoch=None)
            elif trainer.is_global_zero and not path.exists():  # a resumed run keeps the file of its real start
                self._save(trainer, path, epoch=None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (under ModelParallelStrategy the masks are set at the sparsity callback's on_train_start, maybe after ours)
        if self.engine is None and not any(isinstance(cb, SelfishSparsityCallback) for cb in trainer.callbacks):
            raise ValueError(
                "MaskHistory saves the masks of a SelfishSparsityCallback, but none told it about its masks: "
                "add SelfishSparsityCallback(...) to the trainer's callbacks"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs != 0 or self._directory is None or self.engine is None:
            return
        if trainer.is_global_zero or self.engine.sharded:
            self._save(trainer, self._directory / f"epoch_{epoch:04d}.pt", epoch=epoch)

    def _save(self, trainer: pl.Trainer, path: Path, epoch: int | None) -> None:
        """Rank zero writes the masks; sharded, every rank calls this (the masks are gathered whole first)."""
        assert self.engine is not None
        masks = self.engine.whole_masks() if self.engine.sharded else self.engine.masks
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        gates = {
            name: [(gate, rows.start, rows.stop) for gate, rows in t.gates]
            for name, t in self.engine.tensors.items()
            if t.gates
        }
        torch.save(
            {
                "epoch": epoch,
                "step": trainer.global_step,
                "masks": analysis.pack_masks(masks),
                "gates": gates,
            },
            path,
        )


def load_mask_snapshot(path: str | Path) -> MaskSnapshot:
    """Read one file written by :class:`MaskHistory`."""
    data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "masks" not in data:
        raise ValueError(f"{path} is not a MaskHistory file (expected a dict with 'masks')")
    gates = {name: [(g, slice(start, stop)) for g, start, stop in layout] for name, layout in data["gates"].items()}
    return MaskSnapshot(
        masks=analysis.unpack_masks(data["masks"]), gates=gates, epoch=data.get("epoch"), step=data.get("step")
    )


def load_mask_history(directory: str | Path) -> dict[int, MaskSnapshot]:
    """Every epoch's masks saved in ``directory`` by :class:`MaskHistory`, by epoch (``init.pt`` is left out)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no mask history at {directory} (MaskHistory writes <log_dir>/masks)")
    snapshots = {}
    for path in sorted(directory.iterdir()):
        match = _EPOCH_FILE.match(path.name)
        if match:
            snapshots[int(match.group(1))] = load_mask_snapshot(path)
    return dict(sorted(snapshots.items()))
