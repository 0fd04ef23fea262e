"""Exact selections over row shards (run/collective.py: lowest_positions, kth_lowest, random_positions; the keys of
method/keys.py) against one process selecting over the whole tensor: the rule written out naively (sort by score,
then position), method.topology.lowest_positions, and ranks simulated by threads (every split of the rows as FSDP2
makes it) and by real processes holding DTensor shards (gloo)."""

from __future__ import annotations

import math
import threading
from unittest.mock import patch

import pytest
import torch
from conftest import free_port, run_script, script_module
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_selfish.method import shards, topology
from lightning_selfish.method.keys import key_value, magnitude_keys, order_keys, position_keys
from lightning_selfish.run.collective import Collective, kth_lowest, lowest_positions, random_positions


def naive_lowest(score: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """The rule from its words: order the candidates by (score, flat position), NaN above every number; take n."""
    flat, allowed = score.reshape(-1).tolist(), candidates.reshape(-1).tolist()
    order = sorted(
        (i for i in range(len(flat)) if allowed[i]),
        key=lambda i: (math.isnan(flat[i]), 0.0 if math.isnan(flat[i]) else flat[i], i),
    )
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[order[:n]] = True
    return chosen.view_as(candidates)


class ThreadGroup:
    """Ranks as threads: each collective waits for every rank, then combines their tensors."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list = [None] * world_size

    def member(self, rank: int) -> ThreadRank:
        return ThreadRank(self, rank)


class ThreadRank:
    """One rank of a :class:`ThreadGroup`: the run's Collective protocol."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        everyone = list(self.group.slots)
        self.group.barrier.wait()
        return everyone

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        tensor.copy_(torch.stack(self._exchange(tensor)).sum(0))

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        tensor.copy_(self._exchange(tensor)[src])

    def kth_value(self, values: torch.Tensor, k: int) -> torch.Tensor:
        return kth_lowest(values, k, self)


def on_row_shards(world_size: int, function, *tensors: torch.Tensor) -> torch.Tensor:
    """Run ``function(*local_tensors, start, collectives)`` on every rank of a dim-0 split as FSDP2 makes it
    (``torch.chunk``: the last ranks may hold fewer rows, or none) and concatenate the ranks' results."""
    rows = tensors[0].shape[0]
    chunk = -(-rows // world_size)
    row_numel = tensors[0][0].numel() if rows else 0
    group = ThreadGroup(world_size)
    results: list = [None] * world_size
    errors: list = []

    def run(rank: int) -> None:
        low, high = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        try:
            local = [t[low:high] for t in tensors]
            results[rank] = function(*local, low * row_numel, group.member(rank))
        except Exception as error:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return torch.cat(results)


scores_with_ties = st.tuples(
    st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**31 - 1), st.sampled_from([2, 5, 1000]), st.floats(0, 1)
)


@settings(max_examples=150, deadline=None)
@given(case=scores_with_ties, world_size=st.integers(1, 5), n_fraction=st.floats(0, 1))
def test_lowest_positions_on_any_split_is_the_rule(case, world_size, n_fraction) -> None:
    rows, cols, seed, levels, density = case
    generator = torch.Generator().manual_seed(seed)
    score = torch.randint(levels, (rows, cols), generator=generator).float() - levels / 2  # many ties
    candidates = torch.rand(rows, cols, generator=generator) < density
    n = int(n_fraction * int(candidates.count_nonzero()))
    expected = naive_lowest(score, candidates, n)
    assert torch.equal(lowest_positions(score, candidates, n), expected)
    assert torch.equal(topology.lowest_positions(score, candidates, n), expected)  # the one-process rule
    split = on_row_shards(
        world_size, lambda s, c, start, coll: lowest_positions(s, c, n, start, coll), score, candidates
    )
    assert torch.equal(split, expected)


@settings(max_examples=60, deadline=None)
@given(case=scores_with_ties, world_size=st.integers(1, 4), n_fraction=st.floats(0, 1), chunk=st.integers(1, 40))
def test_passes_over_a_shard_in_chunks_select_by_the_rule(case, world_size, n_fraction, chunk) -> None:
    """The passes over a whole shard run a chunk at a time (``shards._CHUNK`` elements, 2**18 in use): with chunks
    of a few elements, boundaries fall inside every shard, and the selection and the k-th value are the rule's."""
    rows, cols, seed, levels, density = case
    generator = torch.Generator().manual_seed(seed)
    score = torch.randint(levels, (rows, cols), generator=generator).float() - levels / 2
    candidates = torch.rand(rows, cols, generator=generator) < density
    n = int(n_fraction * int(candidates.count_nonzero()))
    with patch.object(shards, "_CHUNK", chunk):
        split = on_row_shards(
            world_size, lambda s, c, start, coll: lowest_positions(s, c, n, start, coll), score, candidates
        )
        k = max(1, int(n_fraction * score.numel()))
        kth = on_row_shards(world_size, lambda s, start, coll: kth_lowest(s, k, coll).reshape(1), score)
    assert torch.equal(split, naive_lowest(score, candidates, n))
    assert bool((kth == score.view(-1).sort().values[k - 1]).all())


def test_scores_of_every_kind_keep_their_order() -> None:
    values = [-math.inf, -1e30, -1.5, -1e-40, -0.0, 0.0, 1e-45, 2.0, 3e38, math.inf, math.nan]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        score = torch.tensor(values, dtype=torch.float64).to(dtype)
        keys = order_keys(score)
        as_float = score.double()
        for i in range(len(values)):
            for j in range(len(values)):
                a, b = as_float[i].item(), as_float[j].item()
                if math.isnan(a) or math.isnan(b):
                    continue
                assert (keys[i] < keys[j]) == (a < b), (dtype, a, b)
                assert (keys[i] == keys[j]) == (a == b), (dtype, a, b)
        assert bool((keys[-1] > keys[:-1]).all()), dtype  # NaN above every number


def test_nan_scores_count_as_highest_and_ties_go_to_low_positions() -> None:
    score = torch.tensor([[math.nan, 1.0, 1.0], [0.5, math.nan, 1.0]])
    candidates = torch.ones(2, 3, dtype=torch.bool)
    chosen = on_row_shards(2, lambda s, c, start, coll: lowest_positions(s, c, 3, start, coll), score, candidates)
    assert chosen.tolist() == [[False, True, True], [True, False, False]]
    chosen = on_row_shards(2, lambda s, c, start, coll: lowest_positions(s, c, 5, start, coll), score, candidates)
    assert chosen.tolist() == [[True, True, True], [True, False, True]]


def test_large_tensors_with_exact_ties_and_int64_scores() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(600, 257, generator=generator)
    weight[::7] = 0.25  # a band of exact ties around the n-th value
    candidates = torch.rand(600, 257, generator=generator) < 0.4
    score = weight.abs()
    n = int(candidates.count_nonzero()) // 2
    expected = topology.lowest_positions(score, candidates, n)
    for world_size in (1, 2, 3, 4):
        split = on_row_shards(world_size, lambda s, c, st_, co: lowest_positions(s, c, n, st_, co), score, candidates)
        assert torch.equal(split, expected), world_size
    integers = torch.randint(-(2**62), 2**62, (600, 257), generator=generator)
    order = sorted(range(integers.numel()), key=lambda i: (int(integers.view(-1)[i]), i))
    allowed = [i for i in order if candidates.view(-1)[i]]
    expected = torch.zeros(integers.numel(), dtype=torch.bool)
    expected[allowed[:n]] = True
    split = on_row_shards(3, lambda s, c, st_, co: lowest_positions(s, c, n, st_, co), integers, candidates)
    assert torch.equal(split.view(-1), expected)


def test_counts_outside_the_candidates_are_refused_on_every_rank() -> None:
    with pytest.raises(ValueError, match="cannot choose 5 positions among 4 candidates"):
        on_row_shards(
            2,
            lambda s, c, start, coll: lowest_positions(s, c, 5, start, coll),
            torch.zeros(4, 2),
            torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0]], dtype=torch.bool),
        )


