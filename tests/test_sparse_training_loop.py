"""``SparseTraining``: sparse training in a plain loop without Lightning (issue #23, "the same for a plain
``fully_shard`` loop"). On one process in this process: the update cadence, the gradient kept for an update, the
state's round trip, the errors. In subprocesses (``ddp_scripts/sparse_loop.py``): ``fully_shard`` on 2 gloo ranks
masks as one process without sharding does, step for step, and a ``torch.distributed.checkpoint`` folder resumes
on 2 ranks, on 1 process and (one process's) on 2 ranks as the uninterrupted run goes on."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import FSDP2_ATOL, ScriptRuns, script_module

from lightning_selfish import SparseTraining

fsdp2_fit = script_module("fsdp2_fit")  # the harness's model, data and optimizers

# ----------------------------------------------------------------------------------------------------------------
# one process, in this process
# ----------------------------------------------------------------------------------------------------------------


def model_and_optimizer() -> tuple[fsdp2_fit.LanguageModel, torch.optim.Optimizer]:
    torch.manual_seed(fsdp2_fit.INIT_SEED)
    lm = fsdp2_fit.LanguageModel()
    return lm, fsdp2_fit.make_optimizer("momentum", lm.parameters())


def batches(epochs: int) -> list:
    return [batch for _ in range(epochs) for batch in fsdp2_fit.rank_loader(1, 0)]


def train(lm, optimizer, training: SparseTraining, steps: list, first: int = 1) -> list[dict]:
    """The loop of docs/distributed.md over ``steps`` (batches), numbered from ``first``; per step the masks and
    whether an update ran."""
    records = []
    for step, batch in enumerate(steps, start=first):
        optimizer.zero_grad()
        lm.loss(batch).backward()
        training.before_optimizer_step(step)
        optimizer.step()
        stats = training.after_optimizer_step(step)
        masks = {name: mask.clone() for name, mask in training.masks.items()}
        records.append({"step": step, "updated": stats is not None, "masks": masks})
    return records


def test_updates_run_at_the_step_cadence_never_on_the_last_step() -> None:
    lm, optimizer = model_and_optimizer()
    training = SparseTraining(
        lm, [optimizer], sparsity=0.5, total_steps=6, seed=0, method="set", update_every=2, prune_rate=0.3
    )
    training.start()
    records = train(lm, optimizer, training, batches(2))
    assert [r["step"] for r in records if r["updated"]] == [2, 4]  # every 2 steps, not at the run's last (6)
    changed = [r["step"] for r, before in zip(records[1:], records) if any(
        not torch.equal(r["masks"][n], before["masks"][n]) for n in r["masks"])]  # fmt: skip
    assert changed == [2, 4] and training.num_updates == 2


def test_the_epoch_cadence_updates_at_epoch_ends_but_the_last() -> None:
    lm, optimizer = model_and_optimizer()
    training = SparseTraining(lm, [optimizer], sparsity=0.5, total_steps=9, seed=0, steps_per_epoch=3)
    assert training.config.update_every == "epoch"  # (Selfish-RNN's preset)
    training.start()
    updated = []
    for epoch in range(3):
        records = train(lm, optimizer, training, batches(1), first=3 * epoch + 1)
        assert not any(r["updated"] for r in records)
        updated.append(training.after_epoch(epoch) is not None)
    assert updated == [True, True, False] and training.num_updates == 2


def test_a_gradient_growth_update_reads_the_gradient_kept_before_the_step() -> None:
    """RigL's update after step 2 grows by the dense gradient kept in ``before_optimizer_step(2)``, also when the
    loop frees the gradients before ``after_optimizer_step`` (none is kept for step 1: no update follows it)."""
    lm, optimizer = model_and_optimizer()
    training = SparseTraining(
        lm, [optimizer], sparsity=0.5, total_steps=6, seed=0, method="rigl", update_every=2, prune_rate=0.3
    )
    training.start()
    first, second = batches(1)[:2]
    for step, batch in ((1, first), (2, second)):
        optimizer.zero_grad()
        lm.loss(batch).backward()
        training.before_optimizer_step(step)
        kept = training.controller.gradients
        params = dict(lm.named_parameters())
        if step == 1:
            assert kept is None
        else:
            assert kept.keys() == training.masks.keys()
            assert all(torch.equal(kept[name], params[name].grad) for name in kept)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        before = {name: mask.clone() for name, mask in training.masks.items()}
        stats = training.after_optimizer_step(step)
    assert stats is not None and stats.total_grown > 0 and training.controller.gradients is None
    name = "decoder.weight"
    grown = training.masks[name] & ~before[name]
    # naive reference: the grown positions are among the largest |kept gradient| of the positions inactive before
    candidates = kept[name].abs()[~before[name]]
    smallest_grown = kept[name].abs()[grown].min()
    assert (candidates > smallest_grown).sum() < int(grown.sum())


@pytest.mark.parametrize("steps_per_epoch", [3, None])
def test_an_epoch_update_reads_the_gradient_of_the_epochs_last_step(steps_per_epoch: int | None) -> None:
    """RigL at epoch ends: the update after epoch 0 reads the dense gradient of step 3 although the loop freed the
    gradients; with the epoch's length unknown the gradient is copied at every step, into buffers a checkpoint
    holds."""
    lm, optimizer = model_and_optimizer()
    training = SparseTraining(lm, [optimizer], sparsity=0.5, total_steps=6, seed=0, method="rigl",
                              update_every="epoch", steps_per_epoch=steps_per_epoch)  # fmt: skip
    training.start()
    assert (training.state_dict()["gradients"] is None) == (steps_per_epoch is not None)
    last = None
    for step, batch in enumerate(batches(1), start=1):
        optimizer.zero_grad()
        lm.loss(batch).backward()
        training.before_optimizer_step(step)
        last = {name: p.grad.clone() for name, p in lm.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert training.after_optimizer_step(step) is None
    kept = training.controller.gradients
    assert all(torch.equal(kept[name], last[name]) for name in training.masks)
    assert training.after_epoch(0).total_grown > 0
    assert (training.controller.gradients is None) == (steps_per_epoch is not None)


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_a_saved_state_resumes_as_the_uninterrupted_run(method: str) -> None:
    """Saved after step 3 (with the weights and the optimizer), loaded into a new run: steps 4-6 give the masks of
    the uninterrupted run, random growth's stream included."""
    arguments = dict(sparsity=0.5, total_steps=6, seed=0, method=method, update_every=2, prune_rate=0.3)
    steps = batches(2)
    lm, optimizer = model_and_optimizer()
    uninterrupted = SparseTraining(lm, [optimizer], **arguments)
    uninterrupted.start()
    reference = train(lm, optimizer, uninterrupted, steps)

    lm, optimizer = model_and_optimizer()
    first = SparseTraining(lm, [optimizer], **arguments)
    first.start()
    train(lm, optimizer, first, steps[:3])
    saved = round_trip({"model": lm.state_dict(), "optimizer": optimizer.state_dict(), "sparsity": first.state_dict()})

    lm, optimizer = model_and_optimizer()
    resumed = SparseTraining(lm, [optimizer], **arguments)
    resumed.start()
    lm.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["sparsity"])
    assert resumed.step == 3 and resumed.num_updates == 1
    records = train(lm, optimizer, resumed, steps[3:], first=4)
    for got, want in zip(records, reference[3:], strict=True):
        assert got["updated"] == want["updated"], got["step"]
        assert all(torch.equal(got["masks"][n], want["masks"][n]) for n in want["masks"]), got["step"]
    assert resumed.controller.draws.next_draw == uninterrupted.controller.draws.next_draw


