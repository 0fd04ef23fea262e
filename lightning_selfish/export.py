"""Export a trained sparse model: a plain dense state dict with the masks applied, or a compressed file.

Training keeps the masks in :class:`~lightning_selfish.SelfishSparsityCallback` (``callback.masks``; a checkpoint
holds them under ``checkpoint["callbacks"]["SelfishSparsityCallback"]["masks"]``), never in the model: the model's
own ``state_dict`` has no trace of the callback. The exports here start from a model and ``{parameter name: bool
mask}``:

* :func:`masked_state_dict` / :func:`save_dense`: the model's ``state_dict`` with every masked tensor's inactive
  positions set to +0.0 (and, with ``optimizer=`` an averaging :class:`~lightning_selfish.SNTASGD`, its averaged
  weights, the ones validation saw). ``model.load_state_dict(torch.load(path))`` loads it into the model's own class;
* :func:`save_compressed` / :func:`load_compressed`: the same weights in fewer bytes. Every masked tensor is stored
  as its mask, bit-packed (one bit per position, :func:`lightning_selfish.analysis.pack_mask`), and the values at
  the mask's active positions in row-major order (``weight[mask]``); every other tensor as it is; a tensor tied to
  another (a decoder sharing the embedding) once. Loading rebuilds exactly the same tensors (``torch.equal``) with
  ``torch.zeros(shape).masked_scatter_(mask, values)``.

A model sharded by FSDP2 (``fully_shard``; ``ModelParallelStrategy``) is exported the same way, by every rank:
its parameters are ``DTensor`` objects, each gathered whole in turn (one weight at a time) and kept on rank 0 alone,
which writes the file; the masks are the whole masks, ``callback.whole_masks()`` (also gathered: every rank calls
it). :func:`masked_state_dict` then returns the whole state dict on rank 0 and an empty dict on the other ranks::

    masks = callback.whole_masks()  # every rank
    save_compressed(model, masks, "model.pt")  # every rank; rank 0 writes

Bytes of a masked float32 tensor of density ``d``: ``4 d + 1/8`` per position against 4 dense, i.e.
``d + 1/32`` of the dense bytes: 0.36x at the stacked LSTM's density 0.33, 0.13x at 0.1. (CSR with 32-bit column
indices would take ``2 d`` plus the row pointers, smaller only below a density of 1/32.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_selfish.analysis import pack_mask, unpack_mask
from lightning_selfish.core.sharding import is_sharded
from lightning_selfish.optim.sntasgd import SNTASGD

__all__ = [
    "COMPRESSED_FORMAT",
    "CompressedModel",
    "compress_state_dict",
    "compressed_sizes",
    "decompress_state_dict",
    "load_compressed",
    "masked_state_dict",
    "save_compressed",
    "save_dense",
]

COMPRESSED_FORMAT = "lightning_selfish.compressed"
COMPRESSED_VERSION = 1


class CompressedModel(NamedTuple):
    """What :func:`load_compressed` returns: the full state dict, the masks and the metadata saved with them."""

    state_dict: dict[str, Tensor]
    masks: dict[str, Tensor]
    metadata: dict[str, Any]


def masked_state_dict(
    model: nn.Module, masks: Mapping[str, Tensor], *, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Tensor]:
    """``model.state_dict()`` on the CPU with every masked tensor's inactive positions set to +0.0 (detached copies).

    +0.0, not ``weight * mask``, which leaves -0.0 where a masked weight is negative (or -0.0): the compressed export
    restores +0.0 there, and the two files then agree bit for bit.

    ``masks`` is keyed by ``model.named_parameters()`` names; a tensor tied to a masked one (the same parameter
    under another name) is masked too, and the two names keep sharing one tensor. With ``optimizer`` an
    :class:`~lightning_selfish.SNTASGD` that has started averaging, the averaged weights are exported (the model
    is left as it was).

    Of a model with ``DTensor`` parameters (FSDP2) every rank must call this, with the whole masks: each sharded
    tensor is gathered in turn and kept on rank 0, which gets the whole state dict; the other ranks get ``{}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    _check_masks(masks, {name: p.shape for name, p in params.items()}, sharded=_sharded(model))
    keeps = _writes(model)
    with _averaged(optimizer):
        by_identity = {id(params[name]): name for name in masks}
        masked: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                owner = by_identity.get(id(value))
                if owner is not None and owner in masked:
                    out[key] = masked[owner]
                    continue
                whole = value.detach().full_tensor() if is_sharded(value) else value.detach()  # (every rank)
                if not keeps:
                    continue
                if owner is None:
                    out[key] = whole.cpu().clone()
                    continue
                # +0.0 where masked (weight * mask would keep the sign: -0.0)
                masked[owner] = whole.masked_fill(~masks[owner].to(whole.device), 0).cpu()
                out[key] = masked[owner]
    return out