def test_position_keys_are_the_whole_tensors_keys_and_all_distinct() -> None:
    whole = position_keys(seed=11, draw=4, start=0, shape=(50, 40))
    assert whole.unique().numel() == whole.numel()
    assert torch.equal(position_keys(11, 4, 13 * 40, (7, 40)), whole[13:20])
    assert not torch.equal(position_keys(11, 5, 0, (50, 40)), whole)  # another draw
    assert not torch.equal(position_keys(12, 4, 0, (50, 40)), whole)  # another seed


def test_random_positions_are_uniform_and_the_same_on_any_split() -> None:
    rows, cols, n = 6, 5, 7
    candidates = torch.ones(rows, cols, dtype=torch.bool)
    candidates[0, :3] = False  # 27 candidates
    draws = 3000
    hits = torch.zeros(rows, cols)
    subset_sizes = set()
    for draw in range(draws):
        chosen = random_positions(candidates, n, seed=5, draw=draw)
        subset_sizes.add(int(chosen.count_nonzero()))
        assert not bool((chosen & ~candidates).any())
        hits += chosen
    assert subset_sizes == {n}
    expected = draws * n / 27
    observed = hits[candidates]
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 60.0  # 26 degrees of freedom: p < 1e-4 beyond 60
    for world_size in (2, 3, 4):
        split = on_row_shards(world_size, lambda c, start, coll: random_positions(c, n, 5, 17, start, coll), candidates)
        assert torch.equal(split, random_positions(candidates, n, 5, 17))


