"""``RandomStateCheckpoint``: the global random states in every checkpoint, restored when a fit resumes.

Lightning restores the model, the optimizers, the loops and the callbacks from a checkpoint, but not the global
random number generators: a resumed run draws other dropout masks (and anything else drawn from torch's, Python's or
NumPy's global generator) than the uninterrupted run would have. This callback saves them with every checkpoint and
puts them back at the start of the first training batch after the resume, the point the saved run had reached.
"""

from __future__ import annotations

import random
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

try:  # NumPy's global generator is saved when NumPy is installed (it always is with Lightning)
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["RandomStateCheckpoint", "capture_random_state", "restore_random_state"]


def capture_random_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global random states of this process: torch's CPU generator, the CUDA generator of ``device`` (when it is
    a CUDA device), Python's ``random`` and NumPy's global generator."""
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    numpy_state = None
    if np is not None:  # as plain types and a tensor: checkpoints are read with torch.load(weights_only=True)
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss))
        numpy_state += (float(cached_gaussian),)
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(), "numpy": numpy_state}


def restore_random_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back the states :func:`capture_random_state` returned (the CUDA one on ``device``)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    if state.get("numpy") is not None and np is not None:
        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))


class RandomStateCheckpoint(Callback):
    """Save the global random states in every checkpoint; restore them when ``fit(ckpt_path=...)`` resumes.

    One line makes a resumed run draw the same dropout masks as the uninterrupted one::

        trainer = pl.Trainer(callbacks=[RandomStateCheckpoint(), ...])

    Saved: torch's CPU generator, the CUDA generator of the module's device, Python's ``random`` and NumPy's global
    generator, for every process (under DDP the states of all ranks are gathered into the checkpoint, and each rank
    takes back its own). Restored at the start of the first training batch after loading a checkpoint, before the
    training step: whatever the resumed run drew while starting up (a sanity check, creating its dataloaders) is
    overwritten.

    The resumed run then draws exactly what the uninterrupted one drew after the checkpoint, provided nothing drew
    from the global generators between the checkpoint and that batch in the uninterrupted run. Within an epoch that
    holds (a checkpoint written at the end of a training batch); across an epoch boundary a ``DataLoader`` draws once
    from torch's generator when it starts its iterator (and a ``RandomSampler`` without a ``generator=`` draws the
    order), so give the training ``DataLoader`` its own ``generator=torch.Generator()`` there. A mid-epoch resume also
    needs a dataloader that resumes where it stopped (one with ``state_dict``/``load_state_dict``, which Lightning
    checkpoints) and any state the model carries between batches; docs/callback.md#checkpoints-and-resuming.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._loaded: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else None
        state = capture_random_state(device)
        world_size = trainer.world_size if trainer is not None else 1
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(ranks, state)  # every rank saves a checkpoint together
            return {"ranks": ranks}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") if isinstance(state_dict, dict) else None
        if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) and "torch" in r for r in ranks):
            raise ValueError(
                "not a RandomStateCheckpoint state: expected {'ranks': [one dict of random states per process]}, got "
                f"keys {sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__}"
            )
        self._loaded = ranks

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ranks, self._loaded = self._loaded, None
        if ranks is None:
            return
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"RandomStateCheckpoint: the checkpoint holds the random states of {len(ranks)} process(es), this run "
                f"has {trainer.world_size}; the random states are not restored, so this resume draws other random "
                "numbers than the saved run would have"
            )
            return
        restore_random_state(ranks[trainer.global_rank], pl_module.device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loaded = None  # a checkpoint loaded for validate/test, or a fit that ended before its first batch
