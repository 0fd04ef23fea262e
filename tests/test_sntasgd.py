"""SNTASGD in plain PyTorch: against SGD, ASGD and a naive per-element reference of Eq. 5; state, swaps, errors."""

from __future__ import annotations

import copy
import io
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_selfish import SparseEngine
from lightning_selfish.core.optim_state import reset_optimizer_state
from lightning_selfish.core.types import MaskUpdate
from lightning_selfish.optim.sntasgd import SNTASGD, sntasgd

SHAPES = {"w1": (6, 5), "w2": (4, 6), "b": (4,)}
MASKED = ("w1", "w2")


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {name: nn.Parameter(torch.randn(shape, generator=g, dtype=dtype)) for name, shape in SHAPES.items()}


def quadratic_grads(params: dict[str, nn.Parameter], target: dict[str, torch.Tensor]) -> None:
    """Weight-dependent gradients, so that trajectories are comparable only if the updates are."""
    for name, p in params.items():
        p.grad = (p.detach() - target[name]) * 0.7 + torch.sin(p.detach()) * 0.1


def enforce(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """What the sparsity engine does after every step: weights and every state tensor shaped like them times M."""
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.mul_(mask.to(p.dtype))
            for value in opt.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(mask.to(value.dtype))


def topology_update(opt, params, masks, g: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Engine-style update: remove ~40% of live weights, regrow as many at random (removed ones may regrow)."""
    out = {}
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            old = mask.clone()
            kept = old & (torch.rand(mask.shape, generator=g) > 0.4)
            free = ~kept
            grow = free & (torch.rand(mask.shape, generator=g) < (old.sum() - kept.sum()) / free.sum().clamp(min=1))
            new = kept | grow
            p.mul_(kept.to(p.dtype))
            mask.copy_(new)
            reset_optimizer_state([opt], p, MaskUpdate(old, kept, mask))
            out[name] = (kept, mask.clone())
    return out


class NaiveReference:
    """Eq. 5 by definition: per element, the Python list of its weights since max(trigger, growth); plain mean."""

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        self.params, self.masks = params, masks
        self.averaging = False
        self.history: dict[str, list[list[float]]] = {n: [[] for _ in range(p.numel())] for n, p in params.items()}

    def restart(self) -> None:
        self.averaging = True
        for lists in self.history.values():
            for values in lists:
                values.clear()

    def topology(self, changes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (kept, _new) in changes.items():
            for e, k in enumerate(kept.flatten().tolist()):
                if not k:  # removed, grown, or never alive: a new (or no) life
                    self.history[name][e].clear()

    def after_step(self) -> None:
        if not self.averaging:
            return
        for name, p in self.params.items():
            alive = self.masks[name].flatten().tolist() if name in self.masks else [True] * p.numel()
            for e, (value, a) in enumerate(zip(p.detach().flatten().tolist(), alive)):
                if a:
                    self.history[name][e].append(value)

    def averages(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            alive = self.masks[name].flatten().tolist() if name in self.masks else [True] * p.numel()
            values = [
                sum(h) / len(h) if (a and h) else (p.detach().flatten()[e].item() if a else 0.0)
                for e, (h, a) in enumerate(zip(self.history[name], alive))
            ]
            out[name] = torch.tensor(values, dtype=torch.float64).reshape(p.shape)
        return out


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_naive_reference(seed: int, foreach: bool) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    params = make_params(seed)
    masks = {n: torch.rand(SHAPES[n], generator=g) < 0.4 for n in MASKED}
    opt = SNTASGD(params.values(), lr=0.3, weight_decay=0.01, foreach=foreach)
    with torch.no_grad():
        for name, mask in masks.items():  # attach as the engine does
            params[name].mul_(mask)
            reset_optimizer_state([opt], params[name], MaskUpdate(None, mask.clone(), mask))
    ref = NaiveReference(params, masks)
    trigger_at, steps = 6 + seed, 40
    checked = 0
    for t in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        enforce(opt, params, masks)
        ref.after_step()
        if t == trigger_at:
            opt.start_averaging()
            ref.restart()
        if t == 31:
            opt.restart_averaging()
            ref.restart()
        if t % 5 == 4 or t == trigger_at:  # topology updates, including right after the trigger
            ref.topology(topology_update(opt, params, masks, g))
        if t >= trigger_at:
            averaged = dict(zip(params, opt.averaged_parameters()))
            for name, expected in ref.averages().items():
                torch.testing.assert_close(averaged[name].double(), expected, rtol=0, atol=1e-6)
                if name in masks:
                    assert (averaged[name][~masks[name]] == 0).all()
            checked += 1
    assert checked > 20


def test_first_averaged_step_equals_weight() -> None:
    params = make_params()
    masks = {n: torch.ones(SHAPES[n], dtype=torch.bool) for n in MASKED}
    opt = SNTASGD(params.values(), lr=0.1)
    opt.set_masks({params[n]: m for n, m in masks.items()})
    opt.start_averaging()
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    for p, avg in zip(params.values(), opt.averaged_parameters()):
        assert torch.equal(avg, p.detach())


@pytest.mark.parametrize("foreach", [False, True])
def test_sgd_phase_is_exactly_sgd(foreach: bool) -> None:
    target = {n: torch.zeros(s) for n, s in SHAPES.items()}
    ours, theirs = make_params(), make_params()
    opt = SNTASGD(ours.values(), lr=0.37, weight_decay=1.2e-2, foreach=foreach)
    sgd = torch.optim.SGD(theirs.values(), lr=0.37, weight_decay=1.2e-2)
    for _ in range(15):
        quadratic_grads(ours, target)
        quadratic_grads(theirs, target)
        opt.step()
        sgd.step()
    for name in SHAPES:
        assert torch.equal(ours[name], theirs[name])
    assert all(len(s) == 0 for s in opt.state.values())  # nothing beyond SGD before the trigger


@pytest.mark.parametrize("foreach", [False, True])
def test_dense_path_equals_asgd(foreach: bool) -> None:
    """torch.optim.ASGD(t0=0, lambd=0) drops the first iterate: its ax after k steps is the mean of iterates 2..k.

    So ASGD from step 1 must equal SNTASGD whose averaging starts after step 1 (Eq. 5: the mean of every iterate
    of the window), and SNTASGD's own average must be the mean of all iterates since its trigger.
    """
    target = {n: torch.full(s, 0.5) for n, s in SHAPES.items()}
    ours, theirs = make_params(3), make_params(3)
    lr, wd = 0.25, 0.0625  # exactly representable: ASGD keeps its eta in float32
    opt = SNTASGD(ours.values(), lr=lr, weight_decay=wd, foreach=foreach)
    asgd = torch.optim.ASGD(theirs.values(), lr=lr, t0=0, lambd=0, weight_decay=wd)
    iterates = []
    for k in range(1, 13):
        quadratic_grads(ours, target)
        quadratic_grads(theirs, target)
        opt.step()
        asgd.step()
        iterates.append({n: p.detach().clone() for n, p in ours.items()})
        if k == 1:
            opt.start_averaging()
        for name in SHAPES:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)
        if k >= 2:
            for name, avg in zip(SHAPES, opt.averaged_parameters()):
                torch.testing.assert_close(avg, asgd.state[theirs[name]]["ax"], rtol=0, atol=1e-6)
                mean = torch.stack([it[name] for it in iterates[1:]]).mean(0)
                torch.testing.assert_close(avg, mean, rtol=0, atol=1e-6)


def test_swap_is_bitwise_and_guards() -> None:
    params = make_params()
    opt = SNTASGD(params.values(), lr=0.2)
    opt.set_masks({params["w1"]: torch.rand(SHAPES["w1"]) < 0.5})
    opt.start_averaging()
    for _ in range(3):
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
    raw = {n: p.detach().clone() for n, p in params.items()}
    averages = [a.clone() for a in opt.averaged_parameters()]
    with opt.swap_averaged():
        assert opt.swapped
        for p, avg in zip(params.values(), averages):
            assert torch.equal(p.detach(), avg)
        assert all(torch.equal(a, b) for a, b in zip(opt.averaged_parameters(), averages))
        saved = opt.state_dict()  # while swapped, the state dict still holds the averages
        assert torch.equal(saved["state"][0]["ax"], averages[0])
        with pytest.raises(RuntimeError, match="swap_averaged"):
            opt.step()
        with pytest.raises(RuntimeError, match="nested"), opt.swap_averaged():
            pass
    assert not opt.swapped
    for name, p in params.items():
        assert torch.equal(p.detach(), raw[name])
    with pytest.raises(ValueError), opt.swap_averaged():  # restored even when the block raises
        raise ValueError
    assert all(torch.equal(p.detach(), raw[n]) for n, p in params.items())


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("reattach", [True, False])
def test_state_dict_roundtrip_resumes_exactly(reattach: bool) -> None:
    g = torch.Generator().manual_seed(7)
    params = make_params(1)
    masks = {n: torch.rand(SHAPES[n], generator=g) < 0.5 for n in MASKED}
    opt = SNTASGD(params.values(), lr=0.3, weight_decay=1e-3)
    opt.set_masks({params[n]: m for n, m in masks.items()})

    def run(opt, params, masks, steps, g):
        for t in range(steps):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            enforce(opt, params, masks)
            if t % 4 == 3:
                topology_update(opt, params, masks, g)

    run(opt, params, masks, 5, g)
    opt.start_averaging()
    run(opt, params, masks, 6, g)
    checkpoint = _roundtrip(
        {
            "opt": opt.state_dict(),
            "params": {n: p.detach() for n, p in params.items()},
            "masks": masks,
            "rng": g.get_state(),
        }
    )
    assert checkpoint["opt"]["param_groups"][0]["averaging"] is True
    assert checkpoint["opt"]["state"][0]["age"].dtype == torch.float32
    run(opt, params, masks, 9, g)

    params2 = {n: nn.Parameter(t.clone()) for n, t in checkpoint["params"].items()}
    masks2 = {n: m.clone() for n, m in checkpoint["masks"].items()}
    opt2 = SNTASGD(params2.values(), lr=0.3, weight_decay=1e-3)
    if reattach:  # as the sparsity callback does at the start of a resumed fit
        opt2.set_masks({params2[n]: m for n, m in masks2.items()})
    opt2.load_state_dict(checkpoint["opt"])
    g2 = torch.Generator()
    g2.set_state(checkpoint["rng"])
    run(opt2, params2, masks2, 9, g2)
    for name in SHAPES:
        assert torch.equal(params[name], params2[name])
    for a, b in zip(opt.averaged_parameters(), opt2.averaged_parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(params.values(), params2.values()):
        for key, value in opt.state[p].items():
            other = opt2.state[p2][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_restart_averaging_starts_from_current_weights() -> None:
    params = make_params()
    opt = SNTASGD(params.values(), lr=0.2)
    opt.set_masks({params["w1"]: torch.rand(SHAPES["w1"]) < 0.5})
    opt.start_averaging()
    for _ in range(4):
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
        enforce(opt, params, {"w1": opt._masks[params["w1"]]})
    opt.restart_averaging()
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    enforce(opt, params, {"w1": opt._masks[params["w1"]]})
    for p, avg in zip(params.values(), opt.averaged_parameters()):
        assert torch.equal(avg, p.detach())


def test_state_is_small_and_counters_float32() -> None:
    params = make_params(dtype=torch.bfloat16)
    opt = SNTASGD(params.values(), lr=0.25)
    opt.set_masks({params["w1"]: torch.rand(SHAPES["w1"]) < 0.5})
    opt.start_averaging()
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    w1, b = params["w1"], params["b"]
    assert set(opt.state[w1]) == {"ax", "age"} and opt.state[w1]["age"].dtype == torch.float32
    assert opt.state[w1]["ax"].dtype == torch.bfloat16
    assert set(opt.state[b]) == {"ax", "n"} and opt.state[b]["n"] == 1
    opt2 = SNTASGD(make_params(dtype=torch.bfloat16).values(), lr=0.25)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt2.state[opt2.param_groups[0]["params"][0]]["age"].dtype == torch.float32  # not cast to bf16


def test_masks_attached_mid_averaging_keep_the_window() -> None:
    """A densely averaged parameter that gets a mask: live elements keep their average, dead ones become 0."""
    params = make_params()
    opt = SNTASGD(params.values(), lr=0.2)
    opt.start_averaging()
    history = []
    for _ in range(3):
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
        history.append(params["w1"].detach().clone())
    mask = torch.rand(SHAPES["w1"]) < 0.5
    opt.set_masks({params["w1"]: mask})
    with torch.no_grad():
        params["w1"].mul_(mask)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    enforce(opt, params, {"w1": mask})
    history.append(params["w1"].detach().clone())
    expected = torch.stack(history).mean(0) * mask
    torch.testing.assert_close(opt.averaged_parameters()[0], expected, rtol=0, atol=1e-6)


#: ATen operators that read a device value back to the host, i.e. synchronise with a GPU: ``.item()``,
#: ``float(t)``, ``bool(t)`` and ``if t:`` all end in ``_local_scalar_dense``; the others have an output whose size
#: depends on the data. ``index``/``index_put_`` are listed separately: they synchronise only with a bool mask.
SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.is_nonzero",
    "aten.equal",
    "aten.unique_dim",
    "aten._unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}
BOOL_INDEXING_OPS = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


class HostSyncDetector(TorchDispatchMode):
    """Records every operator, at the ATen (C++) level, that would synchronise a GPU with the host.

    This sees what patching Python methods cannot: boolean-mask indexing and assignment (``x[mask]``,
    ``x[mask] = y``, which run ``nonzero`` inside C++), data-dependent output shapes and scalar reads made by
    C++ code. ``torch.compile(fullgraph=True)`` is no substitute on torch 2.13: dynamo now captures ``.item()`` and
    boolean indexing in one graph instead of refusing them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in SYNCING_OPS:
            self.syncs.append(name)
        elif name in BOOL_INDEXING_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self.syncs.append(f"{name} with a bool mask")
        return func(*args, **kwargs)


@contextmanager
def no_host_reads():
    """Fail on anything that reads a tensor value back to the host (what would synchronise with a GPU).

    Two nets: Python-level methods that read values directly (``tolist``, ``numpy``, which bypass the dispatcher),
    and every ATen operator that synchronises (:class:`HostSyncDetector`).
    """
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside step()")

        return method

    detector = HostSyncDetector()
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        with detector:
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
    assert not detector.syncs, f"host-device synchronisation inside step(): {detector.syncs}"


def test_the_sync_detector_sees_cpp_level_syncs() -> None:
    x, mask = torch.randn(4, 5), torch.rand(4, 5) < 0.5
    cases = {
        "x[mask] = 0": lambda: x.__setitem__(mask, 0.0),
        "x[mask] = x[mask] * 2": lambda: x.__setitem__(mask, x[mask] * 2),
        "x.sum().item()": lambda: x.sum().item(),
        "if x.any()": lambda: bool(x.any()),
        "x.masked_select(mask)": lambda: x.masked_select(mask),
        "torch.equal": lambda: torch.equal(x, x),
    }
    for what, call in cases.items():
        with HostSyncDetector() as detector:
            call()
        assert detector.syncs, what
    with HostSyncDetector() as detector:  # sync-free: masked_fill_, where, arithmetic, integer-index gathers
        x.masked_fill_(mask, 0.0)
        torch.where(mask, x, -x).add_(1)
        x.view(-1)[torch.arange(3)] = 1.0
    assert detector.syncs == []


@pytest.mark.parametrize("foreach", [False, True])
def test_step_reads_nothing_back(foreach: bool) -> None:
    params = make_params()
    opt = SNTASGD(params.values(), lr=0.2, weight_decay=1e-4, foreach=foreach)
    opt.set_masks({params[n]: torch.rand(SHAPES[n]) < 0.5 for n in MASKED})
    for phase in range(2):
        for _ in range(3):
            for p in params.values():
                p.grad = torch.randn_like(p)
            with no_host_reads():
                opt.step()
        if phase == 0:
            opt.start_averaging()
    assert opt.state[params["w1"]]["age"].max() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CPU twin is test_step_reads_nothing_back")
@pytest.mark.parametrize("foreach", [False, True])
def test_step_does_not_synchronise_a_gpu(foreach: bool) -> None:
    device = torch.device("cuda")
    params = {n: nn.Parameter(p.detach().to(device)) for n, p in make_params().items()}
    opt = SNTASGD(params.values(), lr=0.2, weight_decay=1e-4, foreach=foreach)
    opt.set_masks({params[n]: (torch.rand(SHAPES[n]) < 0.5).to(device) for n in MASKED})
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.start_averaging()
    opt.step()  # creates the averaging state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.state[params["w1"]]["age"].max()) == 5


def test_functional_form_matches_the_class() -> None:
    params, params2 = make_params(), make_params()
    masks = {params["w1"]: torch.rand(SHAPES["w1"]) < 0.5}
    opt = SNTASGD(params.values(), lr=0.2, weight_decay=1e-3)
    opt.set_masks(masks)
    opt.start_averaging()
    mask2 = next(iter(masks.values()))
    axs = [torch.zeros_like(p) for p in params2.values()]
    ages = [mask2.float(), None, None]
    for k in range(1, 5):
        for p, p2 in zip(params.values(), params2.values()):
            p.grad = torch.randn_like(p)
            p2.grad = p.grad.clone()
        opt.step()
        with torch.no_grad():
            sntasgd(
                list(params2.values()),
                [p.grad for p in params2.values()],
                axs,
                ages,
                [0, k, k],
                lr=0.2,
                weight_decay=1e-3,
            )
    for a, b in zip(opt.averaged_parameters(), axs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="axs, ages and ns"):
        sntasgd(list(params2.values()), [p.grad for p in params2.values()], axs, None, None, lr=0.1)


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr must be a finite number >= 0, got -1.0"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number >= 0"),
        ({"lr": True}, TypeError, "lr must be a real number"),
        ({"lr": 1.0, "weight_decay": -1e-6}, ValueError, "weight_decay must be a finite number >= 0, got -1e-06"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match) -> None:
    with pytest.raises(error, match=match) as info:
        SNTASGD(make_params().values(), **kwargs)
    assert type(info.value) is error


def test_bad_param_group() -> None:
    opt = SNTASGD([make_params()["w1"]], lr=0.1)
    with pytest.raises(ValueError, match="parameter group 1: lr must be"):
        opt.add_param_group({"params": [make_params()["b"]], "lr": -0.5})
    assert len(opt.param_groups) == 1


def test_load_from_a_different_layout() -> None:
    params = make_params()
    opt = SNTASGD(params.values(), lr=0.1)
    opt.start_averaging()
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    swapped_shapes = {"w2": nn.Parameter(torch.zeros(4, 6)), "w1": nn.Parameter(torch.zeros(6, 5)), "b": params["b"]}
    other = SNTASGD(swapped_shapes.values(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 0 \(group 0\) has shape \(4, 6\) but its saved 'ax' has shape"):
        other.load_state_dict(saved)
    assert len(other.state) == 0  # nothing loaded
    with pytest.raises(ValueError, match="group 0 has 2 parameters here and 3"):
        SNTASGD([params["w1"], params["w2"]], lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="2 parameter groups, this optimizer has 1"):
        SNTASGD(params.values(), lr=0.1).load_state_dict({"state": {}, "param_groups": saved["param_groups"] * 2})


def test_mask_errors() -> None:
    params = make_params()
    opt = SNTASGD([params["w1"]], lr=0.1)
    with pytest.raises(ValueError, match=r"must be a bool tensor of shape \(6, 5\), got torch.float32 \(6, 5\)"):
        opt.set_masks({params["w1"]: torch.ones(6, 5)})
    with pytest.raises(ValueError, match=r"not a parameter of this optimizer"):
        opt.set_masks({params["w2"]: torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"update.new for parameter 0 must be a bool tensor of shape \(6, 5\)"):
        m = torch.ones(6, 5, dtype=torch.bool)
        opt.on_mask_update(params["w1"], MaskUpdate(None, m, torch.ones(5, 6, dtype=torch.bool)))


def test_added_group_joins_the_phase_and_deepcopy() -> None:
    params = make_params()
    opt = SNTASGD([params["w1"]], lr=0.1)
    opt.start_averaging()
    opt.add_param_group({"params": [params["b"]]})
    assert opt.param_groups[1]["averaging"] is True
    clone = copy.deepcopy(opt)
    assert clone.averaging and not clone.swapped
    for p in params.values():
        p.grad = torch.randn_like(p)
    clone.step()


def test_loading_a_plain_sgd_state_dict() -> None:
    params = make_params()
    sgd = torch.optim.SGD(params.values(), lr=0.1)
    opt = SNTASGD(params.values(), lr=0.1)
    opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["averaging"] is False
    opt.start_averaging()
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.averaging


# --------------------------------------------------------------------------------------------------------------
# exact values and edge cases
# --------------------------------------------------------------------------------------------------------------


def two_params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(6, 5, generator=g).to(dtype)), nn.Parameter(torch.randn(5, generator=g).to(dtype))]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1.0, 0.25])
def test_sntasgd_sgd_phase_with_maximize_and_weight_decay(foreach, weight_decay):
    ours, theirs = two_params(), two_params()
    opt = SNTASGD(ours, lr=0.125, weight_decay=weight_decay, maximize=True, foreach=foreach)
    sgd = torch.optim.SGD(theirs, lr=0.125, weight_decay=weight_decay, maximize=True)
    for step in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.sin(a.detach() * (step + 1))
            b.grad = a.grad.clone()
        grads = [p.grad.clone() for p in ours]
        opt.step()
        sgd.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, ours))  # the step leaves the gradients alone
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_sntasgd_defaults_and_state_flags():
    params, reference = two_params(), two_params()
    opt = SNTASGD(params, lr=0.5)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.swapped is False and opt.averaging is False
    sgd = torch.optim.SGD(reference, lr=0.5)
    for p, q in zip(params, reference):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


