"""What users write that cannot do what it says: each is refused before any step with one line that names the
argument, what was given and what is allowed, or, where the run is valid but not what the user may expect, said in
one line (issue 25: a sparsity of 0, a run without a topology update, a time limit, tied weights, gate layouts).

Each test builds what a user would with the public API and a real ``Trainer`` (docs/callback.md, "On your own
training code").
"""

from __future__ import annotations

import pytest
from conftest import TinyLM, make_trainer, token_loader

from lightning_selfish import METHODS, SelfishSparsityCallback


def fit(callback: SelfishSparsityCallback, model=None, max_epochs: int = 2, **kwargs):
    model = model or TinyLM()
    trainer = make_trainer([callback], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader(), token_loader(1, 2))
    return model, trainer


# --------------------------------------------------------------------------------------------------------------
# sparsity 0
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_a_sparsity_of_zero_is_refused_at_construction_for_every_preset(method: str) -> None:
    """It trained ~38% of every matrix at zero after the first update (each update removes and regrows at zero)."""
    with pytest.raises(ValueError) as error:
        SelfishSparsityCallback(sparsity=0.0, method=method)
    message = str(error.value)
    assert message.startswith("sparsity must be in (0, 1), got 0.0: ")
    assert "leave SelfishSparsityCallback out of the trainer's callbacks" in message
    with pytest.raises(ValueError, match=r"^sparsity must be in \(0, 1\), got 0: "):
        SelfishSparsityCallback(sparsity=0, method=method)  # (an int too)
