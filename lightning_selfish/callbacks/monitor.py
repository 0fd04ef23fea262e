"""``TopologyMonitor``: what dynamic sparse training does, in the trainer's logger, at topology updates only.

The monitor learns about masks from :class:`~lightning_selfish.SelfishSparsityCallback`, which calls
``on_topology_update(trainer, pl_module, engine, stats)`` on every callback that has it: once at fit start
(``stats is None``: the initial masks, or those restored from a checkpoint) and after every topology update,
however often they happen (once per epoch, every N steps, or a dense-to-sparse schedule whose masks start full).
Nothing runs in the per-step hot path.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from lightning_selfish import analysis
from lightning_selfish.analysis import plots
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.core.engine import SparseEngine, UpdateStats
from lightning_selfish.core.sharding import rows_for, whole_copy

log = logging.getLogger(__name__)

__all__ = ["TopologyMonitor", "scalar_layout"]


class TopologyMonitor(Callback):
    r"""Log exploration, drift, large weights, mask pictures and the final gate breakdown of a sparse run.

    Scalars, logged at fit start and after every topology update (rank zero, every logger; of the whole tensors
    when FSDP2 shards them, each rank's counts summed over the ranks):

    * ``exploration/<param>``, ``exploration/<param>/<gate>``, ``exploration/overall``: the fraction of positions
      that have been active at least once since the start (the in-time over-parameterisation rate of Liu et al.
      2021). Exact across resumes: the initial and ever-active masks are part of the checkpoint.
    * ``drift/<param>``, ``drift/<param>/<gate>``, ``drift/overall``: the fraction of the currently active
      weights that were not active in the initial mask.

    ``magnitude_above/<param>`` and ``magnitude_above/overall`` (the paper's Figure 3): the number of sparsified
    weights with ``|w| > magnitude_threshold``, once per epoch at the end of validation (so while NT-ASGD averages,
    of the averaged weights that validation sees), or at the end of a training epoch that had no validation.

    Images (loggers whose ``experiment`` has ``add_image``, such as TensorBoard; others are skipped with one info
    line): ``masks/<param>`` for every tensor with a gate layout (recurrent weights), at the start and at every
    ``images_every_n_updates``-th update: the mask's density over a grid of row and column blocks, gates separated
    by white lines, named on the left, with a colour scale (with matplotlib; without it, the bare picture);
    ``gates/sparsity`` at the end of training: the final sparsity of every gate of every layer
    (the paper's Figure 10, needs matplotlib: ``pip install "lightning-selfish[analysis]"``).

    A custom-scalars layout (:func:`scalar_layout`, TensorBoard's *Custom Scalars* tab) is written at fit start: a
    tensor's gates share one chart for sparsity, exploration and drift, and the overall figures one chart.

    Under FSDP2 (``ModelParallelStrategy``) every rank keeps its rows of the initial and ever-active masks; the
    scalars and the gate chart come from counts summed over the ranks, and a mask picture, when one is due and rank
    zero's loggers take images, from that tensor's mask gathered whole (every rank takes part; rank zero draws).
    The checkpointed state holds the whole masks (gathered at checkpoint time), so a run resumes on any number of
    ranks.

    Args:
        magnitude_threshold: threshold of ``magnitude_above``; None switches it off.
        mask_images: log the mask-density pictures.
        images_every_n_updates: picture every this many topology updates (and the initial masks).
        image_resolution: at most this many blocks along the columns and, summed over the gates, the rows.
        gate_chart: log the final gate-sparsity chart.
    """

    def __init__(
        self,
        magnitude_threshold: float | None = 0.1,
        mask_images: bool = True,
        images_every_n_updates: int = 1,
        image_resolution: int = 64,
        gate_chart: bool = True,
    ) -> None:
        if magnitude_threshold is not None:
            if isinstance(magnitude_threshold, bool) or not isinstance(magnitude_threshold, (int, float)):
                raise TypeError(f"magnitude_threshold must be a number >= 0 or None, got {magnitude_threshold!r}")
            if not (math.isfinite(magnitude_threshold) and magnitude_threshold >= 0):
                raise ValueError(
                    f"magnitude_threshold must be a finite number >= 0 or None, got {magnitude_threshold!r}"
                )
        for name, value in (("images_every_n_updates", images_every_n_updates), ("image_resolution", image_resolution)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, flag in (("mask_images", mask_images), ("gate_chart", gate_chart)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.magnitude_threshold = None if magnitude_threshold is None else float(magnitude_threshold)
        self.mask_images = mask_images
        self.images_every_n_updates = images_every_n_updates
        self.image_resolution = image_resolution
        self.gate_chart = gate_chart

        self.engine: SparseEngine | None = None
        self.initial: dict[str, Tensor] = {}
        self.ever_active: dict[str, Tensor] = {}
        self.num_updates = 0
        self._loaded_state: dict[str, Any] | None = None
        self._magnitude_epoch = -1
        self._skipped_loggers: set[str] = set()
        self._renderer: plots.MaskImageRenderer | None = None
        self._said_plain = False
        self._pictures_on_rank_zero: bool | None = None  # (sharded: whether rank zero's loggers take images)

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    # ----------------------------------------------------------------------------------------------------------
    # hooks: only delegate
    # ----------------------------------------------------------------------------------------------------------

    def on_topology_update(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: SparseEngine, stats: UpdateStats | None
    ) -> None:
        """Called by the sparsity callback: ``stats is None`` at fit start, else after a topology update."""
        self.engine = engine
        masks = engine.masks
        if stats is None:
            self._start(masks)
        else:
            self.num_updates += 1
            for name, mask in masks.items():
                self.ever_active[name] |= mask
        if not engine.sharded and not trainer.is_global_zero:
            return
        shards = {name: t.shard for name, t in engine.tensors.items() if t.split}
        report = analysis.exploration_report(self.ever_active, masks, self.initial, self._gates(), shards)
        pictures = self.mask_images and (stats is None or self.num_updates % self.images_every_n_updates == 0)
        whole = self._whole_gated_masks(trainer) if pictures else None  # (sharded: every rank takes part)
        if not trainer.is_global_zero:
            return
        if stats is None:
            self._log_layout(trainer)
        self._log_metrics(trainer, report)
        if pictures:
            self._log_mask_images(trainer, whole)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._magnitude_epoch = -1
        self._pictures_on_rank_zero = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (under ModelParallelStrategy the masks are set at the sparsity callback's on_train_start, maybe after ours)
        if self.engine is None and not any(isinstance(cb, SelfishSparsityCallback) for cb in trainer.callbacks):
            raise ValueError(
                "TopologyMonitor watches the masks of a SelfishSparsityCallback, but none told it about its masks: "
                "add SelfishSparsityCallback(...) to the trainer's callbacks"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._log_magnitudes(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._magnitude_epoch != trainer.current_epoch:  # this epoch had no validation
            self._log_magnitudes(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gate_chart and self.engine is not None and (trainer.is_global_zero or self.engine.sharded):
            self._log_gate_chart(trainer)

    # ----------------------------------------------------------------------------------------------------------
    # checkpointing
    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The initial and ever-active masks, whole (sharded: gathered from every rank's rows; every rank calls
        this, as Lightning does when it saves a checkpoint)."""
        if not self.initial:
            return {}
        return {
            "initial": analysis.pack_masks(self._whole(self.initial)),
            "ever_active": analysis.pack_masks(self._whole(self.ever_active)),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if "initial" not in state_dict or "ever_active" not in state_dict:
            raise ValueError(
                f"not a TopologyMonitor state: expected keys 'initial' and 'ever_active', got {sorted(state_dict)}"
            )
        self._loaded_state = state_dict

    # ----------------------------------------------------------------------------------------------------------
    # internals
    # ----------------------------------------------------------------------------------------------------------

    def _start(self, masks: dict[str, Tensor]) -> None:
        state, self._loaded_state = self._loaded_state, None
        if state is None:
            self.initial = {name: mask.detach().clone() for name, mask in masks.items()}
            self.ever_active = {name: mask.detach().clone() for name, mask in masks.items()}
            self.num_updates = 0
            return
        initial = analysis.unpack_masks(state["initial"])
        ever = analysis.unpack_masks(state["ever_active"])
        assert self.engine is not None
        tensors = self.engine.tensors
        if set(initial) != set(masks) or any(initial[n].shape != tensors[n].shape for n in masks):
            raise ValueError(
                "the checkpoint's TopologyMonitor state does not match the sparsified parameters: "
                f"checkpoint {sorted((n, tuple(m.shape)) for n, m in initial.items())}, "
                f"model {sorted((n, tuple(tensors[n].shape)) for n in masks)}"
            )
        # (whole masks saved; this rank's rows taken, whatever the number of ranks that saved them)
        self.initial = {
            name: rows_for(initial[name], tensors[name].owner).to(mask.device) for name, mask in masks.items()
        }
        self.ever_active = {
            name: rows_for(ever[name], tensors[name].owner).to(mask.device) | mask for name, mask in masks.items()
        }
        self.num_updates = int(state.get("num_updates", 0))

    def _whole(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """``masks`` (kept like the engine's: of a sharded tensor, this rank's rows) whole; gathered when sharded."""
        if self.engine is None or not self.engine.sharded:
            return masks
        return {name: whole_copy(mask, self.engine.tensors[name].owner) for name, mask in masks.items()}

    def _gates(self) -> dict[str, list[tuple[str, slice]]]:
        assert self.engine is not None
        return {name: list(t.gates) for name, t in self.engine.tensors.items() if t.gates}

    def _log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _log_magnitudes(self, trainer: pl.Trainer) -> None:
        self._magnitude_epoch = trainer.current_epoch
        if self.magnitude_threshold is None or self.engine is None:
            return
        if not self.engine.sharded and not trainer.is_global_zero:
            return
        params = {name: t.param for name, t in self.engine.tensors.items()}
        spans = {name: t.span for name, t in self.engine.tensors.items() if t.split}
        counts = analysis.magnitude_above(params, self.magnitude_threshold, spans)  # (sharded: every rank)
        if trainer.is_global_zero:
            self._log_metrics(trainer, {f"magnitude_above/{name}": float(n) for name, n in counts.items()})

    def _image_writers(self, trainer: pl.Trainer) -> list[Any]:
        writers = []
        for logger in trainer.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):
                writers.append(add_image)
            elif type(logger).__name__ not in self._skipped_loggers:
                self._skipped_loggers.add(type(logger).__name__)
                log.info(
                    "TopologyMonitor: %s cannot take images; mask pictures are skipped for it", type(logger).__name__
                )
        return writers

    def _whole_gated_masks(self, trainer: pl.Trainer) -> dict[str, Tensor] | None:
        """Of a sharded run whose rank-zero loggers take images: the whole masks of the tensors with gates (the
        ones pictured), gathered (every rank calls this). ``None`` otherwise: the pictures read the live masks."""
        assert self.engine is not None
        if not self.engine.sharded:
            return None
        if self._pictures_on_rank_zero is None:  # (the loggers of a fit do not change: asked once per fit)
            takes = bool(self._image_writers(trainer)) if trainer.is_global_zero else False
            self._pictures_on_rank_zero = bool(trainer.strategy.broadcast(takes, src=0))
        if not self._pictures_on_rank_zero:
            return None
        return {name: whole_copy(t.mask, t.owner) for name, t in self.engine.tensors.items() if t.gates}

    def _log_mask_images(self, trainer: pl.Trainer, whole: dict[str, Tensor] | None = None) -> None:
        writers = self._image_writers(trainer)
        if not writers:
            return
        assert self.engine is not None
        render = self._mask_renderer()
        for name, record in self.engine.tensors.items():
            if not record.gates:
                continue
            mask = record.mask if whole is None else whole[name]
            if render is not None:
                image = render(name, mask, record.gates)
            else:
                image = plots.mask_density_image(mask, record.gates, self.image_resolution)
            for add_image in writers:
                add_image(f"masks/{name}", image, trainer.global_step, dataformats="HWC")

    def _mask_renderer(self) -> plots.MaskImageRenderer | None:
        """Labelled pictures (gate names, colour scale) with matplotlib; plain ones, said once, without it."""
        if self._renderer is None and plots.matplotlib_available():
            self._renderer = plots.MaskImageRenderer(self.image_resolution)
        if self._renderer is None and not self._said_plain:
            self._said_plain = True
            log.info(
                "TopologyMonitor: mask pictures without gate labels and colour scale (they need matplotlib: "
                'pip install "lightning-selfish[analysis]"): dark blue is empty, yellow full, white lines part gates'
            )
        return self._renderer

    def _log_layout(self, trainer: pl.Trainer) -> None:
        """TensorBoard's custom-scalars layout: one chart per tensor with its gates, one of the overall figures."""
        writers = []
        for logger in trainer.loggers:
            add_custom_scalars = getattr(getattr(logger, "experiment", None), "add_custom_scalars", None)
            if callable(add_custom_scalars):
                writers.append(add_custom_scalars)
        if not writers or self.engine is None:
            return
        layout = scalar_layout({name: [gate for gate, _ in t.gates or []] for name, t in self.engine.tensors.items()})
        for add_custom_scalars in writers:
            add_custom_scalars(layout)

    def _gate_table(self) -> dict[str, dict[str, float]]:
        """The final sparsity of every gate (and ``all``) of every tensor with gates; sharded, from the counts
        summed over the ranks (every rank calls this), unsharded, of the live masks."""
        assert self.engine is not None
        if not self.engine.sharded:
            return analysis.gate_sparsity(self.engine.masks, self._gates())
        report = self.engine.sparsity_report()
        return {
            name: {**{gate: report[f"{name}/{gate}"] for gate, _ in layout}, "all": report[name]}
            for name, layout in self._gates().items()
        }

    def _log_gate_chart(self, trainer: pl.Trainer) -> None:
        table = self._gate_table()
        if not trainer.is_global_zero:
            return
        writers = self._image_writers(trainer)
        if not writers or not table:
            return
        if not plots.matplotlib_available():
            log.info(
                'TopologyMonitor: the gate-sparsity chart needs matplotlib (pip install "lightning-selfish[analysis]")'
            )
            return
        image = plots.figure_to_array(plots.gate_sparsity_figure(table))
        for add_image in writers:
            add_image("gates/sparsity", image, trainer.global_step, dataformats="HWC")


def scalar_layout(gates: dict[str, list[str]]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout (TensorBoard's *Custom Scalars* tab) of a sparse run's tags.

    ``overall``: the whole network's sparsity, exploration and drift in one chart, and the topology updates' prune
    rate and changed fraction in another. Then one chart per tensor, whole tensor and gates together, for
    ``sparsity``, ``exploration`` and ``drift``; and the weights above the magnitude threshold of every tensor.
    """

    def tags(kind: str, name: str, names: list[str]) -> list[str]:
        return [f"^{re.escape(f'{kind}/{name}')}$"] + [f"^{re.escape(f'{kind}/{name}/{gate}')}$" for gate in names]

    layout: dict[str, dict[str, list]] = {
        "overall": {
            "sparsity, exploration, drift": [
                "Multiline",
                ["^sparsity/overall$", "^exploration/overall$", "^drift/overall$"],
            ],
            "topology updates": ["Multiline", ["^topology/prune_rate$", "^topology/changed_fraction$"]],
            "weights above the magnitude threshold": ["Multiline", ["^magnitude_above/"]],
        }
    }
    for kind in ("sparsity", "exploration", "drift"):
        layout[f"{kind} per gate"] = {name: ["Multiline", tags(kind, name, names)] for name, names in gates.items()}
    return layout
