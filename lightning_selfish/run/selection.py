"""Which parameters a sparse run trains sparse, and what it finds in them before its first step.

Plain PyTorch over a module: the sparsity callback calls these at fit start. They refuse what would silently train
something other than what was asked: a pattern that matches nothing, a weight that another pruning system already
reparametrises (its masks would multiply with ours), and weights that are already sparse in a pattern that is not
the one asked for (re-drawing masks over them would zero trained weights).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_selfish.core.gates import GateLayout, GateLayoutSpec, detect_gate_layouts, parameter_aliases
from lightning_selfish.core.sharding import local_tensor, row_shard
from lightning_selfish.core.torch_compat import pruning_methods

__all__ = [
    "adopt_existing_masks",
    "check_gate_layouts_sparsified",
    "check_no_other_pruning",
    "chosen_parameters",
    "parameter_aliases",
    "select_parameters",
]

#: A tensor with at least this share of exact zeros (and not all zeros) was made sparse: random initialisations
#: give no exact zeros.
SPARSE_ZERO_SHARE = 0.1


def _matches(aliases: Sequence[str], patterns: Sequence[str]) -> str | None:
    """The first pattern that matches any name of a parameter (``None``: none does)."""
    return next((p for p in patterns if any(fnmatch.fnmatchcase(name, p) for name in aliases)), None)


def _listing(aliases: Mapping[str, Sequence[str]]) -> list[str]:
    """Parameter names for a message, a tied weight's other names with what they are tied to."""
    names = list(aliases)
    names += [f"{alias} (tied to {name})" for name, others in aliases.items() for alias in others[1:]]
    return sorted(names)


