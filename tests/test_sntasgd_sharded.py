"""SNTASGD on FSDP2-sharded parameters (``DTensor``, ``Shard(0)``) with masks given as each rank's rows: 2 gloo
processes (``ddp_scripts/sntasgd_sharded.py``) against one process training the same model unsharded with the whole
masks; checkpoint round trips on the same ranks (the state dict, ``torch.distributed.checkpoint``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "ddp_scripts" / "sntasgd_sharded.py"


def one_process_run():
    """The script's scenario on one process: plain tensors, the whole masks."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import sntasgd_sharded as scenario
    finally:
        sys.path.pop(0)
    model = scenario.build()
    opt, result = scenario.train(model, lambda tensor: tensor)
    result["continued"] = scenario.continued(model, opt, result.pop("masks"))
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])  # the code under test, also from a second checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": root}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "2", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
