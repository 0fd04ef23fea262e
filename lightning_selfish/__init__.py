"""Selfish-RNN: train recurrent networks sparse from scratch, as a PyTorch Lightning plugin."""

from lightning_selfish.callback import SelfishSparsityCallback
from lightning_selfish.engine import SparseEngine, UpdateStats
from lightning_selfish.flops_callback import FlopsCallback
from lightning_selfish.gates import detect_gate_layouts
from lightning_selfish.history import MaskHistory, load_mask_history
from lightning_selfish.methods import METHODS, MethodConfig, MethodPreset
from lightning_selfish.monitor import TopologyMonitor
from lightning_selfish.optim_state import MaskAwareOptimizer, MaskUpdate
from lightning_selfish.random_state import RandomStateCheckpoint
from lightning_selfish.sntasgd import SNTASGD, sntasgd
from lightning_selfish.trigger import NonMonotonicTrigger

__all__ = [
    "METHODS",
    "SNTASGD",
    "FlopsCallback",
    "MethodConfig",
    "MethodPreset",
    "MaskAwareOptimizer",
    "MaskHistory",
    "MaskUpdate",
    "NonMonotonicTrigger",
    "RandomStateCheckpoint",
    "SelfishSparsityCallback",
    "SparseEngine",
    "TopologyMonitor",
    "UpdateStats",
    "detect_gate_layouts",
    "load_mask_history",
    "sntasgd",
]
__version__ = "0.1.0"
