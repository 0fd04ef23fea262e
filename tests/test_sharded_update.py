"""Topology updates of parameters sharded by rows (FSDP2): the same masks, weights and optimizer state as one process
updating the whole tensors, on 2 and 4 gloo processes, for every preset that regrows and the per-gate variants
(tests/ddp_scripts/sharded_update_ranks.py runs the ranks; the one-process reference is the same function on plain
tensors, whose selections docs/methods.md and tests/test_method_references.py pin to each paper's rule).

Random growth draws by position (DrawStream), so it is the same on any number of ranks; the update exchanges only
counts: no whole tensor is gathered or broadcast, and no all-reduce is larger than the radix select's first
histogram (4096 counts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import free_port, run_script, script_module


@pytest.fixture(scope="module")
def one_process() -> dict:
    ranks = script_module("sharded_update_ranks")
    return {name: ranks.run_case(name, 1) for name in ranks.cases()}


def _run_ranks(out: Path, world_size: int) -> list[dict]:
    result = run_script("sharded_update_ranks.py", str(out), str(world_size), str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world_size)]


def _joined(parts: list[dict], case: str, update: int, field: str) -> dict:
    first = parts[0][case]["updates"][update][field]
    if field == "state":
        return {
            name: {key: torch.cat([p[case]["updates"][update][field][name][key] for p in parts]) for key in keys}
            for name, keys in first.items()
        }
    return {name: torch.cat([p[case]["updates"][update][field][name] for p in parts]) for name in first}


@pytest.mark.subprocess
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_updates_equal_the_one_process_updates(tmp_path: Path, world_size: int, one_process: dict) -> None:
    parts = _run_ranks(tmp_path, world_size)
    for case, reference in one_process.items():
        for update, expected in enumerate(reference["updates"]):
            where = f"{case}, update {update + 1}, {world_size} ranks"
            for name, mask in _joined(parts, case, update, "masks").items():
                assert torch.equal(mask, expected["masks"][name]), f"{where}: mask of {name}"
            for name, weight in _joined(parts, case, update, "weights").items():
                assert torch.equal(weight, expected["weights"][name]), f"{where}: weight of {name}"
            for name, state in _joined(parts, case, update, "state").items():
                for key, value in state.items():
                    assert torch.equal(value, expected["state"][name][key]), f"{where}: {key} of {name}"
            for part in parts:  # every rank reports the whole tensors' counts and takes the same draws
                got = part[case]["updates"][update]
                for field in ("removed", "grown", "active", "threshold", "next_draw"):
                    assert got[field] == expected[field], f"{where}: {field}"
                assert got["all_reduces"] > 0 and got["largest_all_reduce"] <= 4096, where
        assert parts[0][case]["report"] == pytest.approx(reference["report"]), case


def test_the_one_process_reference_keeps_exact_counts(one_process: dict) -> None:
    """The reference itself: every sparse-to-sparse update keeps each tensor's count, and grows what it removed."""
    for case, result in one_process.items():
        for update in result["updates"]:
            assert sum(update["removed"].values()) == sum(update["grown"].values()) > 0, case
            if case.startswith(("selfish", "rigl", "set")):  # no redistribution across tensors
                assert update["removed"] == update["grown"], case
            for name, mask in update["masks"].items():
                assert int(mask.count_nonzero()) == update["active"][name], case
