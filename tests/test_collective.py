"""The run's collective seam (run/collective.py) against plain references: one process, and a real gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selfish.run.collective import Collective, ProcessGroup, SingleProcess, collective_for


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40), data=st.data())
def test_kth_value_is_the_kth_smallest(values: list[float], data: st.DataObject) -> None:
    k = data.draw(st.integers(1, len(values)))
    tensor = torch.tensor(values, dtype=torch.float64).reshape(-1, 1)
    assert float(SingleProcess().kth_value(tensor, k)) == sorted(values)[k - 1]


def test_one_process_changes_nothing() -> None:
    one = SingleProcess()
    tensor = torch.tensor([1.0, 2.0])
    one.broadcast_(tensor)
    one.all_reduce_(tensor)
    assert tensor.tolist() == [1.0, 2.0] and one.world_size == 1 and isinstance(one, Collective)


def test_without_a_process_group_a_run_is_one_process() -> None:
    assert not dist.is_initialized()
    assert isinstance(collective_for(2), SingleProcess)


def test_a_process_group_runs_the_collectives(one_process_group) -> None:
    """Gloo with one rank: every operation goes through torch.distributed (a 2-rank run sums and merges shards)."""
    assert isinstance(collective_for(1), SingleProcess)  # (one process: no collective even with a group)
    group = collective_for(2)  # (the trainer says 2; the group is what is used)
    assert isinstance(group, ProcessGroup) and group.world_size == 1
    code = torch.tensor([3, 0, 2], dtype=torch.uint8)
    group.broadcast_(code)  # rank 0 (this process) keeps its own code, in place
    assert code.tolist() == [3, 0, 2]
    counts = torch.tensor([4, 5])
    group.all_reduce_(counts)
    assert counts.tolist() == [4, 5]
    values = torch.tensor([[5.0, -1.0], [2.0, 7.0]])
    assert [float(group.kth_value(values, k)) for k in (1, 2, 4)] == [-1.0, 2.0, 7.0]
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\] \(the number of values\), got 5"):
        group.kth_value(values, 5)
