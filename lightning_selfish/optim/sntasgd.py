"""SNT-ASGD: non-monotonically triggered averaged SGD where every sparse weight is averaged over its own lifetime.

Before :meth:`SNTASGD.start_averaging` the optimizer is exactly ``torch.optim.SGD`` with coupled weight decay and
no momentum (the same operations, so the same bits). From the next step on it also keeps a running average of the
iterates (Eq. 5 of the Selfish-RNN paper):

* a parameter that carries a sparsity mask is averaged per element over the element's current life, i.e. since the
  later of the trigger and the element's most recent growth; elements that do not exist average to exactly 0;
* a parameter without a mask (biases, dense layers) gets the ordinary running average since the trigger.

The running mean is ``ax <- ax + (w - ax) / n`` with ``n`` the element's step count in its window, so at the
first step of a window ``ax`` equals the weight. This is the plain mean of *all* iterates of the window, as Eq. 5
reads; ``torch.optim.ASGD(t0=0, lambd=0)`` and the authors' code drop the window's first iterate (their ``ax`` after
``k`` steps is the mean of iterates 2..k), which matters only for the first few steps after the trigger or a growth.

State per parameter, created at the first averaged step (nothing beyond SGD before the trigger):

* ``"ax"``: the average, shaped and typed like the parameter;
* masked parameters: ``"age"``, float32 shaped like the parameter, ``1 +`` the number of steps already averaged in
  the element's life, and ``0`` where the element does not exist. Multiplying the state by the mask (which the
  sparsity engine does after every step and at every topology update) is therefore harmless: live elements are
  multiplied by 1 and dead ones stay 0. The counter is exact up to 2**24 steps per life;
* dense parameters: ``"n"``, a Python int, the number of averaged steps.

The step reads neither the mask nor any value on the host: the counter itself says which elements are alive.

Sharded parameters (FSDP2's ``fully_shard``: ``DTensor`` parameters split by rows) are stepped and averaged shard by
shard: their masks are this rank's rows (shaped like ``param.to_local()``), their state tensors are DTensors placed
like the parameter, and nothing crosses ranks (see :func:`_local`).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_selfish.core.types import MaskUpdate

__all__ = ["SNTASGD", "sntasgd"]

_COUNTER_DTYPE = torch.float32


# Sharded parameters (FSDP2). The state of a DTensor parameter is kept as DTensors placed like it: what
# ``torch.zeros_like(p)`` gives, what torch's own optimizers keep under FSDP2, what ``torch.distributed.checkpoint``
# saves shard by shard (and reshards on load), so the sparsity engine can treat every optimizer's state alike (each
# rank multiplies its shard by its local mask); ``averaged_parameters()`` are then shaped and placed like the
# parameters. The arithmetic, though, runs on the local tensors (``to_local()``: views of the same storage, so
# in-place changes reach the DTensors):
# * the masks arrive as local tensors, and a DTensor operation refuses to mix them with DTensors ("got mixed
#   torch.Tensor and DTensor"): a mask update would otherwise wrap every mask with ``DTensor.from_local`` first;
# * every operation of the step and of a mask update is elementwise, so the same ``sntasgd`` code on a shard's rows
#   gives what one process gives on those rows, bit for bit, and no collective is needed (none is run);
# * the step skips DTensor's dispatch of each of its operations (a sharding propagation each; not measured).
# Plain parameters never reach these helpers in ``step()`` (``_holds_dtensors`` is False), so their path is unchanged.


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view: in place changes reach it); any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _locals(tensors: list[Tensor]) -> list[Tensor]:
    return [_local(t) for t in tensors]


def _placed_like(param: Tensor, local: Tensor) -> Tensor:
    """State built from local values (``local`` shaped like this rank's part), as a DTensor placed like ``param``."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def _mask_shape(param: Tensor) -> str:
    """The shape a mask of ``param`` must have, as the error messages say it."""
    if isinstance(param, DTensor):
        return (
            f"{tuple(param.to_local().shape)} (this rank's rows of the DTensor parameter of shape "
            f"{tuple(param.shape)}, placed {param.placements})"
        )
    return str(tuple(param.shape))


def _sharding(tensor: Tensor) -> tuple[Any, ...] | None:
    """How a tensor is split over ranks (mesh, placements, this rank's shape); ``None`` for a plain tensor."""
    if not isinstance(tensor, DTensor):
        return None
    return tensor.device_mesh, tuple(tensor.placements), tuple(tensor.to_local().shape)


def _describe_sharding(tensor: Tensor) -> str:
    if not isinstance(tensor, DTensor):
        return "a plain tensor"
    return (
        f"a DTensor placed {tensor.placements} on {tensor.device_mesh} with local shape "
        f"{tuple(tensor.to_local().shape)}"
    )


def _check_hyperparameters(lr: Any, weight_decay: Any, where: str = "") -> None:
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"SNTASGD{where}: {name} must be a real number >= 0, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"SNTASGD{where}: {name} must be a finite number >= 0, got {value!r}")


class SNTASGD(Optimizer):
    r"""SGD that switches to (sparse, lifetime-aware) averaging when told to: SNT-ASGD from Selfish-RNN (Eq. 5).

    Call :meth:`start_averaging` when the validation loss stops improving (``NonMonotonicTrigger`` does it in
    Lightning). Evaluate with the averages through :meth:`swap_averaged`; training always continues from the raw
    weights. Without masks this is standard NT-ASGD (the dense baseline). Masks reach it through
    :meth:`on_mask_update` (the sparsity engine calls it) or :meth:`set_masks` (plain PyTorch).

    (One class of ~380 lines on purpose, as ``torch.optim`` optimizers are: the phase, the averages, their swap for
    evaluation and the complete ``state_dict`` round trip share one state and must change together; the math is the
    function :func:`sntasgd` on lists of tensors.)

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: the constant learning rate (the same before and after the trigger).
        weight_decay: coupled L2 penalty, added to the gradient as in ``torch.optim.SGD``.
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; default: when every parameter is on
            a CUDA device.
    """

    #: ``step()`` never changes ``ax`` where an element does not exist and ``age`` is 0 there, so the sparsity
    #: engine need not re-zero this state after every step (see :mod:`lightning_selfish.core.optim_state`).
    keeps_inactive_state_zero = True  # (protocols.KeepsInactiveStateZero)
    momentum_is_gradient = True  # no momentum: SNFS reads the dense gradient (protocols.GradientAsMomentum)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr, weight_decay)
        if not isinstance(maximize, bool):
            raise TypeError(f"SNTASGD: maximize must be True or False, got {maximize!r}")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"SNTASGD: foreach must be True, False or None, got {foreach!r}")
        self._masks: dict[Tensor, Tensor] = {}
        self._swapped = False
        self._holds_dtensors = False  # any sharded parameter: step() works on local tensors only then
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "averaging": False,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_masks", {})
        self.__dict__.setdefault("_swapped", False)
        self._holds_dtensors = any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"])
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("averaging", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its hyperparameters before anything changes; it joins the current phase."""
        _check_hyperparameters(
            param_group.get("lr", self.defaults["lr"]),
            param_group.get("weight_decay", self.defaults["weight_decay"]),
            where=f" parameter group {len(self.param_groups)}",
        )
        if self.param_groups:
            param_group.setdefault("averaging", self.averaging)
        super().add_param_group(param_group)
        self._holds_dtensors |= any(isinstance(p, DTensor) for p in self.param_groups[-1]["params"])

    # ------------------------------------------------------------------------------------------------------------
    # phase
    # ------------------------------------------------------------------------------------------------------------

    @property
    def averaging(self) -> bool:
        """Whether the averaging phase has started."""
        return any(group["averaging"] for group in self.param_groups)

    def start_averaging(self) -> None:
        """Keep averages from the next step on (the NT-ASGD switch). A no-op once averaging."""
        self._refuse_while_swapped("start_averaging()")
        for group in self.param_groups:
            group["averaging"] = True

    def restart_averaging(self) -> None:
        """Forget all averages: they start again from the next step's weights (ON-LSTM's fine-tuning restarts).

        Also starts averaging if it had not started. Elements that do not exist stay non-existent.
        """
        self._refuse_while_swapped("restart_averaging()")
        with torch.no_grad():
            for group in self.param_groups:
                group["averaging"] = True
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state or "ax" not in state:
                        continue
                    # The average of an empty window is the current weight (the next step overwrites it).
                    ax = _local(state["ax"])
                    ax.copy_(_local(p))
                    if "age" in state:
                        age = _local(state["age"])
                        age.clamp_(max=1.0)  # live elements: a fresh life; dead ones stay 0
                        ax.mul_(age)
                    else:
                        state["n"] = 0

    # ------------------------------------------------------------------------------------------------------------
    # masks
    # ------------------------------------------------------------------------------------------------------------

    def on_mask_update(self, param: Tensor, update: MaskUpdate) -> None:
        """Follow a topology change of ``param`` (the hook of :mod:`lightning_selfish.core.optim_state`).

        Grown elements (``update.grown``) start a new averaging window at their next step; removed and inactive
        ones average to 0. ``update.old is None`` attaches masks (start of fit, after loading a checkpoint, or
        :meth:`set_masks`): elements alive in the mask keep the window they have, others start one. The masks of
        a sharded (``DTensor``) parameter are this rank's rows, shaped like ``param.to_local()``.
        """
        self._refuse_while_swapped("on_mask_update()")
        index = self._index_of(param)
        if not isinstance(update, MaskUpdate):
            raise TypeError(f"SNTASGD.on_mask_update: update must be a MaskUpdate, got {type(update).__name__}")
        local = _local(param)
        for name in ("kept", "new"):
            mask = getattr(update, name)
            if not isinstance(mask, Tensor):
                raise TypeError(
                    f"SNTASGD.on_mask_update: update.{name} for parameter {index} must be a bool tensor of shape "
                    f"{_mask_shape(param)}, got {type(mask).__name__}"
                )
            if mask.dtype != torch.bool or mask.shape != local.shape or isinstance(mask, DTensor):
                got = f"{mask.dtype} {tuple(mask.shape)}{' DTensor' if isinstance(mask, DTensor) else ''}"
                raise ValueError(
                    f"SNTASGD.on_mask_update: update.{name} for parameter {index} must be a bool tensor of shape "
                    f"{_mask_shape(param)}, got {got}"
                )
        new = update.new if update.new.device == local.device else update.new.to(local.device)
        self._masks[param] = new  # the live mask: the engine updates it in place and calls us again
        state = self.state.get(param)
        if not state or "ax" not in state:
            return  # no averaging state yet: it is created from the mask at the first averaged step
        kept = update.kept.to(local.device)
        with torch.no_grad():
            _local(state["ax"]).mul_(kept)
            if "age" not in state:  # the parameter was averaged densely so far: every element has the same window
                state["age"] = _placed_like(param, kept.to(_COUNTER_DTYPE) * float(state.pop("n") + 1))
            age = _local(state["age"])
            age.mul_(kept)
            age.add_(new & (age == 0))  # grown (and newly attached) elements: a fresh life, age 1

    def set_masks(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Attach sparsity masks ``{param: bool mask}`` without the Lightning callback (plain PyTorch).

        The mask of a sharded (``DTensor``) parameter is this rank's rows (shaped like ``param.to_local()``).
        The masks are not copied when already on the parameter's device: change one in place, then call
        :meth:`on_mask_update` with a :class:`MaskUpdate` to tell the optimizer which elements were grown.
        """
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"SNTASGD.set_masks: masks must be a mapping {{param: bool mask}}, got {type(masks).__name__}"
            )
        for param, mask in masks.items():  # check everything before changing anything
            index = self._index_of(param)
            if not isinstance(mask, Tensor):
                raise TypeError(
                    f"SNTASGD.set_masks: the mask of parameter {index} must be a bool tensor of shape "
                    f"{_mask_shape(param)}, got {type(mask).__name__}"
                )
            if mask.dtype != torch.bool or mask.shape != _local(param).shape or isinstance(mask, DTensor):
                got = f"{mask.dtype} {tuple(mask.shape)}{' DTensor' if isinstance(mask, DTensor) else ''}"
                raise ValueError(
                    f"SNTASGD.set_masks: the mask of parameter {index} must be a bool tensor of shape "
                    f"{_mask_shape(param)}, got {got}"
                )
        for param, mask in masks.items():
            mask = mask.to(_local(param).device)
            self.on_mask_update(param, MaskUpdate(None, mask, mask))

    # ------------------------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SGD step; once averaging, also one averaging step. No host-device synchronisation."""
        self._refuse_while_swapped("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            axs: list[Tensor] = []
            ages: list[Tensor | None] = []
            ns: list[int] = []
            averaging = group["averaging"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SNTASGD does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                if not averaging:
                    continue
                state = self.state[p]
                if "ax" not in state:  # first averaged step of this parameter
                    state["ax"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    mask = self._masks.get(p)
                    if mask is not None:
                        state["age"] = _placed_like(p, mask.to(_COUNTER_DTYPE))
                    else:
                        state["n"] = 0
                axs.append(state["ax"])
                if "age" in state:
                    ages.append(state["age"])
                    ns.append(0)
                else:
                    state["n"] += 1
                    ages.append(None)
                    ns.append(state["n"])
            if self._holds_dtensors:  # sharded: each rank steps its own rows (why local tensors: see _local)
                params, grads, axs = _locals(params), _locals(grads), _locals(axs)
                ages = [None if age is None else _local(age) for age in ages]
            sntasgd(
                params,
                grads,
                axs if averaging else None,
                ages if averaging else None,
                ns if averaging else None,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # averaged weights
    # ------------------------------------------------------------------------------------------------------------

    def averaged_parameters(self) -> list[Tensor]:
        """The averaged value of every parameter, in ``param_groups`` order (live tensors, not copies).

        A parameter without an average yet (averaging not started, or no step since) gives its current weights.
        """
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                out.append(state["ax"] if "ax" in state and not self._swapped else p.detach())
        return out

    @contextlib.contextmanager
    def swap_averaged(self) -> Iterator[None]:
        """Put the averages into the model for the block, then restore the raw weights exactly (bitwise).

        The swap copies values in place (no new storage, so cuDNN's flat LSTM weights stay valid); while swapped,
        the averages' buffers hold the raw weights and :meth:`step` refuses to run.
        """
        if self._swapped:
            raise RuntimeError("SNTASGD.swap_averaged: the averaged weights are already swapped in (nested use)")
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @property
    def swapped(self) -> bool:
        """Whether the model currently holds the averaged weights (inside :meth:`swap_averaged`)."""
        return self._swapped

    @torch.no_grad()
    def _swap(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "ax" in state:
                    weights, ax = _local(p), _local(state["ax"])
                    raw = weights.detach().clone()
                    weights.copy_(ax)
                    ax.copy_(raw)
        self._swapped = not self._swapped

    def averaged_and_raw(self, param: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(average, raw weights)`` of a parameter that has an average, whether swapped or not."""
        state = self.state.get(param, {})
        if "ax" not in state:
            return None
        if self._swapped:
            return param.detach(), state["ax"]
        return state["ax"], param.detach()

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Phase (``param_groups[i]["averaging"]``), averages and lifetime counters, as torch state dicts do.

        Masks are not included: their owner (the sparsity callback, or whoever called :meth:`set_masks`) attaches
        them again; the averaged steps need them only through the counters, which are saved.
        """
        state_dict = super().state_dict()
        if self._swapped:  # the averages are in the parameters right now
            params = [p for group in self.param_groups for p in group["params"]]
            for index, state in state_dict["state"].items():
                if "ax" in state:
                    state_dict["state"][index] = {**state, "ax": params[index].detach()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved from the same parameter layout; refuses any other before changing anything."""
        self._refuse_while_swapped("load_state_dict()")
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "SNTASGD.load_state_dict: expected an optimizer state dict (a mapping), "
                f"got {type(state_dict).__name__}"
            )
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or not isinstance(state_dict.get("state"), Mapping):
            raise ValueError(
                "SNTASGD.load_state_dict: expected an optimizer state dict with keys 'state' and 'param_groups', "
                f"got keys {sorted(map(str, state_dict))}"
            )
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"SNTASGD.load_state_dict: the state dict has {len(saved_groups)} parameter groups, this optimizer "
                f"has {len(groups)}: it was saved from a different parameter layout"
            )
        saved_to_param: dict[Any, tuple[int, Tensor]] = {}
        for g, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"SNTASGD.load_state_dict: parameter group {g} has {len(group['params'])} parameters here and "
                    f"{len(saved['params'])} in the state dict: it was saved from a different parameter layout"
                )
            for saved_id, p in zip(saved["params"], group["params"]):
                saved_to_param[saved_id] = (g, p)
        counters: dict[Tensor, Tensor] = {}
        for saved_id, state in state_dict["state"].items():
            if saved_id not in saved_to_param:
                raise ValueError(f"SNTASGD.load_state_dict: state for unknown parameter {saved_id!r}")
            g, p = saved_to_param[saved_id]
            for key in ("ax", "age"):
                value = state.get(key)
                if isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"SNTASGD.load_state_dict: parameter {saved_id} (group {g}) has shape {tuple(p.shape)} but "
                        f"its saved {key!r} has shape {tuple(value.shape)}: the state dict was saved from a "
                        "different parameter layout"
                    )
                if isinstance(value, Tensor) and _sharding(value) != _sharding(p):
                    raise ValueError(
                        f"SNTASGD.load_state_dict: parameter {saved_id} (group {g}) is {_describe_sharding(p)} but "
                        f"its saved {key!r} is {_describe_sharding(value)}: read a state saved on other ranks or as "
                        "whole tensors with torch.distributed.checkpoint (get_optimizer_state_dict, dcp.load, "
                        "set_optimizer_state_dict), which places it as the parameters are"
                    )
            if "ax" in state and ("age" in state) == ("n" in state):
                raise ValueError(
                    f"SNTASGD.load_state_dict: the state of parameter {saved_id} has an average but "
                    f"{'both' if 'age' in state else 'neither'} of 'age' and 'n'; keys: {sorted(state)}"
                )
            if isinstance(state.get("age"), Tensor):
                counters[p] = state["age"]
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, age in counters.items():  # torch casts state to the parameter's dtype; counters stay float32
                self.state[p]["age"] = age.to(device=p.device, dtype=_COUNTER_DTYPE)
            for p, mask in self._masks.items():  # masks attached before loading stay in force
                if "ax" in self.state.get(p, {}):
                    self.on_mask_update(p, MaskUpdate(None, mask, mask))

    # ------------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------------

    def _index_of(self, param: Tensor) -> int:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return index
                index += 1
        raise ValueError(
            f"SNTASGD: the tensor of shape {tuple(param.shape)} is not a parameter of this optimizer "
            f"(it holds {index} parameters)"
        )

    def _refuse_while_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"SNTASGD.{what} inside swap_averaged(): the model holds the averaged weights; leave the block first"
            )


def sntasgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor] | None = None,
    ages: list[Tensor | None] | None = None,
    ns: list[int] | None = None,
    *,
    lr: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    r"""One SNT-ASGD step on lists of tensors, in place (the functional form of :class:`SNTASGD`).

    ``p <- p - lr * (g + weight_decay * p)`` as in ``torch.optim.SGD``; then, if ``axs`` is given (averaging),
    ``ax <- ax + (p - ax) / n`` for every parameter:

    * masked parameters (``ages[i]`` a float32 tensor shaped like the parameter): ``n = ages[i]`` per element,
      ``0`` marking elements that do not exist (their average is left untouched, so it stays 0); ``ages[i]`` is
      incremented in place where the element exists;
    * dense parameters (``ages[i] is None``): ``n = ns[i]``, the number of this step in the window (1 at the first
      averaged step); the caller keeps the count.

    Only elementwise and ``torch._foreach_*`` operations, and nothing read back to the host.
    """
    if axs is not None and (ages is None or ns is None or not len(axs) == len(ages) == len(ns) == len(params)):
        raise ValueError(
            "sntasgd: when averaging, axs, ages and ns must all be given with one entry per parameter; got "
            f"{len(params)} params, axs={_length(axs)}, ages={_length(ages)}, ns={_length(ns)}"
        )
    if len(grads) != len(params):
        raise ValueError(f"sntasgd: {len(params)} params but {len(grads)} grads")
    if not params:
        return
    if foreach is None:
        foreach = all(p.is_cuda for p in params)
    if foreach:
        _multi_tensor_sntasgd(params, grads, axs, ages, ns, lr, weight_decay, maximize)
    else:
        _single_tensor_sntasgd(params, grads, axs, ages, ns, lr, weight_decay, maximize)


def _length(values: list[Any] | None) -> str:
    return "None" if values is None else str(len(values))


def _single_tensor_sntasgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor] | None,
    ages: list[Tensor | None] | None,
    ns: list[int] | None,
    lr: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        param.add_(grad, alpha=-lr)  # exactly torch.optim.SGD without momentum
        if axs is None:
            continue
        ax, age = axs[i], ages[i]  # type: ignore[index]
        if age is None:
            ax.lerp_(param, 1.0 / ns[i])  # type: ignore[index]
            continue
        # 1/n where the element exists, 0 where it does not (1/0 = inf, mapped to 0). The gradient temporary,
        # no longer needed, holds the weights when it can: one large allocation less per step.
        fresh = grad is not grads[i] and grad.dtype == _COUNTER_DTYPE and grad.is_contiguous() and age.is_contiguous()
        weight = torch.reciprocal(age, out=grad) if fresh else torch.reciprocal(age)
        weight.nan_to_num_(nan=0.0, posinf=0.0)
        ax.lerp_(param, weight if weight.dtype == ax.dtype else weight.to(ax.dtype))
        age.addcmul_(weight, age)  # age * (1/age) == 1 where alive (exactly, below 2**24), 0 * 0 where not


def _multi_tensor_sntasgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor] | None,
    ages: list[Tensor | None] | None,
    ns: list[int] | None,
    lr: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for indices in buckets.values():
        ps = [params[i] for i in indices]
        gs: list[Tensor] | tuple[Tensor, ...] = [grads[i] for i in indices]
        if maximize:
            gs = torch._foreach_neg(gs)
        if weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)
        torch._foreach_add_(ps, gs, alpha=-lr)
        del gs
        if axs is None:
            continue
        masked = [i for i in indices if ages[i] is not None]  # type: ignore[index]
        if masked:
            m_axs = [axs[i] for i in masked]
            m_ps = [params[i] for i in masked]
            m_ages: list[Tensor] = [ages[i] for i in masked]  # type: ignore[index, misc]
            weights = torch._foreach_reciprocal(m_ages)
            for w in weights:
                w.nan_to_num_(nan=0.0, posinf=0.0)
            lerp_weights = [w if w.dtype == a.dtype else w.to(a.dtype) for w, a in zip(weights, m_axs)]
            torch._foreach_lerp_(m_axs, m_ps, lerp_weights)
            torch._foreach_addcmul_(m_ages, weights, m_ages)
        by_n: dict[int, list[int]] = defaultdict(list)
        for i in indices:
            if ages[i] is None:  # type: ignore[index]
                by_n[ns[i]].append(i)  # type: ignore[index]
        for n, dense in by_n.items():
            torch._foreach_lerp_([axs[i] for i in dense], [params[i] for i in dense], 1.0 / n)