def test_sntasgd_unpickles_an_older_state():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    state = opt.__getstate__()
    state = {k: v for k, v in state.items() if k not in ("_masks", "_swapped")}
    for group in state["param_groups"]:
        for key in ("maximize", "foreach", "averaging"):
            group.pop(key)
    old = SNTASGD.__new__(SNTASGD)
    old.__setstate__(state)
    assert old._masks == {} and old._swapped is False
    assert [(g["maximize"], g["foreach"], g["averaging"]) for g in old.param_groups] == [(False, None, False)]
    old.set_masks({params[0]: torch.ones(6, 5, dtype=torch.bool)})
    for p in params:
        p.grad = torch.ones_like(p)
    before = params[1].detach().clone()
    old.step()
    assert torch.equal(params[1], before - 0.5)  # minimizes


@pytest.mark.parametrize("foreach", [False, True])
def test_sntasgd_in_bfloat16_keeps_exact_lifetimes(foreach):
    """bf16 weights, float32 counters: 1/age in bf16 (1/3 is inexact) would make the counter drift."""
    params = two_params(torch.bfloat16)
    opt = SNTASGD(params, lr=0.25, weight_decay=0.5, foreach=foreach)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0] = False
    opt.set_masks({params[0]: mask})
    opt.start_averaging()
    history = []
    for _ in range(7):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        with torch.no_grad():
            params[0].mul_(mask)
        history.append(params[0].detach().float().clone())
    age = opt.state[params[0]]["age"]
    assert age.dtype == torch.float32 and torch.equal(age, mask.float() * 8)
    average = opt.averaged_parameters()[0]
    assert average.dtype == torch.bfloat16 and (average[~mask] == 0).all()
    torch.testing.assert_close(average.float(), torch.stack(history).mean(0), rtol=0, atol=2e-2)


