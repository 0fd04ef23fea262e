"""Selfish-RNN: train recurrent networks sparse from scratch, as a PyTorch Lightning plugin."""

from lightning_selfish.callbacks.flops import FlopsCallback
from lightning_selfish.callbacks.history import MaskHistory, load_mask_history
from lightning_selfish.callbacks.monitor import TopologyMonitor
from lightning_selfish.callbacks.random_state import RandomStateCheckpoint
from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.callbacks.trigger import NonMonotonicTrigger
from lightning_selfish.core.engine import SparseEngine, UpdateStats
from lightning_selfish.core.gates import detect_gate_layouts
from lightning_selfish.core.protocols import MaskAwareOptimizer
from lightning_selfish.core.types import MaskUpdate
from lightning_selfish.method.catalogue import METHODS, MethodConfig, MethodPreset
from lightning_selfish.optim.sntasgd import SNTASGD, sntasgd
from lightning_selfish.run.training import SparseTraining

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
    "SparseTraining",
    "TopologyMonitor",
    "UpdateStats",
    "detect_gate_layouts",
    "load_mask_history",
    "sntasgd",
]
__version__ = "0.1.0"
