"""FSDP2 on CPU processes (gloo): Lightning's ``ModelParallelStrategy`` (``ddp_scripts/fsdp2_fit.py``) trains the tiny
LSTM LM on 2 processes as 1 process does and resumes its checkpoints on 2 and on 1 process; what a callback's state
goes through (docs/distributed-notes.md); and ``SelfishSparsityCallback`` under the strategy against one device,
step by step. Each run is started once per module and shared by the tests (the plain ``fully_shard`` loop:
tests/test_sparse_training_loop.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import FSDP2_ATOL, ScriptRuns


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScriptRuns:
    return ScriptRuns(tmp_path_factory.mktemp("fsdp2"), "fsdp2_fit.py")


# The runs the tests share: 2 epochs of 3 steps on 2 processes and on 1; the first's checkpoint of its first epoch
# resumed on 2 and on 1 process.
PROBES = ("--callback", "probe:state", "--callback", "probe:model-state", "--callback", "probe:buffers")


def two(runs: ScriptRuns) -> list[dict]:
    return runs.run("two", "--devices", "2", *PROBES)


def one(runs: ScriptRuns) -> list[dict]:
    return runs.run("one", "--devices", "1", "--package", "lightning.pytorch")


def resumed(runs: ScriptRuns, devices: int) -> list[dict]:
    ckpt = str(two(runs)[0]["out"] / "epoch=0.ckpt")
    return runs.run(f"resumed_on_{devices}", "--devices", str(devices), "--ckpt", ckpt, *PROBES)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=FSDP2_ATOL, rtol=0, msg=name)


def hooks(rank: dict) -> list[str]:
    return [event["hook"] for event in rank["events"]]


def event(rank: dict, hook: str) -> dict:
    return next(e for e in rank["events"] if e["hook"] == hook)


def probe_masks(rank: dict, route: str) -> dict[str, dict]:
    return next(e["masks"] for e in rank["events"] if e["hook"] == "ShardProbe.loaded" and e["route"] == route)


@pytest.mark.subprocess
def test_two_processes_take_the_steps_of_one(runs: ScriptRuns) -> None:
    ranks, single = two(runs), one(runs)[0]
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert all(r["strategy"] == "ModelParallelStrategy" for r in [*ranks, single])
    assert single["package"] == "lightning.pytorch" and ranks[0]["package"] == "pytorch_lightning"
    # every global batch split by rows: rank 0 windows 0 and 2, rank 1 windows 1 and 3 of the one process's batch
    for step, whole in enumerate(single["windows"]):
        assert ranks[0]["windows"][step] == whole[0::2] and ranks[1]["windows"][step] == whole[1::2]
    # the one process's loss is the mean of the ranks' (equal halves of its batch)
    for step, loss in enumerate(single["losses"]):
        assert (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 == pytest.approx(loss, abs=1e-6)
    for name in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])  # gathered on both: the same
    assert_close(ranks[0]["weights"], single["weights"])
    assert len(single["losses"]) == 6 and single["losses"][-1] < single["losses"][0]


@pytest.mark.subprocess
def test_hooks_a_callback_sees_under_model_parallel(runs: ScriptRuns) -> None:
    for rank in two(runs):
        assert hooks(rank)[:5] == [
            "Callback.setup",
            "LightningModule.configure_model",
            "LightningModule.configure_optimizers",
            "Callback.on_fit_start",
            "Callback.on_train_start",
        ]
        assert not event(rank, "Callback.setup")["sharded"]  # setup: whole weights, no optimizer yet
        assert event(rank, "Callback.setup")["optimizers"] == 0
        fit_start = event(rank, "Callback.on_fit_start")  # parameters are DTensors, the optimizer exists
        assert fit_start["sharded"] and fit_start["optimizers"] == 1 and fit_start["strategy_model_is_module"]


@pytest.mark.subprocess
def test_a_distributed_checkpoint_resumes_on_two_processes_exactly(runs: ScriptRuns) -> None:
    assert (two(runs)[0]["out"] / "epoch=0.ckpt" / "meta.pt").is_file()  # a folder of shards
    uninterrupted, ranks = two(runs), resumed(runs, 2)
    for rank, reference in zip(ranks, uninterrupted):
        assert rank["global_step"] == 6 and rank["losses"] == reference["losses"][3:]
        for name, weight in reference["weights"].items():
            assert torch.equal(rank["weights"][name], weight), name
        # Lightning restores after on_fit_start: the weights and optimizer state (DCP) first, then the callbacks
        order = hooks(rank)
        assert order.index("Callback.on_fit_start") < order.index("Callback.on_load_checkpoint")
        assert order.index("Callback.on_load_checkpoint") < order.index("Callback.load_state_dict")
        assert order.index("Callback.load_state_dict") < order.index("Callback.on_train_start")
        fit_start, loaded = event(rank, "Callback.on_fit_start"), event(rank, "Callback.on_load_checkpoint")
        assert fit_start["optimizer_state"] == 0 and loaded["optimizer_state"] == 11
        assert fit_start["weights"] != loaded["weights"] == event(rank, "Callback.on_train_start")["weights"]


@pytest.mark.subprocess
def test_a_distributed_checkpoint_of_two_processes_resumes_on_one(runs: ScriptRuns) -> None:
    (rank,) = resumed(runs, 1)
    assert rank["world_size"] == 1 and rank["global_step"] == 6
    assert_close(rank["weights"], two(runs)[0]["weights"])


@pytest.mark.subprocess
def test_a_full_checkpoint_of_two_processes_resumes_in_a_single_device_trainer(runs: ScriptRuns) -> None:
    runs.run("full_first_epoch", "--devices", "2", "--max-epochs", "1", "--full-ckpt")
    assert (runs.base / "full_first_epoch" / "epoch=0.ckpt").is_file()
    ckpt = str(runs.base / "full_first_epoch" / "epoch=0.ckpt")
    (rank,) = runs.run("full_resumed_plain", "--devices", "1", "--plain", "--ckpt", ckpt)
    assert rank["strategy"] == "SingleDeviceStrategy" and rank["global_step"] == 6
    assert_close(rank["weights"], two(runs)[0]["weights"])


@pytest.mark.subprocess
def test_lightning_restores_a_callbacks_dtensor_state_as_rank_zeros(runs: ScriptRuns) -> None:
    """Today's Lightning, pinned for the sharded sparsity callback: callback states go to ``meta.pt``, written by
    rank 0 alone, and every rank loads that one copy. A DTensor mask comes back on rank 1 holding rank 0's rows, and
    on 1 process as a DTensor of the old 2-process mesh: never resharded."""
    on_two, (on_one,) = resumed(runs, 2), resumed(runs, 1)
    for rank in [*on_two, on_one]:
        assert event(rank, "Callback.load_state_dict")["saved_by_rank"] == 0
    own = [probe_masks(rank, "state") for rank in [*on_two, on_one]]
    assert all(m["equals_own_shard"] for m in own[0].values())  # rank 0 gets its own rows back
    assert not any(m["equals_own_shard"] for m in own[1].values())  # rank 1 gets rank 0's
    assert own[1]["uint8:lm.encoder.weight"]["local_shape"] == [12, 11]  # its own shard has 11 rows
    on_one_mask = own[2]["bool:lm.encoder.weight"]  # on 1 process: a DTensor of the old 2-process mesh
    assert on_one_mask["mesh_size"] == 2 and not on_one_mask["equals_own_shard"]


# ----------------------------------------------------------------------------------------------------------------
# SelfishSparsityCallback under ModelParallelStrategy (issue #23): 2 ranks against one device, step by step
# ----------------------------------------------------------------------------------------------------------------


def sparse_run(runs: ScriptRuns, method: str, devices: int, *extra: str) -> list[dict]:
    plain = ("--plain",) if devices == 1 and "--ckpt" not in extra else ()
    name = f"sparse_{method}_{devices}{'_plain' if plain else ''}{'_'.join(extra).replace('/', '_')}"
    return runs.run(name, "--devices", str(devices), *plain, "--callback", f"selfish:{method}:0.5", *extra)


def assert_same_steps(ranks: list[dict], reference: dict, first_step: int = 1) -> None:
    """Every rank's record after every step equals the one-device run's: whole masks position for position, the
    whole tensors' active counts, the updates made and the random draws taken; inactive weights zero on every
    rank's rows."""
    expected = {record["step"]: record for record in reference["sparsity"][0]}
    for rank in ranks:
        steps = rank["sparsity"][0]
        assert [r["step"] for r in steps] == list(range(first_step, first_step + len(steps))) and steps
        for record in steps:
            want = expected[record["step"]]
            assert record["zeros"], record["step"]
            assert record["active"] == want["active"], record["step"]
            assert (record["updates"], record["next_draw"]) == (want["updates"], want["next_draw"]), record["step"]
            for name, mask in want["masks"].items():
                assert torch.equal(record["masks"][name], mask), (record["step"], name)
    assert expected[max(expected)]["updates"] >= 2  # (the runs update twice: steps 2 and 4)


