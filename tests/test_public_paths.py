"""What users import keeps working after the layers became folders: the package's names and the documented paths."""

from __future__ import annotations

import importlib

import pytest

import lightning_selfish

#: The names the package exported before the layers became folders (README, docs).
PUBLIC_NAMES = [
    "METHODS",
    "SNTASGD",
    "FlopsCallback",
    "MaskAwareOptimizer",
    "MaskHistory",
    "MaskUpdate",
    "MethodConfig",
    "MethodPreset",
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


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_the_package_exports_its_names(name: str) -> None:
    assert name in lightning_selfish.__all__
    assert getattr(lightning_selfish, name) is not None


@pytest.mark.parametrize(
    "path, name, home",
    [
        ("lightning_selfish.methods", "GROWTHS", "lightning_selfish.method.catalogue"),
        ("lightning_selfish.methods", "resolve", "lightning_selfish.method.catalogue"),
        ("lightning_selfish.methods", "METHODS", "lightning_selfish.method.catalogue"),
        ("lightning_selfish.parts", "Growth", "lightning_selfish.method.parts"),
        ("lightning_selfish.parts", "MethodConfig", "lightning_selfish.method.parts"),
        ("lightning_selfish.export", "save_dense", "lightning_selfish.export"),
        ("lightning_selfish.export", "load_compressed", "lightning_selfish.export"),
        ("lightning_selfish.inference", "to_sparse", "lightning_selfish.inference"),
        ("lightning_selfish.inference", "sparse_inference_report", "lightning_selfish.inference"),
        ("lightning_selfish.analysis", "pack_mask", "lightning_selfish.analysis.masks"),
        ("lightning_selfish.analysis", "gate_sparsity", "lightning_selfish.analysis.masks"),
    ],
)
def test_documented_paths_name_the_same_objects(path: str, name: str, home: str) -> None:
    """docs/methods.md, docs/inference.md and docs/analysis.md import from these paths."""
    assert getattr(importlib.import_module(path), name) is getattr(importlib.import_module(home), name)
