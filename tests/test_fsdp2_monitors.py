"""The monitors and tools under ``ModelParallelStrategy`` (FSDP2, issue #23): a 2-rank run of the harness's tiny LSTM
LM with ``TopologyMonitor``, ``MaskHistory`` and ``FlopsCallback`` logs, writes and exports what the one-device run
of the same masks does (the runs' masks are equal step for step: tests/test_fsdp2_harness.py).

Counts are compared exactly (both runs divide the same integers); the magnitude counts and exported weights come
from weights that differ by a few ulps between the runs (conftest's ``FSDP2_ATOL``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FSDP2_ATOL, ScriptRuns

from lightning_selfish.callbacks.history import load_mask_history, load_mask_snapshot
from lightning_selfish.export import load_compressed

SPEC = "selfish:selfish:0.5:monitor"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScriptRuns:
    return ScriptRuns(tmp_path_factory.mktemp("fsdp2_monitors"), "fsdp2_fit.py")


def one_device(runs: ScriptRuns) -> dict:
    (rank,) = runs.run("one", "--devices", "1", "--plain", "--callback", SPEC, "--export")
    assert rank["strategy"] == "SingleDeviceStrategy"
    return rank


def two_ranks(runs: ScriptRuns) -> list[dict]:
    ranks = runs.run("two", "--devices", "2", "--callback", SPEC, "--export")
    assert [rank["strategy"] for rank in ranks] == ["ModelParallelStrategy"] * 2
    return ranks


def series(rank: dict, *prefixes: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged value of the metrics under ``prefixes``, by metric, as (step, value) in logging order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in rank["logged"]:
        for key, value in record["metrics"].items():
            if key.startswith(prefixes):
                out.setdefault(key, []).append((record["step"], value))
    return out


@pytest.mark.subprocess
def test_rank_zero_logs_and_the_others_do_not(runs: ScriptRuns) -> None:
    rank0, rank1 = two_ranks(runs)
    assert rank0["logged"] and not rank1["logged"]
    assert rank0["images"] and not rank1["images"]


@pytest.mark.subprocess
def test_per_gate_sparsity_topology_and_flops_metrics_equal_the_one_device_run(runs: ScriptRuns) -> None:
    reference, rank0 = one_device(runs), two_ranks(runs)[0]
    want, got = series(reference, "sparsity/", "topology/"), series(rank0, "sparsity/", "topology/")
    assert "sparsity/lm.rnn.weight_hh_l0/g" in want and "topology/changed_fraction/lm.rnn.weight_ih_l1" in want
    assert got == want
    flops_want, flops_got = series(reference, "flops/"), series(rank0, "flops/")
    assert flops_got.keys() == flops_want.keys() and len(flops_want["flops/train_total"]) == 3  # 2 epochs, fit end
    for key, values in flops_want.items():
        assert [step for step, _ in flops_got[key]] == [step for step, _ in values], key
        assert [value for _, value in flops_got[key]] == pytest.approx([value for _, value in values], rel=1e-12)


@pytest.mark.subprocess
def test_topology_monitor_scalars_equal_the_one_device_run(runs: ScriptRuns) -> None:
    """Exploration and drift, whole tensors and gates (counted over every rank's rows), at the start and after both
    updates; the weights above the magnitude threshold at both epoch ends."""
    reference, rank0 = one_device(runs), two_ranks(runs)[0]
    prefixes = ("exploration/", "drift/", "magnitude_above/")
    want, got = series(reference, *prefixes), series(rank0, *prefixes)
    assert [step for step, _ in want["exploration/overall"]] == [0, 2, 4]
    assert [step for step, _ in want["magnitude_above/overall"]] == [3, 6]
    assert want["exploration/lm.rnn.weight_hh_l1/f"][-1][1] > want["exploration/lm.rnn.weight_hh_l1/f"][0][1]
    assert got == want


@pytest.mark.subprocess
def test_mask_pictures_and_the_gate_chart_equal_the_one_device_run(runs: ScriptRuns) -> None:
    reference, rank0 = one_device(runs), two_ranks(runs)[0]
    tags = [(image["tag"], image["step"]) for image in reference["images"]]
    assert ("masks/lm.rnn.weight_hh_l0", 4) in tags and ("gates/sparsity", 6) in tags
    assert [(image["tag"], image["step"]) for image in rank0["images"]] == tags
    for got, want in zip(rank0["images"], reference["images"]):
        assert torch.equal(got["image"], want["image"]), (want["tag"], want["step"])
    assert rank0["layouts"] == reference["layouts"] and len(reference["layouts"]) == 1


@pytest.mark.subprocess
def test_mask_history_files_equal_the_one_device_run(runs: ScriptRuns) -> None:
    folders = [one_device(runs)["out"] / "masks", two_ranks(runs)[0]["out"] / "masks"]
    histories = [load_mask_history(folder) for folder in folders]
    assert sorted(histories[0]) == [0, 1] and sorted(histories[1]) == [0, 1]
    starts = [load_mask_snapshot(folder / "init.pt") for folder in folders]
    for want, got in [(histories[0][0], histories[1][0]), (histories[0][1], histories[1][1]), tuple(starts)]:
        assert (got.epoch, got.step, got.gates) == (want.epoch, want.step, want.gates)
        assert got.masks.keys() == want.masks.keys()
        for name, mask in want.masks.items():
            assert torch.equal(got.masks[name], mask), name
    final = two_ranks(runs)[0]["sparsity"][0][-1]["masks"]  # the masks after the last step
    assert all(torch.equal(histories[1][1].masks[name], mask) for name, mask in final.items())


@pytest.mark.subprocess
def test_an_export_of_two_ranks_equals_the_one_device_export(runs: ScriptRuns) -> None:
    """Every rank calls the export; rank 0 alone writes the files, which hold the whole tensors."""
    reference, ranks = one_device(runs), two_ranks(runs)
    out = ranks[0]["out"]
    want, got = load_compressed(reference["out"] / "compressed.pt"), load_compressed(out / "compressed.pt")
    assert got.masks.keys() == want.masks.keys() and got.state_dict.keys() == want.state_dict.keys()
    for name, mask in want.masks.items():
        assert torch.equal(got.masks[name], mask), name
    final = ranks[0]["sparsity"][0][-1]["masks"]
    assert all(torch.equal(got.masks[f"{name}"], mask) for name, mask in final.items())
    dense_want, dense_got = (torch.load(folder / "dense.pt") for folder in (reference["out"], out))
    for name, tensor in want.state_dict.items():
        torch.testing.assert_close(got.state_dict[name], tensor, atol=FSDP2_ATOL, rtol=0, msg=name)
        torch.testing.assert_close(dense_got[name], dense_want[name], atol=FSDP2_ATOL, rtol=0, msg=name)
        assert torch.equal(dense_got[name], got.state_dict[name]), name  # the two files of one run agree
    files = sorted(path.name for path in Path(out).glob("*.pt") if not path.name.startswith("rank"))
    assert files == ["compressed.pt", "dense.pt"]


@pytest.mark.subprocess
def test_the_topology_monitor_resumes_a_distributed_checkpoint_on_two_ranks(runs: ScriptRuns) -> None:
    """Its state (initial and ever-active masks) is saved whole and taken back by rows: the resumed run's
    exploration and drift go on as in the uninterrupted one-device run."""
    folder = str(two_ranks(runs)[0]["out"] / "epoch=0.ckpt")
    resumed = runs.run("resumed", "--devices", "2", "--callback", SPEC, "--ckpt", folder)[0]
    want, got = series(one_device(runs), "exploration/", "drift/"), series(resumed, "exploration/", "drift/")
    assert [step for step, _ in got["exploration/overall"]] == [3, 4]  # (restored masks at the resume; update 2)
    assert got.keys() == want.keys()
    for key, values in want.items():
        assert got[key][-1] == values[-1], key
