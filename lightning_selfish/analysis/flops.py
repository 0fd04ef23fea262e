"""Training and inference FLOPs of sparse RNNs, counted the way the paper's Appendix L (Tables 9 and 10) does.

Pure functions on parameter shapes and active counts; no Lightning (the logging is
:class:`lightning_selfish.callbacks.flops.FlopsCallback`). The conventions, all from Appendix L / Evci et al. (2020):

* A weight matrix that multiplies an activation costs 2 FLOPs (multiply and add) per active weight per use. Most
  weights are used once per token (an LSTM's ``weight_ih``/``weight_hh``, a ``Linear``); a model declares other
  counts (the MoS decoder is applied once per expert: 15 uses per token) in ``flops_uses_per_token``.
* Training = forward ``f`` + backward ``2f`` (the gradient with respect to the activations and the one with
  respect to the weights, each as expensive as the forward).
* An embedding lookup costs nothing. An **untied** embedding still pays for the gradient of its weights during
  training (the paper: "we only count the computations to calculate the gradient of its parameters"); a **tied**
  embedding/decoder is one tensor, counted once, as the decoder.
* Biases and elementwise work (gate nonlinearities, softmax) are left out, as in the paper.
* Methods that need a dense gradient pay it on the weight-gradient part of the backward pass: SNFS on every step
  (its momentum is dense), RigL on the step before each connectivity update (Table 10:
  ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``). Dense-to-sparse methods (GMP) simply have denser masks early on.
* Densities are the actual per-tensor active counts of the masks, not ``1 - S``: ER/ERK, DSR and SNFS, whose
  per-layer densities differ from uniform, cost what their masks cost. (The paper approximates DSR and SNFS by their
  final distribution; counting the masks as they are used along training is exact.)

With these rules the dense stacked LSTM costs 3.36e8 FLOPs per training token, 3.1e16 over 100 PTB epochs, and
7.1e10 per inference batch of 20 x 35 tokens: Table 9's 3.1e16 and 7.2e10.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn

__all__ = [
    "WeightCost",
    "collect_weight_costs",
    "inference_flops_per_token",
    "training_flops_per_token",
]

WeightKind = Literal["matmul", "lookup"]

#: The attribute a module sets to declare how many times per token each of its weights is used.
USES_ATTRIBUTE = "flops_uses_per_token"


@dataclass(frozen=True)
class WeightCost:
    """One weight tensor as FLOPs see it.

    ``kind`` is ``"matmul"`` (multiplies activations: forward, activation gradient and weight gradient) or
    ``"lookup"`` (an untied embedding: only the weight gradient counts). ``uses_per_token`` is how many times each
    weight is multiplied per token of the batch.
    """

    name: str
    numel: int
    kind: WeightKind
    uses_per_token: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("matmul", "lookup"):
            raise ValueError(f"kind of {self.name!r} must be 'matmul' or 'lookup', got {self.kind!r}")
        if not self.uses_per_token >= 0:
            raise ValueError(f"uses_per_token of {self.name!r} must be >= 0, got {self.uses_per_token!r}")


def collect_weight_costs(module: nn.Module) -> dict[str, WeightCost]:
    """The weights of ``module`` that cost FLOPs, keyed by their name in ``module.named_parameters()``.

    Defaults: ``nn.Linear`` weights and the ``weight_ih``/``weight_hh`` of ``nn.LSTM``/``nn.GRU``/``nn.RNN`` are
    matmuls used once per token; an ``nn.Embedding`` weight is a lookup, unless the same tensor is also the weight
    of a ``Linear`` (tied), in which case it is that matmul, counted once. Any module may declare
    ``flops_uses_per_token = {"<param name relative to the module>": uses}`` for its own weights; a declaration wins
    over the defaults. Other parameters with two or more dimensions are an error (their cost is unknown: declare
    them); 1-d parameters (biases, norms) are left out.
    """
    canonical = {id(p): name for name, p in module.named_parameters()}  # tied tensors appear once
    costs: dict[int, WeightCost] = {}
    declared: set[int] = set()
    lookups: dict[int, tuple[str, int]] = {}
    for prefix, sub in module.named_modules():
        declarations = getattr(sub, USES_ATTRIBUTE, None) or {}
        if not isinstance(declarations, Mapping):
            raise TypeError(f"{prefix or 'the model'}.{USES_ATTRIBUTE} must be a dict of name -> uses per token")
        for local, uses in declarations.items():
            param = _resolve(sub, local)
            if param is None:
                raise ValueError(
                    f"{type(sub).__name__} ({prefix or 'the model'}) declares {USES_ATTRIBUTE}[{local!r}], "
                    f"which is not one of its parameters: {sorted(n for n, _ in sub.named_parameters())}"
                )
            name = canonical[id(param)]
            costs[id(param)] = WeightCost(name, param.numel(), "matmul", float(uses))
            declared.add(id(param))
        for local, param in sub.named_parameters(recurse=False):
            key = id(param)
            if key in declared:
                continue
            name = canonical[key]
            if isinstance(sub, nn.Embedding) and local == "weight":
                lookups[key] = (name, param.numel())
            elif (isinstance(sub, nn.Linear) and local == "weight") or (
                isinstance(sub, nn.RNNBase) and local.startswith(("weight_ih", "weight_hh"))
            ):
                costs[key] = WeightCost(name, param.numel(), "matmul", 1.0)
    for key, (name, numel) in lookups.items():
        costs.setdefault(key, WeightCost(name, numel, "lookup", 1.0))  # tied: the matmul already counts it
    unknown = [name for name, p in module.named_parameters() if p.dim() >= 2 and id(p) not in costs]
    if unknown:
        raise ValueError(
            f"cannot count the FLOPs of {unknown}: they belong to no nn.Linear, nn.Embedding or RNN module. Declare "
            f"them on their module as {USES_ATTRIBUTE} = {{'<name>': <uses per token>}} (0 to leave one out)"
        )
    order = {name: k for k, name in enumerate(canonical.values())}
    return {cost.name: cost for cost in sorted(costs.values(), key=lambda c: order[c.name])}


def training_flops_per_token(
    costs: Mapping[str, WeightCost],
    active: Mapping[str, int] | None = None,
    dense_gradient: bool = False,
) -> float:
    """Training FLOPs per token: forward ``f`` + activation gradient ``f`` + weight gradient ``f`` (Table 10).

    ``active`` gives the active count of the sparse tensors (missing names are dense); ``None`` is the dense model.
    ``dense_gradient`` computes the weight gradient densely (SNFS every step, RigL on update steps).
    """
    total = 0.0
    for cost in costs.values():
        nnz = _active(cost, active)
        weight_grad = 2.0 * cost.uses_per_token * (cost.numel if dense_gradient else nnz)
        if cost.kind == "lookup":
            total += weight_grad
        else:
            total += 4.0 * cost.uses_per_token * nnz + weight_grad
    return total


def inference_flops_per_token(costs: Mapping[str, WeightCost], active: Mapping[str, int] | None = None) -> float:
    """Forward FLOPs per token of the model with these active counts (lookups are free)."""
    return sum(2.0 * c.uses_per_token * _active(c, active) for c in costs.values() if c.kind == "matmul")


def _active(cost: WeightCost, active: Mapping[str, int] | None) -> int:
    if active is None or cost.name not in active:
        return cost.numel
    nnz = int(active[cost.name])
    if not 0 <= nnz <= cost.numel:
        raise ValueError(f"active count of {cost.name!r} must be in [0, {cost.numel}], got {nnz}")
    return nnz


def _resolve(module: nn.Module, dotted: str) -> nn.Parameter | None:
    owner_path, _, leaf = dotted.rpartition(".")
    try:
        owner = module.get_submodule(owner_path) if owner_path else module
    except AttributeError:
        return None
    return dict(owner.named_parameters(recurse=False, remove_duplicate=False)).get(leaf)
