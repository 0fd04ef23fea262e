"""Every error the library raises, triggered on purpose: the right exception type and a message that names the
argument, what was given and what is allowed.

The API's rule (docs/callback.md, "Errors"): ``TypeError`` when an argument is not of an accepted type (a str
where a number belongs, a bool where an int belongs), ``ValueError`` when its type is fine but its value is not
(out of range, unknown name, a tensor of the wrong shape or dtype, a checkpoint that does not fit), and
``RuntimeError`` for a call made in a state that does not allow it (masks before fitting, a step while the averages
are swapped in). The error tests of the other files pin the rest; together they reach every ``raise``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_selfish import (
    SNTASGD,
    MaskUpdate,
    NonMonotonicTrigger,
    SelfishSparsityCallback,
    SparseEngine,
    sntasgd,
    topology,
)
from lightning_selfish.gates import normalize_layout

# --------------------------------------------------------------------------------------------------------------
# SelfishSparsityCallback(...)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(min_prune_rate=1.5), ValueError, r"min_prune_rate must be in \[0, 1\], got 1.5"),
        (dict(min_prune_rate="0.1"), TypeError, r"min_prune_rate must be a number in \[0, 1\], got str '0.1'"),
        (dict(prune_rate=True), TypeError, r"prune_rate must be a number in \[0, 1\], got bool True"),
        (dict(sparsity=0.0, prune_rate=-0.1), ValueError, r"prune_rate must be in \[0, 1\], got -0.1"),
        (
            dict(removal="mag"),
            ValueError,
            r"removal must be one of \[.*'magnitude', 'set'.*\] or a Removal object, got 'mag'",
        ),
        (dict(update_every=True), TypeError, r"update_every must be 'epoch' or a positive number of steps, got True"),
        (dict(update_every=2.5), TypeError, r"update_every must be 'epoch' or a positive number of steps, got 2.5"),
        (dict(update_every=-3), ValueError, r"update_every must be 'epoch' or a positive number of steps, got -3"),
        (
            dict(update_every="step"),
            ValueError,
            r"update_every must be 'epoch' or a positive number of steps, got 'step'",
        ),
        (
            dict(total_steps=0),
            ValueError,
            r"total_steps must be a positive int, a function of the trainer or None, got 0",
        ),
        (
            dict(total_steps=True),
            TypeError,
            r"total_steps must be a positive int, a function of the trainer or None, got True",
        ),
        (
            dict(total_steps=10.0),
            TypeError,
            r"total_steps must be a positive int, a function of the trainer or None, got 10.0",
        ),
        (dict(seed="1"), TypeError, "seed must be an int or None, got str"),
        (dict(seed=True), TypeError, "seed must be an int or None, got bool"),
        (dict(exclude="*prior*"), TypeError, r"exclude must be a list of name patterns \(str\), got '\*prior\*'"),
        (
            dict(include=["rnn.*", 3]),
            TypeError,
            r"include must be a list of name patterns \(str\), got \['rnn.\*', 3\]",
        ),
        (dict(gate_layouts=[("i", (0, 4))]), TypeError, "gate_layouts must be a mapping of parameter name to layout"),
    ],
)
def test_callback_arguments(kwargs, error, match):
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        SelfishSparsityCallback(**kwargs)


def test_masks_before_fitting():
    with pytest.raises(RuntimeError, match=r"masks exist once fitting has started \(SelfishSparsityCallback"):
        _ = SelfishSparsityCallback(sparsity=0.5).masks


def test_include_and_exclude_that_leave_nothing():
    cb = SelfishSparsityCallback(sparsity=0.5, include=["rnn.*"], exclude=["rnn.*"])
    with pytest.raises(
        ValueError, match=r"no parameter left to sparsify \(include=\['rnn.\*'\], exclude=\['rnn.\*'\]\)"
    ):
        make_trainer([cb], max_epochs=1).fit(TinyLM(), token_loader())


def test_load_state_dict_of_something_else():
    with pytest.raises(ValueError, match=r"expected keys 'masks' and 'generator', got \['history'\]"):
        SelfishSparsityCallback(sparsity=0.5).load_state_dict({"history": []})


def test_checkpoint_mask_of_another_shape(tmp_path: Path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = make_trainer(
        [SelfishSparsityCallback(sparsity=0.5, seed=0), ckpt], max_epochs=1, enable_checkpointing=True
    )
    trainer.fit(TinyLM(), token_loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["SelfishSparsityCallback"]
    state["masks"]["decoder.weight"] = state["masks"]["decoder.weight"].t().contiguous()
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(
        ValueError, match=r"mask for 'decoder.weight' has shape \(16, 40\), the parameter has \(40, 16\)"
    ):
        make_trainer([SelfishSparsityCallback(sparsity=0.5)], max_epochs=2).fit(
            TinyLM(), token_loader(), ckpt_path=tmp_path / "bad.ckpt"
        )


# --------------------------------------------------------------------------------------------------------------
# SparseEngine and the pure functions
# --------------------------------------------------------------------------------------------------------------


def test_engine_mask_of_another_shape():
    param = nn.Parameter(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"mask for 'w' has shape \(3, 4\) but the parameter has \(4, 3\)"):
        SparseEngine({"w": param}, {"w": torch.ones(3, 4, dtype=torch.bool)})


def test_unknown_init_removal_and_growth():
    param = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"init must be one of \[.*'uniform', 'er'.*\], got 'xavier'"):
        SparseEngine.initialize({"w": param}, 0.5, torch.Generator(), init="xavier")
    # (removal and growth names are checked once, by methods.resolve: the engine is handed part objects)
    with pytest.raises(ValueError, match=r"growth must be one of \['random', 'gradient', 'momentum'.*\] or a Grow"):
        SelfishSparsityCallback(sparsity=0.5, growth="rigl")


def test_random_mask_count_out_of_range():
    for count in (-1, 13):
        with pytest.raises(
            ValueError, match=rf"count must be in \[0, 12\] for a tensor of shape \(3, 4\), got {count}"
        ):
            topology.random_mask((3, 4), count, torch.Generator())


def test_random_growth_beyond_the_inactive_count():
    mask = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="cannot grow 3 weights: only 2 positions are inactive"):
        topology.random_growth(mask, 3, torch.Generator())


# --------------------------------------------------------------------------------------------------------------
# gate layouts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,error,match",
    [
        (
            [],
            ValueError,
            r"gate_layouts\['w'\] must be a non-empty list of gate names or \(gate, rows\) pairs, got \[\]",
        ),
        (5, TypeError, r"gate_layouts\['w'\] must be a non-empty list of gate names or \(gate, rows\) pairs, got 5"),
        (
            [("a", 0, 5)],
            TypeError,
            r"gate_layouts\['w'\] entries must be \(gate, slice\) or \(gate, \(start, stop\)\), got",
        ),
        ([("a", slice(0, 10, 2))], ValueError, r"gate_layouts\['w'\] gate 'a': row slices must have step 1"),
        (
            [("a", (0, 5)), ("b", 7)],
            TypeError,
            r"gate_layouts\['w'\] gate 'b': rows must be a slice or \(start, stop\), got 7",
        ),
        (
            [("a", (0, 5)), ("b", (5, 12))],
            ValueError,
            r"does not tile the tensor's 10 rows: the gates cover rows \[0, 12\)",
        ),
        (
            [("a", (0, 5)), ("b", (5, 5)), ("c", (5, 10))],
            ValueError,
            r"gate 'b' covers rows \[5, 5\) but the next gate must",
        ),
    ],
)
def test_bad_gate_layouts(spec, error, match):
    with pytest.raises(error, match=match):
        normalize_layout(spec, 10, "w")


# --------------------------------------------------------------------------------------------------------------
# NonMonotonicTrigger(...)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(monitor=3), TypeError, r"monitor must be a metric name \(non-empty str\), got 3"),
        (dict(monitor=""), ValueError, r"monitor must be a metric name \(non-empty str\), got ''"),
        (dict(nonmono=2.5), TypeError, "nonmono must be an int >= 1, got 2.5"),
        (dict(nonmono=True), TypeError, "nonmono must be an int >= 1, got True"),
        (dict(nonmono=0), ValueError, "nonmono must be an int >= 1, got 0"),
        (dict(restart_at_epochs="500"), TypeError, r"restart_at_epochs must be a list of epoch numbers >= 1"),
        (dict(restart_at_epochs=500), TypeError, r"restart_at_epochs must be a list of epoch numbers >= 1.*got 500"),
        (dict(restart_at_epochs=[500, 0]), ValueError, r"restart_at_epochs must be a list of epoch numbers >= 1"),
        (dict(restart_at_epochs=[1.5]), TypeError, r"restart_at_epochs must be .*got \[1.5\]"),
        (dict(restart_at_epochs=[500, True]), TypeError, r"restart_at_epochs must be .*got \[500, True\]"),
    ],
)
def test_trigger_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NonMonotonicTrigger(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# SNTASGD
# --------------------------------------------------------------------------------------------------------------


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