@pytest.mark.parametrize("foreach", [False, True])
def test_sntasgd_averages_stay_zero_where_no_weight_exists_with_the_engine(foreach):
    """The engine does not re-zero SNTASGD's state after a step (keeps_inactive_state_zero), while the SGD update
    does move inactive weights until the post-hook re-zeroes them: the average must not follow them there."""
    params = two_params()
    opt = SNTASGD(params, lr=0.5, foreach=foreach)
    engine = SparseEngine({"w": params[0]}, {"w": torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) < 0.5})
    engine.attach(opt)
    opt.start_averaging()
    mask = engine.tensors["w"].mask
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert (params[0][~mask] == 0).all()
    assert (opt.state[params[0]]["ax"][~mask] == 0).all() and (opt.state[params[0]]["ax"][mask] != 0).all()


def test_sntasgd_skips_parameters_without_gradients_only():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    opt.start_averaging()
    before = [p.detach().clone() for p in params]
    params[1].grad = torch.ones(5)  # the first parameter has no gradient
    opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1] - 0.5)
    assert "ax" not in opt.state[params[0]] and opt.state[params[1]]["n"] == 1


def test_sntasgd_restart_before_start_and_with_foreign_state():
    params = two_params()
    sgd = torch.optim.SGD(params, lr=0.5)  # momentum 0: leaves {"momentum_buffer": None} per parameter
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    opt = SNTASGD(params, lr=0.5)
    opt.load_state_dict(sgd.state_dict())
    opt.restart_averaging()  # starts averaging too; no average exists yet
    assert opt.averaging
    params[0].grad = None
    opt.step()
    opt.restart_averaging()  # the first parameter has no average, the second one does
    assert opt.state[params[1]]["n"] == 0 and torch.equal(opt.state[params[1]]["ax"], params[1].detach())


