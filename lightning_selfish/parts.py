"""The documented path of the method's parts (docs/methods.md): :mod:`lightning_selfish.method.parts`."""

from lightning_selfish.method.parts import *  # noqa: F403
from lightning_selfish.method.parts import __all__  # noqa: F401
