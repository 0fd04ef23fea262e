"""Selfish-RNN: train recurrent networks sparse from scratch, as a PyTorch Lightning plugin."""

from lightning_selfish.optim_state import MaskAwareOptimizer, MaskUpdate

__all__ = ["MaskAwareOptimizer", "MaskUpdate"]
__version__ = "0.1.0"