def test_sntasgd_masks_attached_before_loading_a_dense_average():
    params = two_params()
    dense = SNTASGD(params, lr=0.5)
    dense.start_averaging()
    for p in params:
        p.grad = torch.ones_like(p)
    dense.step()
    saved = dense.state_dict()
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    opt = SNTASGD(params, lr=0.5)
    opt.set_masks({params[0]: mask})
    opt.load_state_dict(saved)
    state = opt.state[params[0]]
    assert "n" not in state and torch.equal(state["age"], mask.float() * 2)  # one averaged step so far
    assert (state["ax"][~mask] == 0).all()


def test_sntasgd_averaging_step_leaves_the_gradients_alone():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)  # no weight decay, not maximize: the step's gradient is p.grad itself
    opt.set_masks({params[0]: torch.ones(6, 5, dtype=torch.bool)})
    opt.start_averaging()
    for _ in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.25)
        opt.step()
        assert all((p.grad == 0.25).all() for p in params)


def test_functional_sntasgd_defaults_to_no_weight_decay_and_handles_several_dtypes():
    params = [torch.ones(3), torch.ones(2, dtype=torch.float64)]
    grads = [torch.full((3,), 0.5), torch.full((2,), 0.5, dtype=torch.float64)]
    sntasgd(params, grads, lr=1.0)
    assert torch.equal(params[0], torch.full((3,), 0.5))
    sntasgd(params, grads, lr=1.0, foreach=True)  # one bucket per dtype, each stepped
    assert torch.equal(params[0], torch.zeros(3)) and torch.equal(params[1], torch.zeros(2, dtype=torch.float64))


