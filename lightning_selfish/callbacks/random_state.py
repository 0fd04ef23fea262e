"""``RandomStateCheckpoint``: the random states a fit draws from, in every checkpoint, put back where the saved run
went on drawing.

Lightning restores the model, the optimizers, the loops and the callbacks from a checkpoint, but no random generator:
neither the global ones (torch's, Python's, NumPy's: dropout, the order of a ``shuffle=True`` loader without a
generator) nor the train loader's own (``DataLoader(generator=...)``, a sampler's ``generator``). A resumed run then
draws other dropout masks and another data order than the uninterrupted run would have. This callback saves them all
at the moment a checkpoint is written, and puts them back at the point where the uninterrupted run went on from that
moment (:class:`RandomStateCheckpoint` says where).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

try:  # NumPy's global generator is saved when NumPy is installed (it always is with Lightning)
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = [
    "RandomStateCheckpoint",
    "capture_random_state",
    "loader_generator_states",
    "loader_generators",
    "replay_iterator_start",
    "restore_loader_generators",
    "restore_random_state",
    "train_loaders",
]

# where a loader keeps the generators it draws from: its own (the seed each iterator draws when it starts, and the
# order of shuffle=True), its sampler's, its batch sampler's (or that one's sampler's)
_GENERATOR_HOLDERS = ("sampler", "batch_sampler")


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


def train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The trainer's train loaders, one list however they were given (one, a list, a dict, nested), in a fixed order."""

    def flatten(iterables: Any) -> list[Any]:
        if isinstance(iterables, Mapping):
            return [loader for value in iterables.values() for loader in flatten(value)]
        if isinstance(iterables, (list, tuple)):
            return [loader for value in iterables for loader in flatten(value)]
        return [iterables]

    loaders = trainer.train_dataloader
    return [] if loaders is None else flatten(loaders)


def loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects ``loader`` draws from, by attribute path (``"generator"``,
    ``"sampler.generator"``, ``"batch_sampler.sampler.generator"``), each object once, at the first path reaching it
    (``DataLoader(shuffle=True, generator=g)`` gives its sampler the same ``g``)."""
    found: dict[str, torch.Generator] = {}

    def visit(holder: Any, prefix: str, depth: int) -> None:
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not seen for seen in found.values()):
            found[f"{prefix}generator"] = generator
        if depth < 2:
            for name in _GENERATOR_HOLDERS:
                inner = getattr(holder, name, None)
                if inner is not None:
                    visit(inner, f"{prefix}{name}.", depth + 1)

    visit(loader, "", 0)
    return found


def loader_generator_states(loaders: list[Any]) -> list[dict[str, torch.Tensor]]:
    """The state of every generator of every loader (:func:`loader_generators`), loader by loader."""
    return [
        {path: generator.get_state() for path, generator in loader_generators(loader).items()} for loader in loaders
    ]


def restore_loader_generators(loaders: list[Any], saved: list[dict[str, torch.Tensor]]) -> list[str]:
    """Put the states :func:`loader_generator_states` returned back into the loaders' generators, path by path; the
    lines that say which could not be (a loader that draws from other generators than the saved one, or fewer
    loaders)."""
    notices = []
    for index, loader in enumerate(loaders):
        generators = loader_generators(loader)
        states = saved[index] if index < len(saved) else {}
        if generators.keys() != states.keys():
            notices.append(
                f"RandomStateCheckpoint: train loader {index} draws from generators at {sorted(generators)}, the "
                f"checkpoint holds the states of {sorted(states)}: only those in both are restored, so the data order "
                "may differ from the uninterrupted run; resume with the loaders the checkpoint was written with"
            )
        for path in generators.keys() & states.keys():
            generators[path].set_state(states[path])
    if len(saved) > len(loaders):
        notices.append(
            f"RandomStateCheckpoint: the checkpoint holds the generators of {len(saved)} train loaders, this run has "
            f"{len(loaders)}: those of the others are not restored; resume with the loaders the checkpoint was "
            "written with"
        )
    return notices


def workers_notice(loaders: list[Any]) -> str | None:
    """The line a resume says when a train ``DataLoader`` has worker processes: they were seeded when Lightning
    started the iterator, before the saved states could be restored."""
    workers = [loader.num_workers for loader in loaders if isinstance(loader, DataLoader) and loader.num_workers > 0]
    if not workers:
        return None
    return (
        f"RandomStateCheckpoint: the train DataLoader has num_workers={workers[0]}, whose worker processes were seeded "
        "when this resumed fit started its iterator, before the saved random states could be restored: random draws "
        "inside the workers differ from the uninterrupted run; num_workers=0 resumes exactly"
    )


EARLIER_VERSION_NOTICE = (
    "RandomStateCheckpoint: the checkpoint was written by an earlier version, which saved neither the train loaders' "
    "generators nor whether it was written inside an epoch; its global random states are restored at the first "
    "training batch, as that version did, which may differ from the uninterrupted run (a checkpoint written by this "
    "version resumes exactly)"
)


def replay_iterator_start(loader: Any) -> None:
    """Draw what starting an iterator of ``loader`` draws (a ``DataLoader`` draws its workers' base seed from its
    ``generator``, or torch's global one), by starting one of an empty ``DataLoader`` with that generator: torch's own
    code draws. A loader with persistent workers draws once per fit, not per epoch, and other loaders nothing known."""
    if isinstance(loader, DataLoader) and not (loader.num_workers > 0 and loader.persistent_workers):
        iter(DataLoader((), generator=loader.generator))


class RandomStateCheckpoint(Callback):
    """Save the random states a fit draws from in every checkpoint; restore them when ``fit(ckpt_path=...)`` resumes.

    One line makes a resumed run draw the same data order and the same dropout masks as the uninterrupted one::

        trainer = pl.Trainer(callbacks=[RandomStateCheckpoint(), ...])

    Saved when a checkpoint is written, for every process (under DDP each rank's states are gathered into the
    checkpoint, and each rank takes back its own): torch's CPU generator, the CUDA generator of the module's device,
    Python's ``random``, NumPy's global generator, the generators of the train loaders (:func:`loader_generators`),
    and whether the checkpoint was written inside an epoch. Restored where the uninterrupted run went on from there:

    - written between epochs (an epoch's end, or after its last batch): at ``on_train_start``, over whatever the
      resumed run drew while starting up (creating its loaders, a sanity check); then the draw that starting the
      train iterator makes is made again (:func:`replay_iterator_start`), since Lightning started it before this hook
      and the uninterrupted run after the checkpoint. The next epoch then draws its order (``shuffle=True`` with or
      without a ``generator=``, a sampler's generator, a ``DistributedSampler``'s seed and epoch) and its dropout
      masks as the uninterrupted run did.
    - written inside an epoch: at the first training batch, once the loader handed it out. That resume goes on at
      the saved position only with a loader that has ``state_dict``/``load_state_dict`` (Lightning saves its state;
      without it Lightning restarts the epoch's data and warns that the loader is not resumable).

    Warned at the resume, in one line, where it cannot be exact: another number of processes (nothing restored),
    ``num_workers > 0`` (the workers were seeded before the restore), a train loader whose generators are not those
    the checkpoint holds, a checkpoint of an earlier version. Not covered: a dataset or sampler that draws from a
    generator of its own kept elsewhere, and hooks that draw from the global generators between the checkpoint and
    the next batch (docs/callback.md#random-states-randomstatecheckpoint).
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._batches_begun = 0  # training batches begun in the current epoch; 0 between epochs
        self._loaded: list[dict[str, Any]] | None = None
        self._loaded_between_epochs: bool | None = None

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else None
        state = capture_random_state(device)
        state["loaders"] = loader_generator_states(train_loaders(trainer) if trainer is not None else [])
        inside = trainer is not None and 0 < self._batches_begun < trainer.num_training_batches
        world_size = trainer.world_size if trainer is not None else 1
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(ranks, state)  # every rank saves a checkpoint together
        else:
            ranks = [state]
        return {"ranks": ranks, "between_epochs": not inside}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") if isinstance(state_dict, dict) else None
        if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) and "torch" in r for r in ranks):
            raise ValueError(
                "not a RandomStateCheckpoint state: expected {'ranks': [one dict of random states per process]}, got "
                f"keys {sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__}"
            )
        self._loaded = ranks
        self._loaded_between_epochs = state_dict.get("between_epochs")  # None: written by an earlier version

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        if len(self._loaded) != trainer.world_size:
            rank_zero_warn(
                f"RandomStateCheckpoint: the checkpoint holds the random states of {len(self._loaded)} process(es), "
                f"this run has {trainer.world_size}; the random states are not restored, so this resume draws other "
                "random numbers than the saved run would have"
            )
            self._loaded = None
            return
        loaders = train_loaders(trainer)
        notice = workers_notice(loaders)
        if notice is not None:
            rank_zero_warn(notice)
        if self._loaded_between_epochs is None:
            rank_zero_warn(EARLIER_VERSION_NOTICE)
        elif self._loaded_between_epochs:
            self._restore(trainer, pl_module)
            for loader in loaders:
                replay_iterator_start(loader)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches_begun = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._loaded is not None:  # a checkpoint written inside an epoch (or by an earlier version)
            self._restore(trainer, pl_module)
        self._batches_begun = batch_idx + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches_begun = 0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loaded = None  # a checkpoint loaded for validate/test, or a fit that ended before training

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """This rank's saved states: the global ones, and those of the train loaders' generators."""
        ranks, self._loaded = self._loaded, None
        assert ranks is not None
        state = ranks[trainer.global_rank]
        restore_random_state(state, pl_module.device)
        if "loaders" in state:  # (not in an earlier version's checkpoint: on_train_start said so)
            for notice in restore_loader_generators(train_loaders(trainer), state["loaders"]):
                rank_zero_warn(notice)
