"""lightning_selfish/core/torch_compat.py: each private attribute of torch the library reads, on the real torch.
A test here fails when torch changes the attribute: fix the one function, nothing else."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from lightning_selfish.core.torch_compat import pruning_methods


def test_pruning_methods_name_the_pruned_tensors_and_their_methods() -> None:
    layer = nn.Linear(4, 3)
    assert pruning_methods(layer) == {}
    prune.l1_unstructured(layer, "weight", amount=0.5)
    prune.random_unstructured(layer, "bias", amount=0.3)
    layer.register_forward_pre_hook(lambda module, args: None)  # not a pruning method
    methods = pruning_methods(layer)
    assert {name: type(method) for name, method in methods.items()} == {
        "weight": prune.L1Unstructured,
        "bias": prune.RandomUnstructured,
    }
    prune.l1_unstructured(layer, "weight", amount=0.5)  # pruned twice: one container of both
    assert type(pruning_methods(layer)["weight"]) is prune.PruningContainer
    prune.remove(layer, "weight")
    assert set(pruning_methods(layer)) == {"bias"}