def test_sntasgd_averaged_and_raw_whether_swapped_or_not():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    opt.start_averaging()
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    average, raw = opt.state[params[0]]["ax"].clone(), params[0].detach().clone()
    assert all(torch.equal(a, b) for a, b in zip(opt.averaged_and_raw(params[0]), (average, raw)))
    with opt.swap_averaged():  # a checkpoint written while the averages are in the model
        assert all(torch.equal(a, b) for a, b in zip(opt.averaged_and_raw(params[0]), (average, raw)))
    assert opt.averaged_and_raw(nn.Parameter(torch.ones(2))) is None


# --------------------------------------------------------------------------------------------------------------
# every raise, with its type and message
# --------------------------------------------------------------------------------------------------------------


def test_sntasgd_argument_messages():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    with pytest.raises(ValueError, match=r"parameter group 1: weight_decay must be a finite number >= 0, got -1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": -1})
    with pytest.raises(
        ValueError, match=r"the mask of parameter 0 must be a bool tensor of shape \(6, 5\), got torch.bool"
    ):
        opt.set_masks({params[0]: torch.ones(5, 6, dtype=torch.bool)})
    with pytest.raises(
        ValueError, match=r"update.kept for parameter 0 must be a bool tensor of shape \(6, 5\), got torch"
    ):
        opt.on_mask_update(params[0], MaskUpdate(None, torch.ones(6, 5), torch.ones(6, 5, dtype=torch.bool)))
    g = [torch.ones(6, 5), torch.ones(5)]
    with pytest.raises(ValueError, match=r"got 2 params, axs=2, ages=None, ns=2"):
        sntasgd(params, g, [torch.zeros(6, 5), torch.zeros(5)], None, [1, 1], lr=0.1)
    with pytest.raises(ValueError, match=r"got 2 params, axs=2, ages=2, ns=None"):
        sntasgd(params, g, [torch.zeros(6, 5), torch.zeros(5)], [None, None], None, lr=0.1)
    with pytest.raises(ValueError, match=r"^SNTASGD.load_state_dict: expected an optimizer state dict"):
        opt.load_state_dict({"state": {}})
    other = SNTASGD([params[0]], lr=0.5)
    with pytest.raises(
        ValueError, match=r"0 has 1 parameters here and 2 in the state dict: it was saved from a different"
    ):
        other.load_state_dict(opt.state_dict())