@pytest.mark.subprocess
@pytest.mark.parametrize("route", ["model-state", "buffers"])
def test_masks_carried_with_the_model_state_come_back_as_each_ranks_own_shard(runs: ScriptRuns, route: str) -> None:
    """The routes that work: uint8 and bool DTensor masks added to ``checkpoint["state_dict"]`` (read back by the
    callback with ``dcp.load`` from ``trainer.ckpt_path``) or registered as buffers of the weights' modules come back
    as each rank's own rows of the saved masks, on 2 processes and on 1."""
    for rank in [*resumed(runs, 2), *resumed(runs, 1)]:
        masks = probe_masks(rank, route)
        assert len(masks) == 2 * 11 and all(m["type"] == "DTensor" for m in masks.values())
        assert all(m["equals_own_shard"] and m["mesh_size"] == rank["world_size"] for m in masks.values()), masks


@pytest.mark.subprocess
@pytest.mark.parametrize("method", ["selfish", "rigl", "set", "dsr", "snfs"])
def test_the_sparsity_callback_on_two_ranks_masks_as_one_device_does(runs: ScriptRuns, method: str) -> None:
    (one_device,) = sparse_run(runs, method, 1)
    assert one_device["strategy"] == "SingleDeviceStrategy"
    two_ranks = sparse_run(runs, method, 2)
    assert [rank["strategy"] for rank in two_ranks] == ["ModelParallelStrategy"] * 2
    assert_same_steps(two_ranks, one_device)