def test_misuse_is_refused_naming_the_call_and_what_is_allowed() -> None:
    lm, optimizer = model_and_optimizer()
    arguments = dict(sparsity=0.5, total_steps=6, seed=0, method="rigl", update_every=2)
    training = SparseTraining(lm, [optimizer], **arguments)
    with pytest.raises(RuntimeError, match=r"after_optimizer_step\(\) before start\(\): call start\(\) once"):
        training.after_optimizer_step(1)
    with pytest.raises(RuntimeError, match=r"state_dict\(\) before start\(\)"):
        training.state_dict()
    training.start()
    with pytest.raises(RuntimeError, match=r"start\(\) was already called"):
        training.start()
    train(lm, optimizer, training, batches(1)[:2])
    with pytest.raises(ValueError, match=r"after_optimizer_step\(step\) .* after step 2 it must be an int greater "
                       r"than 2, got 2"):  # fmt: skip
        training.after_optimizer_step(2)
    with pytest.raises(ValueError, match=r"before_optimizer_step\(step\) .* greater than 2, got 1"):
        training.before_optimizer_step(1)
    with pytest.raises(ValueError, match=r"after_epoch\(epoch\) takes the number of the epoch .* got -1"):
        training.after_epoch(-1)
    lm.loss(batches(1)[2]).backward()
    training.before_optimizer_step(3)  # (no update after step 3: nothing kept)
    training.state_dict()
    with pytest.raises(ValueError, match=r"not a SparseTraining state: it lacks \['masks'"):
        training.load_state_dict({"generator": torch.zeros(1)})
    for wrong, error, message in (
        (dict(seed=None), TypeError, "seed must be an int, the same on every rank, got None"),
        (dict(total_steps=0), ValueError, "total_steps must be a positive int, got 0"),
        (dict(steps_per_epoch=2.5), ValueError, "steps_per_epoch must be a positive int or None, got 2.5"),
        (dict(include="rnn.*"), TypeError, "include must be a list of name patterns"),
        (dict(prune_rat=0.3), TypeError, r"unknown method parts \['prune_rat'\]"),
    ):
        with pytest.raises(error, match=message):
            SparseTraining(lm, [optimizer], **{**arguments, **wrong})
    with pytest.raises(TypeError, match="optimizers must be a list of torch.optim.Optimizer"):
        SparseTraining(lm, optimizer, **arguments)