def test_sntasgd_layout_messages():
    params = two_params()
    opt = SNTASGD(params, lr=0.5)
    opt.start_averaging()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"groups, this optimizer has 1: it was saved from a different "):
        SNTASGD(params, lr=0.5).load_state_dict({"state": {}, "param_groups": saved["param_groups"] * 2})
    swapped = [nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(6, 5))]
    with pytest.raises(ValueError, match=r"saved 'ax' has shape \(6, 5\): the state dict was saved from a different "):
        SNTASGD(swapped, lr=0.5).load_state_dict(saved)


def params_and_optimizer() -> tuple[list[nn.Parameter], SNTASGD]:
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))]
    return params, SNTASGD(params, lr=0.1)


def test_sntasgd_sparse_gradients():
    params, opt = params_and_optimizer()
    params[0].grad = torch.randn(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="SNTASGD does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("hyperparameter", ["lr", "weight_decay"])
@pytest.mark.parametrize(
    "value,error,match",
    [("0.1", TypeError, "must be a real number >= 0, got '0.1'"), (float("inf"), ValueError, "must be a finite")],
)
def test_sntasgd_hyperparameter_types(hyperparameter, value, error, match):
    kwargs = {"lr": 0.1, hyperparameter: value}
    with pytest.raises(error, match=f"SNTASGD: {hyperparameter} {match}"):
        SNTASGD([nn.Parameter(torch.ones(2))], **kwargs)


def test_sntasgd_flags_and_state_dict_types():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="SNTASGD: maximize must be True or False, got 'no'"):
        SNTASGD([param], lr=0.1, maximize="no")
    with pytest.raises(TypeError, match="SNTASGD: foreach must be True, False or None, got 1"):
        SNTASGD([param], lr=0.1, foreach=1)
    with pytest.raises(TypeError, match=r"expected an optimizer state dict \(a mapping\), got list"):
        SNTASGD([param], lr=0.1).load_state_dict([])


