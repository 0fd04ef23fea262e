"""Export (lightning_selfish.export): dense with the masks applied, compressed with an exact round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TinyLM, make_trainer, token_loader
from torch import nn

from lightning_selfish import SNTASGD, SelfishSparsityCallback
from lightning_selfish.export import (
    COMPRESSED_FORMAT,
    compress_state_dict,
    compressed_sizes,
    decompress_state_dict,
    load_compressed,
    masked_state_dict,
    save_compressed,
    save_dense,
)


def random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=g) < density for name, p in model.named_parameters() if p.dim() == 2}


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(30, 8)
        self.rnn = nn.GRU(8, 8)
        self.decoder = nn.Linear(8, 30)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("steps", torch.tensor(7))


def test_masked_state_dict_multiplies_every_masked_tensor_and_copies_the_rest() -> None:
    model = Tied()
    masks = random_masks(model, 0.3)
    assert "decoder.weight" not in masks  # named_parameters() names the tied tensor once
    state = masked_state_dict(model, masks)
    assert list(state) == list(model.state_dict())
    for name, value in model.state_dict().items():
        owner = "encoder.weight" if name == "decoder.weight" else name
        expected = value * masks[owner] if owner in masks else value
        assert torch.equal(state[name], expected), name
    assert state["decoder.weight"] is state["encoder.weight"], "tied names keep sharing one tensor"
    assert torch.equal(state["steps"], torch.tensor(7))
    assert all(not t.requires_grad for t in state.values())
    assert model.encoder.weight.count_nonzero() == model.encoder.weight.numel(), "the model is left as it was"


def test_compressed_round_trip_is_exact_with_tied_weights_and_other_dtypes() -> None:
    model = Tied().double()
    masks = random_masks(model, 0.33, seed=3)
    state = masked_state_dict(model, masks)
    data = compress_state_dict(state, masks, {"note": "x"})
    assert set(data["sparse"]) == set(masks) and data["aliases"] == {"decoder.weight": "encoder.weight"}
    restored, restored_masks = decompress_state_dict(data)
    assert list(restored) == list(state)
    for name in state:
        assert torch.equal(restored[name], state[name]) and restored[name].dtype == state[name].dtype, name
    assert restored["decoder.weight"] is restored["encoder.weight"]
    assert {name: m.tolist() for name, m in restored_masks.items() if name != "decoder.weight"} == {
        name: m.tolist() for name, m in masks.items()
    }


def test_an_active_weight_that_is_zero_survives_the_round_trip_as_active() -> None:
    weight = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    mask = torch.tensor([[True, True], [False, True]])
    restored, masks = decompress_state_dict(compress_state_dict({"w": weight}, {"w": mask}))
    assert torch.equal(restored["w"], weight) and torch.equal(masks["w"], mask)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that -0.0 and +0.0 differ (``torch.equal`` says they are equal)."""
    return tensor.view(
        {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[tensor.dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_dense_export_writes_plus_zero_and_the_compressed_one_restores_it_bit_for_bit(dtype) -> None:
    model = Tied().to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(-param.abs() - 0.5)  # negative everywhere: weight * mask would leave -0.0
    masks = random_masks(model, 0.3)
    state = masked_state_dict(model, masks)
    for name, mask in masks.items():
        assert not torch.signbit(state[name][~mask]).any(), f"{name}: -0.0 at masked positions"
        assert (state[name][~mask] == 0).all() and torch.equal(
            bits(state[name][mask]), bits(model.state_dict()[name][mask])
        )
    restored, _ = decompress_state_dict(compress_state_dict(state, masks))
    for name in state:
        if state[name].is_floating_point():
            assert torch.equal(bits(restored[name]), bits(state[name])), name


def test_compressed_bytes_are_values_plus_one_bit_per_position_under_0_4x_at_density_0_33(tmp_path: Path) -> None:
    model = nn.LSTM(40, 50, num_layers=2)
    masks = {}
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            keep = torch.randperm(p.numel(), generator=g)[: round(0.33 * p.numel())]
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[keep] = True
            masks[name] = mask.view_as(p)
    data = compress_state_dict(masked_state_dict(model, masks), masks)
    sizes = compressed_sizes(data)
    numels = [m.numel() for m in masks.values()]
    actives = [int(m.sum()) for m in masks.values()]
    assert sizes["masked_tensors_dense_bytes"] == 4 * sum(numels)
    assert sizes["masked_tensors_compressed_bytes"] == sum(4 * a + math.ceil(n / 8) for a, n in zip(actives, numels))
    assert sizes["masked_tensors_compressed_bytes"] <= 0.4 * sizes["masked_tensors_dense_bytes"]
    dense_file = save_dense(model, masks, tmp_path / "dense.pt")
    compressed_file = save_compressed(model, masks, tmp_path / "compressed.pt")
    assert compressed_file.stat().st_size <= 0.4 * dense_file.stat().st_size


def test_files_load_into_the_models_own_class_and_read_back_with_weights_only(tmp_path: Path) -> None:
    model = Tied()
    masks = random_masks(model, 0.2)
    expected = masked_state_dict(model, masks)
    fresh = Tied()
    fresh.load_state_dict(torch.load(save_dense(model, masks, tmp_path / "a" / "dense.pt"), weights_only=True))
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name])
    loaded = load_compressed(save_compressed(model, masks, tmp_path / "c.pt", metadata={"epoch": 3}))
    assert loaded.metadata == {"epoch": 3}
    other = Tied()
    other.load_state_dict(loaded.state_dict)
    for name, value in other.state_dict().items():
        assert torch.equal(value, expected[name])


def test_export_after_a_real_run_from_the_callbacks_masks(tmp_path: Path) -> None:
    model = TinyLM()
    callback = SelfishSparsityCallback(sparsity=0.67, seed=0, verbose=False)
    make_trainer([callback], max_epochs=2).fit(model, token_loader(), token_loader(1, windows=2))
    masks = {name: mask.cpu() for name, mask in callback.masks.items()}
    fresh = TinyLM()
    fresh.load_state_dict(torch.load(save_dense(model, masks, tmp_path / "dense.pt"), weights_only=True))
    assert set(fresh.state_dict()) == set(model.state_dict()), "no trace of the callback"
    for name, param in fresh.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name].detach())
        if name in masks:
            assert not param[~masks[name]].any()
    compressed = load_compressed(save_compressed(model, masks, tmp_path / "compressed.pt"))
    for name, value in fresh.state_dict().items():
        assert torch.equal(bits(compressed.state_dict[name]), bits(value)), "the two files agree bit for bit"


