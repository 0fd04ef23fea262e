"""``selfish-rnn export RUN_OR_CKPT --format dense|compressed``: a finished run's model, out of training.

The source is a checkpoint file, or a run's version directory (``lightning_logs/<name>/<label>/version_0``) whose
best checkpoint is used (``--which last`` for ``last.ckpt``). Its ``state_dict`` holds SNT-ASGD's averaged weights
once averaging has started (the ones validated, :mod:`lightning_selfish.callbacks.trigger`); the masks come from the
checkpoint's ``SelfishSparsityCallback`` state. Both formats hold the masked weights and nothing of the training
state (no callbacks, no optimizer, no raw weights):

* ``dense``: a checkpoint-shaped file (``state_dict``, ``hyper_parameters``, ``datamodule_hyper_parameters``,
  ``vocabulary``) that ``LanguageModel.load_from_checkpoint(path)`` loads into the model's own class;
* ``compressed``: :func:`lightning_selfish.export.save_compressed`'s format (bit-packed masks and the active
  values), with the same hyperparameters and vocabulary as metadata; :func:`load_network` restores it exactly.

:func:`load_network` reads any of the three (checkpoint, dense, compressed) into the bare network, for
``selfish-rnn generate`` and for user code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_selfish.export import (
    COMPRESSED_FORMAT,
    compress_state_dict,
    compressed_sizes,
    decompress_state_dict,
    masked_state_dict,
)
from lightning_selfish_recipes.old_names import with_current_class_paths

__all__ = ["ExportError", "LoadedNetwork", "export_run", "find_checkpoint", "load_network", "main"]

log = logging.getLogger(__name__)

DENSE_FORMAT = "lightning_selfish.recipes.dense"
_NETWORK_PREFIX = "network."


class ExportError(Exception):
    """A source that cannot be exported or loaded (no checkpoint, no masks, not a recipe run)."""


@dataclass(frozen=True)
class LoadedNetwork:
    """A recipe network read by :func:`load_network`, with its masks (keyed like its parameters) and vocabulary."""

    network: nn.Module
    masks: dict[str, Tensor]
    vocabulary: list[str] | None
    source: Path


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint file ``path`` is, or the ``best``/``last`` checkpoint of the run directory ``path``."""
    path = Path(path)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    last = sorted((path / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not last:
        raise FileNotFoundError(
            f"{path} has no checkpoints/last.ckpt: give a run's version directory (lightning_logs/<name>/<label>/"
            "version_N) or a checkpoint file"
        )
    if which == "last":
        return last[-1]
    checkpoint = torch.load(last[-1], map_location="cpu", weights_only=False, mmap=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        monitored = isinstance(state, dict) and state.get("monitor") is not None  # (not the latest-epoch one)
        if key.startswith("ModelCheckpoint") and monitored and state.get("best_model_path"):
            best = Path(state["best_model_path"])
            if not best.is_file():
                best = path / "checkpoints" / best.name  # the run directory was moved
            if best.is_file():
                return best
            raise FileNotFoundError(f"{last[-1]} names {state['best_model_path']} as the best checkpoint: missing")
    raise FileNotFoundError(f"{last[-1]} records no best checkpoint; pass --which last or a checkpoint file")


def export_run(source: str | Path, format: str, out: str | Path | None = None, which: str = "best") -> dict[str, Any]:
    """Write the ``dense`` or ``compressed`` export of a recipe checkpoint; returns what was written (sizes)."""
    if format not in ("dense", "compressed"):
        raise ValueError(f"format must be 'dense' or 'compressed', got {format!r}")
    ckpt_path = find_checkpoint(source, which)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    hyper = with_current_class_paths(_plain(checkpoint.get("hyper_parameters")))  # also runs of earlier versions
    if not isinstance(hyper, dict) or "network" not in hyper:
        raise ExportError(f"{ckpt_path} is not a checkpoint of a selfish-rnn run (no network in its hyper_parameters)")
    masks = _checkpoint_masks(checkpoint)
    if format == "compressed" and not masks:
        raise ExportError(f"{ckpt_path} holds no SelfishSparsityCallback masks (a dense run): nothing to compress")
    model = _language_model(hyper, checkpoint["state_dict"])
    state = masked_state_dict(model, masks)
    datamodule = _plain(checkpoint.get("datamodule_hyper_parameters"))
    vocabulary = _vocabulary(datamodule)
    out = Path(out) if out is not None else ckpt_path.with_name(f"{ckpt_path.stem}.{format}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "hyper_parameters": hyper,
        "datamodule_hyper_parameters": datamodule,
        "vocabulary": vocabulary,
        "source": str(ckpt_path),
        "epoch": checkpoint.get("epoch"),
        "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version"),
    }
    if format == "dense":
        torch.save({"export_format": DENSE_FORMAT, "state_dict": state, **metadata}, out)
        sizes = {}
    else:
        data = compress_state_dict(state, masks, metadata)
        torch.save(data, out)
        sizes = compressed_sizes(data)
    masked = sum(m.numel() for m in masks.values())
    return {
        "format": format,
        "source": str(ckpt_path),
        "out": str(out),
        "bytes": out.stat().st_size,
        "density": (sum(int(m.sum()) for m in masks.values()) / masked) if masked else 1.0,
        "averaged": "raw_state_dict" in checkpoint,
        **sizes,
    }


def load_network(source: str | Path, which: str = "best") -> LoadedNetwork:
    """The bare network (e.g. ``StackedLSTM``) of a recipe checkpoint, run directory or export, masks applied."""
    path = Path(source)
    if path.is_dir():
        path = find_checkpoint(path, which)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint, export or run directory")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, Mapping):
        raise ExportError(f"{path} is neither a selfish-rnn checkpoint nor an export")
    if data.get("format") == COMPRESSED_FORMAT:
        state, masks = decompress_state_dict(data)
        info = data["metadata"]
        hyper, vocabulary = info.get("hyper_parameters"), info.get("vocabulary")
    elif "state_dict" in data:
        state, masks = data["state_dict"], _checkpoint_masks(data)
        hyper = _plain(data.get("hyper_parameters"))
        vocabulary = data.get("vocabulary")
        if vocabulary is None:
            vocabulary = _vocabulary(_plain(data.get("datamodule_hyper_parameters")))
    else:
        raise ExportError(f"{path} is neither a selfish-rnn checkpoint nor an export")
    hyper = with_current_class_paths(hyper)  # a checkpoint or an export of an earlier version: recipes.models.X
    if not isinstance(hyper, dict) or "network" not in hyper:
        raise ExportError(f"{path} does not say which network it holds (no network in its hyper_parameters)")
    network = _build_network(hyper["network"])
    own = {key[len(_NETWORK_PREFIX) :]: value for key, value in state.items() if key.startswith(_NETWORK_PREFIX)}
    network.load_state_dict(own)
    network_masks = {key[len(_NETWORK_PREFIX) :]: m for key, m in masks.items() if key.startswith(_NETWORK_PREFIX)}
    params = dict(network.named_parameters())
    with torch.no_grad():
        for name, mask in network_masks.items():
            if name in params:  # +0.0 where masked, as the exports hold it (mul_ would leave -0.0)
                params[name].masked_fill_(~mask, 0)
    network_masks = {name: mask for name, mask in network_masks.items() if name in params}
    return LoadedNetwork(network.eval(), network_masks, vocabulary, path)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_masks(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    state = (checkpoint.get("callbacks") or {}).get("SelfishSparsityCallback") or {}
    return {name: mask.bool() for name, mask in (state.get("masks") or {}).items()}


def _build_network(config: Any) -> nn.Module:
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise ExportError(f"the network's hyperparameters name no class_path: {config!r}")
    module_name, _, class_name = str(config["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**dict(config.get("init_args") or {}))


def _language_model(hyper: dict[str, Any], state_dict: Mapping[str, Tensor]) -> nn.Module:
    from lightning_selfish_recipes.lm import LanguageModel

    arguments = {key: value for key, value in hyper.items() if key != "network" and not key.startswith("_")}
    if isinstance(arguments.get("adam_betas"), list):
        arguments["adam_betas"] = tuple(arguments["adam_betas"])
    model = LanguageModel(_build_network(hyper["network"]), **arguments)
    model.load_state_dict(state_dict)
    return model


def _vocabulary(datamodule: Any) -> list[str] | None:
    """The corpus's words by id, or None (with a warning) when the corpus cannot be read here."""
    if not isinstance(datamodule, Mapping):
        return None
    from lightning_selfish_recipes.data import LanguageModelingDataModule

    arguments = {key: value for key, value in datamodule.items() if not key.startswith("_")}
    try:
        return list(LanguageModelingDataModule(**arguments).dictionary.idx2word)
    except (FileNotFoundError, OSError, ValueError) as error:
        log.warning("the corpus of the run cannot be read (%s): the export holds no vocabulary", error)
        return None


def _plain(value: Any) -> Any:
    """``value`` as plain dicts, lists, strings and numbers (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        return _plain(value.as_dict())
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfish-rnn export",
        description="Export a run's model with its masks applied: a dense checkpoint-shaped file (LanguageModel."
        "load_from_checkpoint loads it) or a compressed one (bit-packed masks and the active values).",
    )
    parser.add_argument("source", type=Path, help="a checkpoint file or a run's version directory")
    parser.add_argument("--format", choices=("dense", "compressed"), default="compressed", help="what to write")
    parser.add_argument("--out", type=Path, help="the file to write (default: beside the checkpoint)")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="the checkpoint of a run directory")
    return parser


def main(argv: Sequence[str]) -> int:
    """``selfish-rnn export SOURCE [--format dense|compressed] [--out FILE]``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    try:
        result = export_run(args.source, args.format, args.out, args.which)
    except (ExportError, FileNotFoundError, ValueError) as error:
        print(f"selfish-rnn export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']} ({result['bytes'] / 1e6:.2f} MB, {result['format']}) from {result['source']}")
    print(f"  density of the masked tensors: {result['density']:.4f}")
    if "masked_tensors_dense_bytes" in result:
        dense, compressed = result["masked_tensors_dense_bytes"], result["masked_tensors_compressed_bytes"]
        ratio = compressed / dense
        print(f"  masked tensors: {compressed / 1e6:.2f} MB compressed, {dense / 1e6:.2f} MB dense ({ratio:.3f}x)")
    if not result["averaged"]:
        print("  (raw weights: the checkpoint was saved before SNT-ASGD started averaging, or without averaging)")
    return 0