def test_sntasgd_load_state_dict_errors():
    params, opt = params_and_optimizer()
    opt.start_averaging()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"expected an optimizer state dict with keys 'state' and 'param_groups', got"):
        SNTASGD(params, lr=0.1).load_state_dict({"param_groups": saved["param_groups"]})
    unknown = copy.deepcopy(saved)
    unknown["state"][7] = unknown["state"].pop(0)
    with pytest.raises(ValueError, match="SNTASGD.load_state_dict: state for unknown parameter 7"):
        SNTASGD(params, lr=0.1).load_state_dict(unknown)
    both = copy.deepcopy(saved)
    both["state"][1]["age"] = torch.ones(4)
    with pytest.raises(
        ValueError, match=r"parameter 1 has an average but both of 'age' and 'n'; keys: \['age', 'ax', 'n'\]"
    ):
        SNTASGD(params, lr=0.1).load_state_dict(both)
    neither = copy.deepcopy(saved)
    del neither["state"][1]["n"]
    with pytest.raises(ValueError, match=r"parameter 1 has an average but neither of 'age' and 'n'; keys: \['ax'\]"):
        SNTASGD(params, lr=0.1).load_state_dict(neither)
    bad_age = copy.deepcopy(saved)
    bad_age["state"][1] = {"ax": torch.zeros(4), "age": torch.ones(5)}
    with pytest.raises(
        ValueError, match=r"parameter 1 \(group 0\) has shape \(4,\) but its saved 'age' has shape \(5,\)"
    ):
        SNTASGD(params, lr=0.1).load_state_dict(bad_age)


