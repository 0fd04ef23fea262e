"""SNTASGD on FSDP2-sharded parameters (``DTensor``, ``Shard(0)``) with masks given as each rank's rows: 2 gloo
processes (``ddp_scripts/sntasgd_sharded.py``) against one process training the same model unsharded with the whole
masks; checkpoint round trips on the same ranks (the state dict, ``torch.distributed.checkpoint``)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import free_port, run_script, script_module


def scenario():
    """The script as a module: its model, masks, batches and training run."""
    return script_module("sntasgd_sharded")


def one_process_run():
    """The script's scenario on one process: plain tensors, the whole masks."""
    model = scenario().build()
    opt, result = scenario().train(model, lambda tensor: tensor)
    result["continued"] = scenario().continued(model, opt, result.pop("masks"))
    return result


def assert_equal(got, expected, what: str) -> None:
    """Bit for bit: every rank computes from the same batches, so the gradients FSDP2 averages are exactly g."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), what
        for key in expected:
            assert_equal(got[key], expected[key], f"{what}[{key}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), what
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_equal(a, b, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert got.shape == expected.shape and torch.equal(got, expected), (what, got, expected)
    else:
        assert got == expected, (what, got, expected)


@pytest.mark.subprocess
def test_two_ranks_holding_shards_step_and_average_as_one_process(tmp_path) -> None:
    result = run_script("sntasgd_sharded.py", str(tmp_path), "2", str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    expected = one_process_run()

    # the shards are FSDP2's: torch.chunk's rows, uneven (5 rows: 3 + 2) and empty (1 row: 1 + 0)
    assert [r["local_rows"]["mid.weight"] for r in ranks] == [3, 2]
    assert [r["local_rows"]["out.weight"] for r in ranks] == [1, 0]
    assert [r["local_rows"]["rnn.weight_hh_l0"] for r in ranks] == [6, 6]
    for rank in ranks:
        for what in ("params", "averages", "ages", "counts", "averaged_and_raw", "swapped", "swapped_averages"):
            assert_equal(rank[what], expected[what], what)
        assert_equal(rank["after_swap"], rank["params"], "raw weights restored after swap_averaged")
        assert_equal(rank["swapped"], rank["averages"], "the averages swapped in")
        # masked weights have per-element counters, the rest a count; both in their windows after the update
        assert sorted(rank["ages"]) == ["mid.weight", "out.weight", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
        assert set(rank["counts"].values()) == {5}
        assert rank["state_kinds"]["mid.weight"] == {"ax": "DTensor", "age": "DTensor"}
        assert rank["state_kinds"]["mid.bias"] == {"ax": "DTensor", "n": "int"}
        # a mask of the whole tensor instead of this rank's rows is refused, naming the shape expected here
        assert "must be a bool tensor of shape (6, 4)" in rank["whole_mask_error"], rank["whole_mask_error"]
        assert "this rank's rows of the DTensor parameter of shape (12, 4)" in rank["whole_mask_error"]
        assert "got torch.bool (12, 4)" in rank["whole_mask_error"]
        # checkpoints restore exactly: the state as saved, and the steps that follow as without the round trip
        assert rank["state_dict_restores"] and rank["dcp_restores"]
        assert_equal(rank["state_dict_continued"], rank["continued"], "resumed from state_dict()")
        assert_equal(rank["dcp_continued"], rank["continued"], "resumed from torch.distributed.checkpoint")
        assert_equal(rank["continued"], expected["continued"], "the steps after the checkpoint")
        # nothing the optimizer did crossed ranks (and the spy does see a gather)
        assert rank["optimizer_collectives"] == []
        assert any("all_gather" in call for call in rank["spy_sees_a_gather"]), rank["spy_sees_a_gather"]
        assert "parameter 0 (group 0) is a DTensor placed (Shard(dim=0),)" in rank["whole_state_error"]
        assert "its saved 'ax' is a plain tensor: read a state" in rank["whole_state_error"]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(ranks[0]["dcp_files"])  # each rank wrote its shards


def test_one_rank_of_fsdp2_trains_as_plain_tensors_and_refuses_what_does_not_fit(one_process_group) -> None:
    """FSDP2 on a process group of one (every shard is the whole tensor): the scenario's result bit for bit, and the
    refusals of masks and states that do not fit this rank's shards, each with its message."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lightning_selfish.core.types import MaskUpdate

    model = scenario().build()
    for module in (model.rnn, model.mid, model.out, model):
        fully_shard(module, mesh=init_device_mesh("cpu", (1,)))
    assert isinstance(model.mid.weight, DTensor)
    sharded_opt, got = scenario().train(model, lambda tensor: tensor)
    plain_model = scenario().build()
    plain_opt, expected = scenario().train(plain_model, lambda tensor: tensor)
    got.pop("masks"), expected.pop("masks")
    assert_equal(got, expected, "one rank")
    assert isinstance(sharded_opt.state[model.mid.weight]["age"], DTensor)

    weight = model.mid.weight
    placed = re.escape("(5, 3) (this rank's rows of the DTensor parameter of shape (5, 3), placed (Shard(dim=0),))")
    with pytest.raises(
        ValueError, match=rf"parameter 2 must be a bool tensor of shape {placed}, got torch.bool \(4, 3\)$"
    ):
        sharded_opt.set_masks({weight: torch.ones(4, 3, dtype=torch.bool)})
    mask_as_dtensor = DTensor.from_local(torch.ones(5, 3, dtype=torch.bool), weight.device_mesh, weight.placements)
    with pytest.raises(ValueError, match=r"got torch.bool \(5, 3\) DTensor$"):
        sharded_opt.set_masks({weight: mask_as_dtensor})
    with pytest.raises(TypeError, match=rf"update.kept for parameter 2 must be a bool tensor of shape {placed}"):
        sharded_opt.on_mask_update(weight, MaskUpdate(None, None, None))

    # a state saved from plain tensors does not load into sharded parameters, nor the other way round
    with pytest.raises(
        ValueError,
        match=r"parameter 0 \(group 0\) is a DTensor placed \(Shard\(dim=0\),\) on "
        r"DeviceMesh.* with local shape \(12, 4\) but its saved 'ax' is a plain tensor: read a state",
    ):
        sharded_opt.load_state_dict(plain_opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter 0 \(group 0\) is a plain tensor but its saved 'ax' is a DTensor"):
        plain_opt.load_state_dict(sharded_opt.state_dict())
