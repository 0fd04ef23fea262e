"""The optimizer state of grown weights (``grown_optimizer_state``, ``lightning_selfish/core/optim_state.py``): what
each rule leaves in Adam's moments, checked against the rule written out here, and that SGD's momentum is untouched
by the choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_selfish.core.engine import SparseEngine, UpdateContext
from lightning_selfish.method.catalogue import resolve
from lightning_selfish.method.parts import UpdateAmount


def trained(rule: str, optimizer_name: str = "adam", seed: int = 0):
    """An engine over two tensors after three optimizer steps, ready for an update."""
    torch.manual_seed(seed)
    params = {"a": nn.Parameter(torch.randn(8, 6)), "b": nn.Parameter(torch.randn(5, 6))}
    config = resolve("selfish", 0.5, grown_optimizer_state=rule)
    engine = SparseEngine.initialize(params, 0.5, torch.Generator().manual_seed(seed))
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(params.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-9)
    else:
        optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    engine.attach(optimizer, grown_state=config.grown_optimizer_state)
    for _ in range(3):
        for p in params.values():
            p.grad = torch.randn_like(p)  # dense gradients, as with mask_gradients=False
        optimizer.step()
    return engine, optimizer, params, config


def update(engine, optimizer, config):
    old = {n: m.clone() for n, m in engine.masks.items()}
    engine.update(UpdateAmount(0.5), config, UpdateContext(torch.Generator().manual_seed(1), [optimizer]))
    return old


def test_zero_leaves_no_state_at_inactive_or_grown_positions() -> None:
    engine, optimizer, params, config = trained("zero")
    for name, p in params.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[p][key][~engine.masks[name]].any(), (name, key)
    old = update(engine, optimizer, config)
    for name, p in params.items():
        grown = engine.masks[name] & ~old[name]
        assert grown.any()
        for key in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[p][key][grown | ~engine.masks[name]].any(), (name, key)


def test_dense_keeps_adams_moments_where_weights_are_inactive_and_hands_them_to_grown_weights() -> None:
    engine, optimizer, params, config = trained("dense")
    before = {n: {k: optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in params.items()}
    for name, p in params.items():
        assert optimizer.state[p]["exp_avg_sq"][~engine.masks[name]].all()  # accumulated while inactive
        assert not p.detach()[~engine.masks[name]].any()  # (the weights themselves are masked)
    update(engine, optimizer, config)
    for name, p in params.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], before[name][key]), (name, key)


def test_tensor_mean_starts_a_grown_weights_second_moment_at_its_tensors_mean() -> None:
    engine, optimizer, params, config = trained("tensor_mean")
    before = {n: optimizer.state[p]["exp_avg_sq"].clone() for n, p in params.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}
    old = update(engine, optimizer, config)
    for name, p in params.items():
        # the weights that survived the removal: all active ones but the ceil(0.5 * active) of smallest |w|
        active = old[name].flatten().nonzero().squeeze(1).tolist()
        smallest = sorted(active, key=lambda i: (abs(float(weights[name].flatten()[i])), i))[: -(-len(active) // 2)]
        survived = old[name].clone().flatten()
        survived[smallest] = False
        survived = survived.view_as(old[name])
        grown = engine.masks[name] & ~survived  # (removed and regrown in place restarts too)
        expected = before[name][survived].mean()
        assert torch.allclose(optimizer.state[p]["exp_avg_sq"][grown], expected.expand(int(grown.sum())))
        assert torch.equal(optimizer.state[p]["exp_avg_sq"][survived], before[name][survived])
        assert not optimizer.state[p]["exp_avg"][grown].any()  # the first moment starts at zero
        assert not optimizer.state[p]["exp_avg_sq"][~engine.masks[name]].any()


@pytest.mark.parametrize("rule", ["dense", "tensor_mean"])
def test_the_rules_touch_only_adams_moments(rule: str) -> None:
    """Under SGD with momentum every rule is the same run (the authors mask SGD's momentum)."""
    reference, opt_ref, params_ref, config_ref = trained("zero", "momentum")
    other, opt_other, params_other, config_other = trained(rule, "momentum")
    update(reference, opt_ref, config_ref)
    update(other, opt_other, config_other)
    for name in params_ref:
        assert torch.equal(reference.masks[name], other.masks[name])
        state_ref = opt_ref.state[params_ref[name]]["momentum_buffer"]
        assert torch.equal(state_ref, opt_other.state[params_other[name]]["momentum_buffer"])
