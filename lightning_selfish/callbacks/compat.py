"""Lightning's classes under both of its packages, found in one place.

``pytorch_lightning`` and the unified ``lightning`` package (``lightning.pytorch``) define distinct classes of the
same names: a strategy or a callback of either must be recognised by class, never by its name. The unified package
is never imported from here (neither package is a requirement of the other): a Trainer of it has imported it already.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["lightning_classes", "tensor_parallel_size"]

PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def lightning_classes(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``pytorch_lightning.<module>`` and, when in use, of ``lightning.pytorch.<module>``
    (a name a package does not define is left out), for ``isinstance`` checks."""
    found: list[type] = []
    for package in PACKAGES:
        loaded = sys.modules.get(f"{package}.{module}")
        if loaded is None and package == PACKAGES[0]:
            loaded = importlib.import_module(f"{package}.{module}")
        for name in names:
            cls = getattr(loaded, name, None) if loaded is not None else None
            if isinstance(cls, type):
                found.append(cls)
    return tuple(found)


def tensor_parallel_size(strategy: object) -> int:
    """The size of a ``ModelParallelStrategy``'s tensor-parallel mesh dimension (its ``device_mesh``, set up before
    the callbacks' ``setup``), read from the public mesh, not the strategy's private argument ("auto" resolves to
    every device)."""
    mesh = strategy.device_mesh  # type: ignore[attr-defined]
    return int(mesh["tensor_parallel"].size())