def test_a_state_is_refused_while_a_kept_gradient_waits_for_its_update() -> None:
    lm, optimizer = model_and_optimizer()
    training = SparseTraining(lm, [optimizer], sparsity=0.5, total_steps=6, seed=0, method="rigl", update_every=2)
    training.start()
    train(lm, optimizer, training, batches(1)[:1])
    lm.loss(batches(1)[1]).backward()
    training.before_optimizer_step(2)
    with pytest.raises(RuntimeError, match="save the checkpoint after that call"):
        training.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# fully_shard on 2 gloo ranks against one process without sharding (subprocesses)
# ----------------------------------------------------------------------------------------------------------------


class LoopRuns(ScriptRuns):
    """The runs of ``sparse_loop.py``, by method: on one process without sharding, and on 2 ``fully_shard`` ranks."""

    def plain(self, method: str, *extra: str) -> dict:
        (rank,) = self.run(f"plain_{method}{'_'.join(extra).replace('/', '_')}", "--plain", "--devices", "1",
                           "--method", method, *extra)  # fmt: skip
        return rank

    def sharded(self, method: str, *extra: str) -> list[dict]:
        return self.run(f"two_{method}{'_'.join(extra).replace('/', '_')}", "--devices", "2", "--method", method,
                        *extra)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> LoopRuns:
    return LoopRuns(tmp_path_factory.mktemp("sparse_loop"), "sparse_loop.py")


def assert_same_steps(ranks: list[dict], reference: dict, first_step: int = 1) -> None:
    """Every rank's record after every step equals the one-process run's: the whole masks position for position,
    the whole tensors' active counts, the updates made and random growth's next draw; inactive weights zero on the
    rank's rows; the weights at the end close."""
    expected = {record["step"]: record for record in reference["sparsity"]}
    for rank in ranks:
        steps = rank["sparsity"]
        assert [r["step"] for r in steps] == list(range(first_step, 7))
        for record in steps:
            want = expected[record["step"]]
            assert record["zeros"], record["step"]
            assert record["active"] == want["active"], record["step"]
            assert (record["updates"], record["next_draw"]) == (want["updates"], want["next_draw"]), record["step"]
            for name, mask in want["masks"].items():
                assert torch.equal(record["masks"][name], mask), (record["step"], name)
        for name, weight in reference["weights"].items():
            torch.testing.assert_close(rank["weights"][name], weight, atol=FSDP2_ATOL, rtol=0, msg=name)
    assert expected[6]["updates"] == 2  # (updates after steps 2 and 4)


@pytest.mark.subprocess
@pytest.mark.parametrize("method", ["selfish", "rigl"])
def test_fully_shard_on_two_ranks_trains_sparse_as_one_process_does(runs: LoopRuns, method: str) -> None:
    """Selfish-RNN (magnitude removal, random growth by position, gates ranked jointly) and RigL (gradient growth)
    at every 2nd step: 2 ranks holding rows of every weight, one process holding them whole."""
    one = runs.plain(method)
    assert one["plain"] and one["world_size"] == 1
    two = runs.sharded(method)
    assert [rank["world_size"] for rank in two] == [2, 2]
    assert_same_steps(two, one)


@pytest.mark.subprocess
def test_ddp_on_two_ranks_trains_sparse_as_one_process_does(runs: LoopRuns) -> None:
    """The same loop with the module wrapped by DDP (whole weights on every rank, parameter names ``module.*``):
    every rank's masks are the one process's after every step."""
    ddp = runs.run("ddp_selfish", "--devices", "2", "--ddp", "--method", "selfish")
    assert [rank["ddp"] for rank in ddp] == [True, True]
    assert_same_steps(ddp, runs.plain("selfish"))


@pytest.mark.subprocess
def test_a_distributed_checkpoint_resumes_on_two_ranks_on_one_process_and_back(runs: LoopRuns) -> None:
    """The folder the 2 ranks wrote after epoch 0 (step 3, one update done), resumed on 2 ranks and on one
    process without sharding, and the one process's folder resumed on 2 ranks: steps 4-6 as the uninterrupted run
    (masks, counts, random growth's stream, weights)."""
    from torch.distributed.checkpoint import FileSystemReader

    one, two = runs.plain("selfish"), runs.sharded("selfish")
    sharded_folder, plain_folder = str(two[0]["out"] / "epoch=0"), str(one["out"] / "epoch=0")
    saved = FileSystemReader(sharded_folder).read_metadata().state_dict_metadata
    masks = [key for key in saved if key.startswith("sparsity.masks.")]
    assert sorted(masks) == sorted(f"sparsity.masks.{name}" for name in one["sparsity"][0]["masks"])
    assert all(len(saved[key].chunks) == 2 for key in masks)  # each rank saved its own rows: nothing gathered
    assert_same_steps(runs.sharded("selfish", "--ckpt", sharded_folder), one, first_step=4)
    assert_same_steps([runs.plain("selfish", "--ckpt", sharded_folder)], one, first_step=4)
    assert_same_steps(runs.sharded("selfish", "--ckpt", plain_folder), one, first_step=4)
