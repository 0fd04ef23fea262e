"""Every error the library raises, triggered on purpose: the right exception type and a message that names the
argument, what was given and what is allowed.

The API's rule (docs/callback.md, "Errors"): ``TypeError`` when an argument is not of an accepted type (a str
where a number belongs, a bool where an int belongs), ``ValueError`` when its type is fine but its value is not
(out of range, unknown name, a tensor of the wrong shape or dtype, a checkpoint that does not fit), and
``RuntimeError`` for a call made in a state that does not allow it (masks before fitting, a step while the averages
are swapped in). The error tests of the other files pin the rest; together they reach every ``raise``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_selfish import NonMonotonicTrigger, SelfishSparsityCallback


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