def save_dense(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write :func:`masked_state_dict` with ``torch.save``: ``model.load_state_dict(torch.load(path))`` loads it.
    Of a sharded model every rank calls this and rank 0 writes."""
    path = Path(path)
    state = masked_state_dict(model, masks, optimizer=optimizer)
    if _writes(model):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def compress_state_dict(
    state_dict: Mapping[str, Tensor], masks: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The compressed form of ``state_dict`` (a plain dict of tensors, lists and strings: ``weights_only``-safe).

    Every key of ``masks`` must be a key of ``state_dict``; its tensor is stored as the bit-packed mask and the
    values at the mask's positions (so it is restored masked). A key whose tensor is the very tensor of an earlier
    key (tied weights) is stored as an alias of that key.
    """
    _check_masks(masks, {key: value.shape for key, value in state_dict.items()})
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    sparse: dict[str, dict[str, Any]] = {}
    dense: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for key, value in state_dict.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensor = value.detach().cpu()
        if key in masks:
            mask = masks[key].detach().cpu()
            sparse[key] = {**pack_mask(mask), "values": tensor[mask].clone()}
        else:
            dense[key] = tensor.clone()
    return {
        "format": COMPRESSED_FORMAT,
        "version": COMPRESSED_VERSION,
        "keys": list(state_dict),
        "sparse": sparse,
        "dense": dense,
        "aliases": aliases,
        "metadata": dict(metadata or {}),
    }


def decompress_state_dict(data: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The state dict and the masks of :func:`compress_state_dict`'s output, in the original key order."""
    if not isinstance(data, Mapping) or data.get("format") != COMPRESSED_FORMAT:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"not a {COMPRESSED_FORMAT} file (format: {found!r})")
    if data.get("version") != COMPRESSED_VERSION:
        raise ValueError(
            f"{COMPRESSED_FORMAT} version {data.get('version')!r} is not supported (this library reads version "
            f"{COMPRESSED_VERSION})"
        )
    tensors: dict[str, Tensor] = dict(data["dense"])
    masks: dict[str, Tensor] = {}
    for key, entry in data["sparse"].items():
        mask = unpack_mask(entry)
        values = entry["values"]
        active = int(mask.sum())
        if values.numel() != active:
            raise ValueError(f"corrupt {COMPRESSED_FORMAT} entry {key!r}: {values.numel()} values, {active} positions")
        masks[key] = mask
        tensors[key] = torch.zeros(mask.shape, dtype=values.dtype).masked_scatter_(mask, values)
    for key, target in data["aliases"].items():
        tensors[key] = tensors[target]
        if target in masks:
            masks[key] = masks[target]
    return {key: tensors[key] for key in data["keys"]}, masks


def save_compressed(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the compressed form of :func:`masked_state_dict` (plain data: ``metadata`` of lists, dicts, str...).
    Of a sharded model every rank calls this and rank 0 writes."""
    path = Path(path)
    state = masked_state_dict(model, masks, optimizer=optimizer)
    if _writes(model):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(compress_state_dict(state, masks, metadata), path)
    return path


def load_compressed(path: str | Path, map_location: str | torch.device = "cpu") -> CompressedModel:
    """Read a file of :func:`save_compressed`; ``model.load_state_dict(load_compressed(path).state_dict)``."""
    data = torch.load(path, map_location=map_location, weights_only=True)
    state_dict, masks = decompress_state_dict(data)
    return CompressedModel(state_dict, masks, dict(data["metadata"]))


def compressed_sizes(data: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of the masked tensors of :func:`compress_state_dict`'s output: dense, and as values plus bit mask."""
    dense = compressed = 0
    for entry in data["sparse"].values():
        values = entry["values"]
        numel = 1
        for size in entry["shape"]:
            numel *= int(size)
        dense += numel * values.element_size()
        compressed += values.numel() * values.element_size() + entry["bits"].numel() * entry["bits"].element_size()
    return {"masked_tensors_dense_bytes": dense, "masked_tensors_compressed_bytes": compressed}


def _check_masks(masks: Mapping[str, Tensor], shapes: Mapping[str, torch.Size], sharded: bool = False) -> None:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of parameter name -> bool tensor, got {type(masks).__name__}")
    for name, mask in masks.items():
        if name not in shapes:
            raise ValueError(f"mask {name!r} names no tensor of the model; its tensors: {sorted(shapes)}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != shapes[name]:
            hint = (
                " (the model is sharded: give the whole masks, callback.whole_masks() on every rank, not this "
                "rank's rows)"
                if sharded
                else ""
            )
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the tensor has {tuple(shapes[name])}{hint}")


def _sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is a ``DTensor`` (FSDP2): exporting it is then a collective."""
    return any(is_sharded(p) for p in model.parameters())


def _writes(model: nn.Module) -> bool:
    """Whether this process keeps and writes the export: always, but of a sharded model on rank 0 alone."""
    return not (_sharded(model) and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)


@contextlib.contextmanager
def _averaged(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    if optimizer is None:
        yield
        return
    if not isinstance(optimizer, SNTASGD):
        raise TypeError(
            f"optimizer must be a lightning_selfish.SNTASGD (to export its averaged weights) or None, got "
            f"{type(optimizer).__name__}"
        )
    if not optimizer.averaging or optimizer.swapped:
        yield
        return
    with optimizer.swap_averaged():
        yield