def test_kth_lowest_over_shards_is_the_kth_smallest_of_all_values() -> None:
    generator = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        values = (torch.randn(23, 5, generator=generator) * 3).round().to(dtype)  # ties, negative zeros
        ordered = sorted(values.double().flatten().tolist())
        for k in (1, 7, 60, 115):
            for world_size in (1, 2, 4):
                got = on_row_shards(world_size, lambda v, start, coll, k=k: kth_lowest(v, k, coll).reshape(1), values)
                assert got.dtype == dtype and set(got.double().tolist()) == {ordered[k - 1]}, (dtype, k)
    assert isinstance(ThreadGroup(1).member(0), Collective)
    assert key_value(int(order_keys(torch.tensor([-2.5]))[0]), torch.float32).item() == -2.5
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\] \(the number of values\), got 4"):
        kth_lowest(torch.ones(3), 4)


@pytest.mark.subprocess
@pytest.mark.parametrize("world_size", [4])  # (2 ranks: every FSDP2 test of the update and the callback)
def test_processes_holding_dtensor_shards_select_what_one_process_selects(tmp_path, world_size) -> None:
    result = run_script("global_selection_ranks.py", str(tmp_path), str(world_size), str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]
    cases = script_module("global_selection_ranks").cases
    parts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    for name, (score, candidates, n) in cases().items():
        joined = torch.cat([part[name] for part in parts])
        if name == "growth":
            expected = random_positions(candidates, n, seed=7, draw=3)
        else:
            expected = naive_lowest(score, candidates, n)
        assert torch.equal(joined, expected), name
        assert int(joined.count_nonzero()) == n
    hundredth = sorted(cases()["growth"][0].flatten().tolist())[99]
    assert [float(part["kth"]) for part in parts] == [hundredth] * world_size


def test_magnitude_keys_select_as_the_magnitudes_do() -> None:
    generator = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        weight = torch.randn(40, 30, generator=generator).to(dtype)
        weight[::5] = -0.5  # ties of both signs
        weight[1::5] = 0.5
        weight[2, :4] = 0.0
        mask = torch.rand(40, 30, generator=generator) < 0.5
        n = int(mask.count_nonzero()) // 3
        smallest = naive_lowest(weight.double().abs(), mask, n)
        largest = naive_lowest(weight.double().abs().neg(), ~mask, n)
        for world_size in (1, 3):
            select = lambda k, c, start, coll, n=n: lowest_positions(k, c, n, start, coll)  # noqa: E731
            assert torch.equal(on_row_shards(world_size, select, magnitude_keys(weight), mask), smallest)
            assert torch.equal(on_row_shards(world_size, select, magnitude_keys(weight, True), ~mask), largest)