def test_sntasgd_mask_update_errors():
    params, opt = params_and_optimizer()
    good = torch.ones(3, 4, dtype=torch.bool)
    # not a tensor: TypeError; a tensor of the wrong dtype or shape: ValueError (the rule of docs/callback.md)
    with pytest.raises(
        TypeError, match=r"update.kept for parameter 0 must be a bool tensor of shape \(3, 4\), got list"
    ):
        opt.on_mask_update(params[0], MaskUpdate(None, [True], good))
    with pytest.raises(
        ValueError, match=r"update.new for parameter 0 must be a bool tensor of shape \(3, 4\), got torch.float32"
    ):
        opt.on_mask_update(params[0], MaskUpdate(None, good, good.float()))
    with pytest.raises(TypeError, match=r"SNTASGD.on_mask_update: update must be a MaskUpdate, got tuple"):
        opt.on_mask_update(params[0], (None, good, good))
    with pytest.raises(TypeError, match=r"the mask of parameter 1 must be a bool tensor of shape \(4,\), got str"):
        opt.set_masks({params[1]: "all"})
    with pytest.raises(TypeError, match=r"SNTASGD.set_masks: masks must be a mapping \{param: bool mask\}, got list"):
        opt.set_masks([(params[1], torch.ones(4, dtype=torch.bool))])
    with pytest.raises(ValueError, match=r"not a parameter of this optimizer \(it holds 2 parameters\)"):
        opt.on_mask_update(nn.Parameter(torch.ones(3, 4)), MaskUpdate(None, good, good))


def test_sntasgd_state_changes_while_swapped():
    params, opt = params_and_optimizer()
    with opt.swap_averaged():
        for call, name in (
            (opt.start_averaging, "start_averaging()"),
            (opt.restart_averaging, "restart_averaging()"),
            (lambda: opt.load_state_dict(opt.state_dict()), "load_state_dict()"),
            (
                lambda: opt.on_mask_update(params[0], MaskUpdate(None, params[0] != 0, params[0] != 0)),
                "on_mask_update()",
            ),
        ):
            with pytest.raises(RuntimeError, match=rf"SNTASGD.{name.replace('(', '[(]').replace(')', '[)]')} inside"):
                call()


def test_functional_sntasgd_length_checks():
    params = [torch.ones(2), torch.ones(3)]
    with pytest.raises(ValueError, match="sntasgd: 2 params but 1 grads"):
        sntasgd(params, [torch.ones(2)], lr=0.1)
    with pytest.raises(ValueError, match=r"axs, ages and ns must all be given .* got 2 params, axs=2, ages=1, ns=2"):
        sntasgd(params, [torch.ones(2), torch.ones(3)], [torch.zeros(2), torch.zeros(3)], [None], [1, 1], lr=0.1)