@pytest.mark.subprocess
def test_the_sparsity_callback_with_sntasgd_on_two_ranks_trains_as_one_device(runs: ScriptRuns) -> None:
    """The paper's optimizer under FSDP2: SNT-ASGD steps and averages the sharded parameters with the callback's
    local masks; masks as one device's step by step, weights and averages within float tolerance (the 2-rank
    gradients are all-reduced), every average zero where its weight is inactive."""
    (one_device,) = sparse_run(runs, "selfish", 1, "--optimizer", "sntasgd")
    two_ranks = sparse_run(runs, "selfish", 2, "--optimizer", "sntasgd")
    assert_same_steps(two_ranks, one_device)
    assert any(name.startswith("averaged.") for name in one_device["weights"])
    for rank in two_ranks:
        assert_close(rank["weights"], one_device["weights"])
    final = one_device["sparsity"][0][-1]["masks"]
    for name, mask in final.items():
        averaged = one_device["weights"][f"averaged.{name}"]
        assert not averaged[~mask].any(), name


@pytest.mark.subprocess
def test_the_sparsity_callback_resumes_on_two_ranks_and_moves_between_one_and_two(runs: ScriptRuns) -> None:
    """A distributed checkpoint of 2 ranks resumed on 2 and on one device, and a one-device checkpoint resumed on
    2 ranks: the masks and the random growth stream go on as in the uninterrupted runs (which are the same)."""
    (one_device,) = sparse_run(runs, "selfish", 1)
    two_ranks = sparse_run(runs, "selfish", 2)
    folder = str(two_ranks[0]["out"] / "epoch=0.ckpt")
    assert_same_steps(sparse_run(runs, "selfish", 2, "--ckpt", folder), one_device, first_step=4)
    plain = one_device["out"] / "epoch=0.ckpt"
    assert_same_steps(sparse_run(runs, "selfish", 2, "--ckpt", str(plain)), one_device, first_step=4)
    (on_one,) = runs.run(
        "sparse_two_to_one", "--devices", "1", "--plain", "--callback", "selfish:selfish:0.5", "--ckpt", folder
    )
    assert on_one["strategy"] == "SingleDeviceStrategy"
    assert_same_steps([on_one], one_device, first_step=4)
    assert_same_steps(sparse_run(runs, "selfish", 1, "--ckpt", folder), one_device, first_step=4)  # MP on 1


@pytest.mark.subprocess
def test_a_distributed_checkpoint_keeps_each_ranks_mask_rows_and_a_full_one_the_whole_masks(runs: ScriptRuns) -> None:
    """Nothing gathered for a distributed checkpoint: each rank's rows of every mask are in the folder's shards (the
    model state, under the library's keys), the callback's state in meta.pt says so; a full checkpoint holds the
    whole masks in the callback's state."""
    from torch.distributed.checkpoint import FileSystemReader

    (one_device,) = sparse_run(runs, "selfish", 1)
    folder = sparse_run(runs, "selfish", 2)[0]["out"] / "epoch=0.ckpt"
    meta = torch.load(folder / "meta.pt", weights_only=False)
    state = meta["callbacks"]["SelfishSparsityCallback"]
    assert state["masks"] == "in the model state of the distributed checkpoint"
    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    masks = sorted(k for k in keys if k.startswith("state_dict.lightning_selfish.masks."))
    assert masks == sorted(f"state_dict.lightning_selfish.masks.{n}" for n in one_device["sparsity"][0][0]["masks"])
    assert all(len(keys[k].chunks) == 2 for k in masks)  # one chunk of rows per rank
    sparse_run(runs, "selfish", 2, "--full-ckpt")
    full = torch.load(runs.base / "sparse_selfish_2--full-ckpt" / "epoch=0.ckpt", weights_only=False)
    whole = full["callbacks"]["SelfishSparsityCallback"]["masks"]
    after_epoch = next(r for r in one_device["sparsity"][0] if r["step"] == 3)["masks"]
    assert whole.keys() == after_epoch.keys() and all(torch.equal(whole[n], after_epoch[n]) for n in whole)
