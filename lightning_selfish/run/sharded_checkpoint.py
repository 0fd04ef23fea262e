"""Where a checkpoint keeps the masks of parameters sharded over ranks (FSDP2), so that each rank saves only its rows.

A Lightning strategy that shards parameters writes a callback's state from rank 0 alone (``ModelParallelStrategy``:
``meta.pt`` beside the shards; docs/distributed-notes.md), so a rank's rows cannot travel in the callback's state.
In a distributed checkpoint the masks (and the dense gradients an update may be waiting for) go into the model's
state under keys of their own, as ``DTensor``\\ s placed like their parameters: ``torch.distributed.checkpoint`` writes
each rank's rows, nothing is gathered, and on resume they are read back into the current sharding, whatever the
number of ranks. The callback's state says where they are (:data:`IN_MODEL_STATE`). In a full checkpoint (one file,
everything gathered to rank 0 anyway) they are whole tensors in the callback's state, as on one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_selfish.core.engine import SparseEngine
from lightning_selfish.core.sharding import as_sharded_like, is_sharded, local_tensor, whole_copy

__all__ = ["IN_MODEL_STATE", "move_into_callback_state", "read_from_model_state", "store"]

#: The callback state's value for masks (and gradients) kept in the model's state of a distributed checkpoint.
IN_MODEL_STATE = "in the model state of the distributed checkpoint"
_PREFIX = "lightning_selfish."


def _key(kind: str, name: str) -> str:
    return f"{_PREFIX}{kind}.{name}"


def store(
    engine: SparseEngine, gradients: Mapping[str, Tensor] | None, state: dict[str, Any], model_state: dict[str, Any]
) -> None:
    """Put a sharded engine's masks and ``gradients`` (this rank's rows) where the checkpoint keeps them: into
    ``model_state`` as ``DTensor``\\ s when its values are (a distributed checkpoint), else whole into ``state``
    (gathered: every rank calls this)."""
    distributed = any(is_sharded(value) for value in model_state.values())
    tensors = engine.tensors
    if distributed:
        for name, record in tensors.items():
            model_state[_key("masks", name)] = as_sharded_like(record.mask, record.owner)
        for name, grad in (gradients or {}).items():
            model_state[_key("gradients", name)] = as_sharded_like(grad, tensors[name].owner)
        state["masks"] = IN_MODEL_STATE
        state["gradients"] = IN_MODEL_STATE if gradients is not None else None
        return
    state["masks"] = engine.whole_masks()
    state["gradients"] = (
        None if gradients is None else {name: whole_copy(g, tensors[name].owner) for name, g in gradients.items()}
    )


def read_from_model_state(state: dict[str, Any], path: str | Path, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """``state`` with the masks (and gradients) a distributed checkpoint at ``path`` keeps in its model state read
    back as ``DTensor``\\ s placed like ``params`` (each rank reads its rows; any number of ranks)."""
    if state.get("masks") != IN_MODEL_STATE:
        return dict(state)
    import torch.distributed.checkpoint as dcp

    if not Path(path).is_dir():
        raise ValueError(
            f"the SelfishSparsityCallback state of {str(path)!r} says its masks are in a distributed checkpoint's "
            "model state, but the path is not a distributed checkpoint folder: resume from the folder the run wrote"
        )
    templates: dict[str, Tensor] = {}
    for name, param in params.items():
        local = local_tensor(param)
        templates[_key("masks", name)] = as_sharded_like(torch.zeros(local.shape, dtype=torch.bool), param)
        if state.get("gradients") == IN_MODEL_STATE:
            templates[_key("gradients", name)] = as_sharded_like(torch.zeros(local.shape, dtype=local.dtype), param)
    dcp.load({"state_dict": templates}, checkpoint_id=str(path))
    loaded = dict(state)
    loaded["masks"] = {name: templates[_key("masks", name)] for name in params}
    if state.get("gradients") == IN_MODEL_STATE:
        loaded["gradients"] = {name: templates[_key("gradients", name)] for name in params}
    return loaded


def move_into_callback_state(checkpoint: dict[str, Any], state_key: str) -> None:
    """A distributed checkpoint joined into one file (``dcp_to_torch_save``): the masks (and gradients) its model
    state holds, moved into the callback's state as whole tensors, so that a single-device Trainer resumes it."""
    model_state = checkpoint.get("state_dict", {})
    state = checkpoint.get("callbacks", {}).get(state_key)
    if state is None or state.get("masks") != IN_MODEL_STATE:
        return
    for kind in ("masks", "gradients"):
        prefix = f"{_PREFIX}{kind}."
        moved = {key[len(prefix) :]: model_state.pop(key) for key in list(model_state) if key.startswith(prefix)}
        if state.get(kind) == IN_MODEL_STATE:
            state[kind] = moved
