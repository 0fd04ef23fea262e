"""The documented path of the method catalogue (docs/methods.md): :mod:`lightning_selfish.method.catalogue`."""

from lightning_selfish.method.catalogue import *  # noqa: F403
from lightning_selfish.method.catalogue import __all__  # noqa: F401