def select_parameters(module: nn.Module, include: Sequence[str] | None, exclude: Sequence[str]) -> dict[str, Tensor]:
    """The parameters with 2 or more dimensions matched by ``include`` (all by default) and not by ``exclude``.

    A pattern matches a parameter when it matches any of its names (a tied weight selected or kept dense by the name
    it has in either module); the result is keyed by the names of ``named_parameters()``.
    """
    candidates = {name: p for name, p in module.named_parameters() if p.dim() >= 2}
    aliases = {name: names for name, names in parameter_aliases(module).items() if name in candidates}
    for arg, patterns in (("include", include or []), ("exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(names, [pattern]) for names in aliases.values()):
                raise ValueError(
                    f"{arg} pattern {pattern!r} matches no parameter with 2 or more dimensions; "
                    f"these are: {_listing(aliases)}"
                )
    chosen = {
        name: p
        for name, p in candidates.items()
        if (include is None or _matches(aliases[name], include)) and not _matches(aliases[name], exclude)
    }
    if not chosen:
        raise ValueError(
            f"no parameter left to sparsify (include={include}, exclude={list(exclude)}); "
            f"parameters with 2 or more dimensions: {_listing(aliases)}"
        )
    return chosen


def chosen_parameters(
    module: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    gate_layouts: Mapping[str, GateLayoutSpec],
) -> tuple[dict[str, Tensor], dict[str, GateLayout]]:
    """The parameters a run sparsifies (:func:`select_parameters`) and the gate layouts of those (given in
    ``gate_layouts`` or detected), after every refusal: another pruning system on them, a layout for a parameter that
    is not sparsified."""
    params = select_parameters(module, include, exclude)
    check_no_other_pruning(module, params)
    layouts = detect_gate_layouts(module, gate_layouts)
    check_gate_layouts_sparsified(module, gate_layouts, params, include, exclude)
    return params, {name: layout for name, layout in layouts.items() if name in params}


def check_gate_layouts_sparsified(
    module: nn.Module,
    layout_names: Iterable[str],
    params: Mapping[str, Tensor],
    include: Sequence[str] | None,
    exclude: Sequence[str],
) -> None:
    """Refuse a ``gate_layouts`` entry for a parameter that is not sparsified: it would be ignored silently.

    ``params`` are the sparsified parameters (:func:`select_parameters`); a name the module does not have at all is
    :func:`~lightning_selfish.gates.detect_gate_layouts`' error.
    """
    aliases = parameter_aliases(module)
    owner = {alias: name for name, names in aliases.items() for alias in names}
    tensors = dict(module.named_parameters())
    for key in layout_names:
        name = owner.get(key)
        if name is None or name in params:
            continue
        dims = tensors[name].dim()
        if dims < 2:
            reason = f"it has {dims} dimension{'s' if dims != 1 else ''}: only parameters with 2 or more are sparsified"
        elif (pattern := _matches(aliases[name], exclude)) is not None:
            reason = f"exclude pattern {pattern!r} keeps it dense"
        else:
            reason = f"no include pattern matches it: include={list(include or [])}"
        raise ValueError(
            f"gate_layouts names {key!r}, which is not sparsified ({reason}): a layout is only used for a sparsified "
            "tensor. Remove the entry, or sparsify the parameter"
        )


def check_no_other_pruning(module: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Refuse weights that ``torch.nn.utils.prune`` or ``torch.nn.utils.parametrize`` already reparametrise.

    Their masks (or functions) would apply on top of ours: ``ModelPruning(amount=0.3)`` beside a callback at
    sparsity 0.5 trains with about 0.66 of the weights zero while the callback reports 0.5.
    """
    from torch.nn.utils import parametrize

    for module_name, child in module.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for tensor_name, method in pruning_methods(child).items():
            if f"{prefix}{tensor_name}_orig" in params:
                raise ValueError(
                    f"{prefix}{tensor_name} is pruned by torch.nn.utils.prune ({type(method).__name__}): its "
                    "mask would multiply with SelfishSparsityCallback's, so the model would be sparser than the "
                    "callback reports. Remove that pruning (torch.nn.utils.prune.remove) or exclude the weight "
                    "(exclude=[...])"
                )
        if parametrize.is_parametrized(child):
            for tensor_name in child.parametrizations:
                original = f"{prefix}parametrizations.{tensor_name}.original"
                if original in params:
                    raise ValueError(
                        f"{prefix}{tensor_name} is reparametrised by torch.nn.utils.parametrize: the callback "
                        f"would mask {original}, not the weight the module uses. Remove the parametrization "
                        "or exclude the weight (exclude=[...])"
                    )


@torch.no_grad()
def adopt_existing_masks(params: Mapping[str, Tensor], budgets: Mapping[str, int]) -> dict[str, Tensor] | None:
    """The weights' own zero pattern as masks when they are already sparse with exactly the asked-for counts.

    Returns ``None`` when no tensor looks sparse (a fresh model: draw masks). Raises when some tensor is already
    sparse but the counts differ from ``budgets`` (a model trained at another sparsity or init): drawing masks over
    it would zero trained weights, adopting it would train another sparsity than the one asked for.
    """
    nonzero = {name: row_shard(p).span.count(local_tensor(p)) for name, p in params.items()}
    sparse = [
        name
        for name, p in params.items()
        if nonzero[name] > 0 and (p.numel() - nonzero[name]) >= SPARSE_ZERO_SHARE * p.numel()
    ]
    if not sparse:
        return None
    if all(nonzero[name] == budgets[name] for name in params):
        return {name: local_tensor(p) != 0 for name, p in params.items()}  # (sharded: this rank's rows)
    differ = [
        f"{name}: {nonzero[name]} nonzero, {budgets[name]} asked" for name in params if nonzero[name] != budgets[name]
    ]
    zeros = ", ".join(f"{n} {1 - nonzero[n] / params[n].numel():.3f} zero" for n in sparse[:3])
    zeros += ", ..." if len(sparse) > 3 else ""
    counts = "; ".join(differ[:3]) + ("; ..." if len(differ) > 3 else "")
    raise ValueError(
        f"the model's weights are already sparse ({zeros}) but not with the counts this callback asks for "
        f"({counts}): new random masks would zero trained weights. Give the sparsity and init the weights were "
        "trained with (their zero pattern is then adopted as the masks), resume with fit(ckpt_path=...), or start "
        "from dense weights"
    )
