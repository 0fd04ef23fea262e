"""Selfish-RNN: train recurrent networks sparse from scratch, as a PyTorch Lightning plugin."""

from lightning_selfish.callback import SelfishSparsityCallback
from lightning_selfish.engine import SparseEngine, UpdateStats
from lightning_selfish.gates import detect_gate_layouts
from lightning_selfish.optim_state import MaskAwareOptimizer, MaskUpdate

__all__ = [
    "MaskAwareOptimizer",
    "MaskUpdate",
    "SelfishSparsityCallback",
    "SparseEngine",
    "UpdateStats",
    "detect_gate_layouts",
]
__version__ = "0.1.0"
