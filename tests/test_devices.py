"""The callback where users train: state on the parameters' device, cuDNN's flat weights, mixed precision, compile.

Every test runs on the CPU (what CI has) and, marked ``gpu``, on CUDA when a GPU is present
(``python -m pytest -m gpu`` runs just those; ``benchmarks/run_all.py`` runs them on a GPU machine).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyLM, make_trainer, token_loader

from lightning_selfish import SNTASGD, SelfishSparsityCallback
from lightning_selfish.core.engine import SparseEngine

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)
DEVICES = ["cpu", CUDA]


class SNTASGDLM(TinyLM):
    """TinyLM trained with SNT-ASGD, averaging from the first step."""

    def configure_optimizers(self):
        optimizer = SNTASGD(self.parameters(), lr=1.0, weight_decay=1.2e-6)
        optimizer.start_averaging()
        return optimizer


def accelerator(device: str) -> dict:
    return {"accelerator": "gpu" if device == "cuda" else "cpu"}


def assert_inactive_weights_are_zero(model: torch.nn.Module, callback: SelfishSparsityCallback) -> None:
    params = dict(model.named_parameters())
    for name, mask in callback.masks.items():
        assert params[name][~mask].abs().max() == 0, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adam", "sntasgd"])
def test_masks_generator_and_optimizer_state_live_on_the_parameters_device(device: str, optimizer: str) -> None:
    model = SNTASGDLM() if optimizer == "sntasgd" else TinyLM(optimizer="adam")
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    make_trainer([callback], max_epochs=2, limit_train_batches=3, **accelerator(device)).fit(
        model, token_loader(), token_loader(1, windows=2)
    )
    assert callback.controller.generator.device.type == device
    for record in callback.engine.tensors.values():
        assert record.mask.device == record.param.device == record.mask_as_param.device
        assert record.param.device.type == device
    state = [value for s in model.trainer.optimizers[0].state.values() for value in s.values()]
    assert state and all(value.device.type == device for value in state if isinstance(value, torch.Tensor))
    assert_inactive_weights_are_zero(model, callback)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_records_the_generator_device_and_seed(device: str) -> None:
    callback = SelfishSparsityCallback(sparsity=0.5, seed=7)
    make_trainer([callback], max_epochs=1, limit_train_batches=2, **accelerator(device)).fit(TinyLM(), token_loader())
    state = callback.state_dict()
    assert state["generator_device"] == device and state["seed"] == 7
    assert torch.equal(state["generator"], callback.controller.generator.get_state())


@pytest.mark.parametrize("seed", [2**61 + 1, None], ids=["62-bit seed", "checkpoint without a seed"])
def test_a_generator_state_from_another_device_reseeds_with_a_warning(seed, caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA checkpoint resumed on the CPU: masks resume exactly, later growth draws from a new stream seeded
    by NumPy's ``SeedSequence(seed, spawn_key=(2, num_updates))`` (stream 2: the reseed; seed 0 for checkpoints that
    predate the key), said in a warning."""
    first = SelfishSparsityCallback(sparsity=0.5, seed=2**61 + 1 if seed is None else seed)
    make_trainer([first], max_epochs=2, limit_train_batches=2).fit(TinyLM(), token_loader())
    state = first.state_dict()
    assert state["num_updates"] == 1
    state["generator_device"] = "cuda"
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's state looks like
    if seed is None:
        del state["seed"]
    resumed = SelfishSparsityCallback(sparsity=0.5, seed=3, total_steps=2)  # on_fit_start outside a fit
    resumed.load_state_dict(state)
    caplog.set_level("WARNING", logger="lightning_selfish")
    model = TinyLM()
    resumed.on_fit_start(make_trainer([resumed], max_epochs=1), model)
    reseed = int(np.random.SeedSequence(seed or 0, spawn_key=(2, 1)).generate_state(1, np.uint64)[0]) % 2**63
    assert [record.getMessage() for record in caplog.records] == [
        "SelfishSparsityCallback: the checkpoint's random generator was on cuda, the parameters are now on cpu: later "
        f"random growth continues from a new stream seeded {reseed} (the masks themselves resume exactly)"
    ]
    assert torch.equal(resumed.controller.generator.get_state(), torch.Generator().manual_seed(reseed).get_state())
    for name, mask in resumed.masks.items():
        assert torch.equal(mask, state["masks"][name])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_flat_lstm_weights_stay_valid_through_enforcement_and_updates(device: str) -> None:
    """In-place enforcement: the parameters keep their storage, so cuDNN's flat weight buffer stays the one in use."""
    model = TinyLM()
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0)
    pointers: list[list[int]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            pointers.append([w.data_ptr() for w in pl_module.rnn._flat_weights])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([callback, Record()], max_epochs=3, limit_train_batches=3, **accelerator(device)).fit(
            model, token_loader()
        )
    assert len(pointers) == 9 and all(p == pointers[0] for p in pointers)
    assert not [w for w in caught if "contiguous chunk of memory" in str(w.message)]
    assert callback.num_updates == 2
    assert_inactive_weights_are_zero(model, callback)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_masks_and_exact_zeros(device: str, enforcement_calls: list) -> None:
    model = SNTASGDLM()
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    make_trainer([callback], max_epochs=2, limit_train_batches=3, precision="bf16-mixed", **accelerator(device)).fit(
        model, token_loader()
    )
    assert len(enforcement_calls) == 6  # once per real step
    assert_inactive_weights_are_zero(model, callback)
    optimizer = model.trainer.optimizers[0]
    for name, mask in callback.masks.items():
        param = dict(model.named_parameters())[name]
        assert optimizer.state[param]["ax"][~mask].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_skipped_by_the_grad_scaler_neither_rezeroes_nor_counts(device: str, enforcement_calls) -> None:
    """fp16 loss scaling: a step with an inf gradient is skipped; the post-hook and SNT-ASGD's ages skip it too."""
    torch.manual_seed(0)
    model = SNTASGDLM().to(device)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    engine = SparseEngine.initialize(params, 0.5, torch.Generator(device=device).manual_seed(0))
    optimizer = model.configure_optimizers()
    engine.attach(optimizer)
    scaler = torch.amp.GradScaler(device)
    x = torch.randint(0, 40, (6, 4), device=device)

    def step(poison: bool) -> None:
        optimizer.zero_grad()
        model.hidden = None
        with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
            loss = model(x).float().mean()
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        scaler.step(optimizer)
        scaler.update()

    step(poison=False)
    weights = {n: p.detach().clone() for n, p in params.items()}
    ages = {n: optimizer.state[p]["age"].clone() for n, p in params.items()}
    step(poison=True)
    assert len(enforcement_calls) == 1  # the skipped step did not run the post-hook
    for name, param in params.items():
        assert torch.equal(param, weights[name]), name
        assert torch.equal(optimizer.state[param]["age"], ages[name]), name
    step(poison=False)
    assert len(enforcement_calls) == 2
    for name, param in params.items():
        assert torch.equal(optimizer.state[param]["age"], ages[name] + engine.masks[name].float()), name


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_trains_with_the_callback_and_keeps_the_masks(device: str) -> None:
    """``module.compile()`` (the forward compiled in place, parameter names unchanged): fits, masks hold."""
    model = TinyLM()
    model.compile(backend="aot_eager" if device == "cpu" else "inductor")
    callback = SelfishSparsityCallback(sparsity=0.5, seed=0)
    make_trainer([callback], max_epochs=2, limit_train_batches=3, **accelerator(device)).fit(model, token_loader())
    assert callback.num_updates == 1
    assert_inactive_weights_are_zero(model, callback)
    assert all(0 < int(mask.sum()) < mask.numel() for mask in callback.masks.values())


class PoisonedLM(SNTASGDLM):
    """SNT-ASGD from the first step; the loss of batch ``poison_batch`` is made infinite (its gradient overflows)."""

    poison_batch = 2

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.poison_batch else loss


class AgeLog(pl.Callback):
    """The SNT-ASGD age of every sparsified tensor after each training batch."""

    def __init__(self) -> None:
        self.ages: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        optimizer = trainer.optimizers[0]
        self.ages.append(
            {n: optimizer.state[p]["age"].clone() for n, p in pl_module.named_parameters() if p.dim() >= 2}
        )


@pytest.mark.parametrize("device", [CUDA])  # on the CPU, Lightning runs "16-mixed" as bf16 and oneDNN has no fp16 LSTM
def test_fp16_mixed_in_lightning_a_skipped_step_is_not_enforced_nor_averaged(device: str, enforcement_calls) -> None:
    """``precision="16-mixed"``: the grad scaler skips the overflowing step; the callback and SNT-ASGD skip it too.

    (The same on the CPU, without Lightning, is ``test_a_step_skipped_by_the_grad_scaler_neither_rezeroes_nor_counts``.)
    """
    model = PoisonedLM()
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    ages = AgeLog()
    make_trainer(
        [callback, ages], max_epochs=1, limit_train_batches=5, precision="16-mixed", **accelerator(device)
    ).fit(model, token_loader())
    assert len(enforcement_calls) == 4  # 5 batches, one skipped
    # the skipped batch left every age as it was; the others add one where the weight is active
    assert all(torch.equal(ages.ages[2][n], ages.ages[1][n]) for n in ages.ages[1])
    for name, mask in callback.masks.items():
        assert torch.equal(ages.ages[3][name], ages.ages[2][name] + mask.float())
    assert_inactive_weights_are_zero(model, callback)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_on_the_same_device_is_exact(device: str, tmp_path, monkeypatch) -> None:
    """The device generator's state travels in the checkpoint: a run stopped after epoch 2 and resumed equals an
    uninterrupted one, masks and weights bit for bit."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)

    def run(max_epochs: int, ckpt_path=None, stop_after: int | None = None, checkpoints=None):
        pl.seed_everything(0, verbose=False)
        model = TinyLM()
        callback = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.6, seed=3 if ckpt_path is None else 999)
        extra = [checkpoints] if checkpoints is not None else []

        class Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                trainer.should_stop = stop_after is not None and trainer.current_epoch == stop_after

        trainer = make_trainer(
            [callback, Stop(), *extra], max_epochs=max_epochs, enable_checkpointing=bool(extra), **accelerator(device)
        )
        trainer.fit(model, token_loader(), token_loader(1, 2), ckpt_path=ckpt_path)
        masks = {n: m.cpu().clone() for n, m in callback.masks.items()}
        return masks, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

    full_masks, full_weights = run(4)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    run(4, stop_after=1, checkpoints=checkpoints)
    masks, weights = run(4, ckpt_path=tmp_path / "epoch=1.ckpt")
    for name in full_masks:
        assert torch.equal(masks[name], full_masks[name]), name
    for name in full_weights:
        assert torch.equal(weights[name], full_weights[name]), name
