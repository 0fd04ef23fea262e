"""The private attributes of torch the library reads, where no public API gives the same: one function each.

``tests/test_torch_compat.py`` fails when torch changes one of them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["pruning_methods"]


def pruning_methods(module: nn.Module) -> dict[str, nn.utils.prune.BasePruningMethod]:
    """The ``torch.nn.utils.prune`` methods that reparametrise tensors of ``module`` itself, by tensor name.

    ``prune.is_pruned`` says only whether a module is pruned; the method and the tensor it prunes are read from the
    module's forward pre-hooks (``_forward_pre_hooks``, the hook's ``_tensor_name``).
    """
    from torch.nn.utils import prune

    return {
        hook._tensor_name: hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    }