def test_with_an_averaging_sntasgd_the_averaged_weights_are_exported() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    masks = {"weight": torch.rand(4, 6) < 0.5}
    optimizer = SNTASGD(model.parameters(), lr=0.1)
    optimizer.start_averaging()
    seen = []
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).pow(2).sum().backward()
        optimizer.step()
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
    raw = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = masked_state_dict(model, masks, optimizer=optimizer)
    mean = {name: sum(step[name] for step in seen) / len(seen) for name in raw}
    torch.testing.assert_close(state["weight"], mean["weight"] * masks["weight"])
    torch.testing.assert_close(state["bias"], mean["bias"])
    assert all(torch.equal(p, raw[name]) for name, p in model.named_parameters()), "the raw weights are back"
    assert not optimizer.swapped
    with pytest.raises(TypeError, match="optimizer must be a lightning_selfish.SNTASGD .* got SGD"):
        masked_state_dict(model, masks, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))


def test_bad_masks_and_bad_files_are_refused_by_name() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="mask 'weights' names no tensor of the model"):
        masked_state_dict(model, {"weights": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="mask 'weight' must be a bool tensor, got torch.int64"):
        masked_state_dict(model, {"weight": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"mask 'weight' has shape \(3, 2\), the tensor has \(2, 3\)"):
        masked_state_dict(model, {"weight": torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks must be a dict"):
        masked_state_dict(model, [torch.ones(2, 3, dtype=torch.bool)])
    with pytest.raises(ValueError, match=f"not a {COMPRESSED_FORMAT} file"):
        decompress_state_dict({"state_dict": {}})
    data = compress_state_dict(model.state_dict(), {"weight": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        decompress_state_dict({**data, "version": 99})
    data["sparse"]["weight"]["values"] = data["sparse"]["weight"]["values"][:-1]
    with pytest.raises(ValueError, match="corrupt .* entry 'weight': 5 values, 6 positions"):
        decompress_state_dict(data)
