"""What the tests share: a tiny LSTM language model and random token windows, small enough for many Trainer runs;
fits of it with the sparsity callback and with SNT-ASGD and the NT-ASGD trigger; the Hypothesis profiles and the
fixtures every test runs under. Test modules and the scripts they start import helpers from here only, never from
one another."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import HealthCheck, settings
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, TensorDataset

from lightning_selfish import SelfishSparsityCallback
from lightning_selfish.core.engine import SparseEngine, UpdateContext
from lightning_selfish.method.catalogue import GROWTHS, REDISTRIBUTIONS, REMOVALS, resolve
from lightning_selfish.method.parts import UpdateAmount
from lightning_selfish.optim.sntasgd import SNTASGD

# Hypothesis: CI (which sets CI=true) replays the same examples on every run, so a red build is reproducible;
# locally every run draws fresh examples (and replays the failing ones from .hypothesis/). HYPOTHESIS_PROFILE
# picks a profile explicitly, e.g. ``HYPOTHESIS_PROFILE=ci`` to reproduce CI.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,  # nothing written to .hypothesis/
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))

VOCAB, EMB, HIDDEN, STEPS, BATCH, WINDOWS = 40, 12, 16, 6, 4, 8


class TinyLM(pl.LightningModule):
    """Embedding -> 2-layer nn.LSTM -> Linear, one window per batch, hidden state carried across windows."""

    def __init__(self, optimizer: str = "sgd", lr: float = 1.0, manual: bool = False, rnn: str = "lstm") -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMB)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn](EMB, HIDDEN, num_layers=2)
        self.decoder = nn.Linear(HIDDEN, VOCAB)
        self.optimizer_name, self.lr = optimizer, lr
        self.automatic_optimization = not manual
        self.hidden = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.hidden = self.rnn(self.encoder(x), self.hidden)
        return self.decoder(out)

    def on_train_epoch_start(self) -> None:
        self.hidden = None

    def training_step(self, batch, batch_idx):
        x, y = batch[0].t(), batch[1].t()  # (T, B)
        if self.hidden is not None:
            self.hidden = (
                tuple(h.detach() for h in self.hidden) if isinstance(self.hidden, tuple) else self.hidden.detach()
            )
        loss = nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=0.25, gradient_clip_algorithm="norm")
            opt.step()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.hidden = None
        x, y = batch[0].t(), batch[1].t()
        loss = nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("val_loss", loss)
        self.hidden = None

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.optimizer_name == "momentum":
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        if self.optimizer_name == "sntasgd":
            return SNTASGD(self.parameters(), lr=self.lr, weight_decay=1.2e-6)
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=1.2e-6)


def token_loader(seed: int = 0, windows: int = WINDOWS) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (windows * BATCH, STEPS + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=BATCH, shuffle=False)


def make_trainer(callbacks, max_epochs: int = 3, package: str = "pytorch_lightning", **kwargs) -> pl.Trainer:
    """A quiet CPU ``Trainer`` of ``package`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=0.25,
    )
    defaults.update(kwargs)
    return importlib.import_module(package).Trainer(callbacks=callbacks, **defaults)


class RecordingLogger(Logger):
    """A logger that keeps every ``log_metrics`` call. Not rank-zero-only, so a rank that logs shows here."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def steps_of(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every logged ``key``, in order."""
        return [(step, metrics[key]) for step, metrics in self.records if key in metrics]

    def last(self, key: str) -> float:
        return self.steps_of(key)[-1][1]

    def count(self, key: str) -> int:
        return len(self.steps_of(key))


def write_random_corpus(
    directory: Path, seed: int, vocab: int, lines: tuple[int, int, int] = (80, 20, 20), words: int = 7
) -> Path:
    """``train/valid/test.txt`` of random lines of ``words`` tokens ``w0 .. w{vocab-1}``: a corpus for the recipes'
    data module in a few kilobytes."""
    g = torch.Generator().manual_seed(seed)
    for split, count in zip(("train", "valid", "test"), lines):
        text = [" ".join(f"w{int(w)}" for w in torch.randint(0, vocab, (words,), generator=g)) for _ in range(count)]
        (directory / f"{split}.txt").write_text("\n".join(text) + "\n")
    return directory


# --------------------------------------------------------------------------------------------------------------
# the sparsity callback in a fit of TinyLM
# --------------------------------------------------------------------------------------------------------------


class StepChecker(Callback):
    """After every optimizer step: inactive weights are exactly zero, counts fixed; records mask snapshots."""

    def __init__(self, sparsity_cb: SelfishSparsityCallback) -> None:
        self.cb = sparsity_cb
        self.steps = 0
        self.epoch_masks: list[dict[str, torch.Tensor]] = []
        self.counts: dict[str, int] | None = None

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = dict(pl_module.named_parameters())
        for name, mask in self.cb.masks.items():
            assert (params[name][~mask] == 0).all(), (
                f"{name} has nonzero inactive weights at step {trainer.global_step}"
            )
        counts = {n: int(m.sum()) for n, m in self.cb.masks.items()}
        self.counts = self.counts or counts
        assert counts == self.counts
        self.steps += 1

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_masks.append({n: m.clone() for n, m in self.cb.masks.items()})


def fit_checked(cb, model=None, max_epochs=3, extra=(), **kwargs):
    """Fit TinyLM with ``cb`` and a ``StepChecker`` after it (asserting zeros and fixed counts at every step);
    returns the model, the checker and the trainer."""
    pl.seed_everything(0, verbose=False)
    model = model or TinyLM()
    checker = StepChecker(cb)
    trainer = make_trainer([cb, checker, *extra], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader(), token_loader(1, 2))
    return model, checker, trainer


def fit_tiny(
    callback: SelfishSparsityCallback, *extra: Callback, max_epochs: int = 2, model=None, loader=None, **kwargs
):
    """Fit TinyLM (or ``model``) with ``callback`` and the ``extra`` callbacks after it, seeded with 0; returns the
    model and the trainer."""
    pl.seed_everything(0, verbose=False)
    model = model or TinyLM()
    trainer = make_trainer([callback, *extra], max_epochs=max_epochs, **kwargs)
    trainer.fit(model, token_loader() if loader is None else loader, token_loader(1, 2))
    return model, trainer


class Topology(Callback):
    """Records every ``on_topology_update`` call: the global step, the module it was handed, whether it was an update
    (``stats`` given) and the gradient copy the sparsity callback keeps at that moment."""

    def __init__(self, sparsity: SelfishSparsityCallback) -> None:
        self.sparsity = sparsity
        self.calls: list[dict[str, Any]] = []

    def on_topology_update(self, trainer, pl_module, engine, stats) -> None:
        self.calls.append(
            dict(
                step=trainer.global_step,
                module=pl_module,
                update=stats is not None,
                stats=stats,
                gradients=self.sparsity.state_dict()["gradients"],
            )
        )

    @property
    def update_steps(self) -> list[int]:
        return [call["step"] for call in self.calls if call["update"]]


def snapshot(model: torch.nn.Module, callback: SelfishSparsityCallback) -> tuple[dict, dict]:
    """Copies of the masks and of every parameter, to compare two runs with ``assert_same``."""
    masks = {name: mask.clone() for name, mask in callback.masks.items()}
    return masks, {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """Two ``snapshot``s are equal exactly (``torch.equal``), name by name."""
    for left, right in zip(a, b):
        assert left.keys() == right.keys()
        for name in left:
            assert torch.equal(left[name], right[name]), name


class Unsized(IterableDataset):
    """The windows of ``token_loader()`` without a length (as variable-length BPTT yields them)."""

    def __iter__(self):
        yield from token_loader().dataset


def unsized_loader() -> DataLoader:
    return DataLoader(Unsized(), batch_size=token_loader().batch_size)


# --------------------------------------------------------------------------------------------------------------
# NT-ASGD runs: SNT-ASGD on learnable token windows, with scripted validation values for the trigger
# --------------------------------------------------------------------------------------------------------------


def pattern_loader(seed: int, windows: int = 4, steps: int = 6, batch: int = 4) -> DataLoader:
    """Learnable token windows (next = current + 3 mod V), so that validation improves during averaging."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (windows * batch, 1), generator=g)
    tokens = (starts + 3 * torch.arange(steps + 1)) % VOCAB
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch, shuffle=False)


class AvgLM(TinyLM):
    """TinyLM trained by SNTASGD; ``scripted`` values are logged as ``val_score`` (-100 during the sanity check)."""

    def __init__(self, lr: float = 1.0, scripted: list[float] | None = None, optimizer: str = "sntasgd") -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.scripted = scripted

    def on_validation_epoch_end(self) -> None:
        if self.scripted is not None:
            self.log("val_score", -100.0 if self.trainer.sanity_checking else self.scripted[self.current_epoch])

    def test_step(self, batch, batch_idx):
        self.hidden = None
        x, y = batch[0].t(), batch[1].t()
        loss = torch.nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("test_loss", loss)


def seeded(**kwargs) -> AvgLM:
    """An ``AvgLM`` drawn after seeding everything with 0: the same initial weights in every run."""
    pl.seed_everything(0, verbose=False)
    return AvgLM(**kwargs)


def run(model, callbacks, max_epochs, seed=0, ckpt_path=None, **kwargs) -> pl.Trainer:
    """Fit ``model`` on ``pattern_loader`` windows (validation on 2 of them) and return the trainer."""
    pl.seed_everything(seed, verbose=False)
    trainer = make_trainer(callbacks, max_epochs=max_epochs, **kwargs)
    trainer.fit(model, pattern_loader(0), pattern_loader(1, windows=2), ckpt_path=ckpt_path)
    return trainer


class Kill(Callback):
    """Stops the fit at the end of epoch ``after_epoch``: an interrupted run (its schedule is the full run's)."""

    def __init__(self, after_epoch: int) -> None:
        self.after_epoch = after_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch == self.after_epoch


def final_state(model, trainer) -> tuple[list[torch.Tensor], dict]:
    """The weights and the optimizer's state dict at the end of a fit, to compare runs exactly."""
    opt = trainer.optimizers[0]
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


# --------------------------------------------------------------------------------------------------------------
# resumes with dropout, under either Lightning package, for the train loaders users write
# --------------------------------------------------------------------------------------------------------------

PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def tiny_module_of(lightning: Any) -> Any:
    """TinyLM as a LightningModule of the package ``lightning`` (the module ``pytorch_lightning`` or
    ``lightning.pytorch``), trained with plain SGD."""

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TinyLM()

        def training_step(self, batch, batch_idx):
            x, y = batch[0].t(), batch[1].t()
            out, _ = self.inner.rnn(self.inner.encoder(x))
            return nn.functional.cross_entropy(self.inner.decoder(out).reshape(-1, VOCAB), y.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Module()


def dropout_lm(package: str = "pytorch_lightning", p: float = 0.3) -> pl.LightningModule:
    """A tiny LSTM LM of ``package`` with dropout ``p`` on the embeddings (every training step draws from torch's
    global generator); it records the first token of every training window, in the order trained."""
    lightning = importlib.import_module(package)

    class DropoutLM(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Embedding(VOCAB, EMB)
            self.rnn = nn.LSTM(EMB, HIDDEN)
            self.decoder = nn.Linear(HIDDEN, VOCAB)
            self.trained: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch[0].t(), batch[1].t()  # (T, B)
            self.trained.append(x[0].tolist())
            out, _ = self.rnn(nn.functional.dropout(self.encoder(x), p, self.training))
            return nn.functional.cross_entropy(self.decoder(out).reshape(-1, VOCAB), y.reshape(-1))

        def validation_step(self, batch, batch_idx):
            out, _ = self.rnn(self.encoder(batch[0].t()))
            self.log(
                "val_loss", nn.functional.cross_entropy(self.decoder(out).reshape(-1, VOCAB), batch[1].t().reshape(-1))
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    return DropoutLM()


def windows(seed: int, count: int) -> TensorDataset:
    """``count * BATCH`` random token windows (inputs, next tokens)."""
    tokens = torch.randint(0, VOCAB, (count * BATCH, STEPS + 1), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def user_loader(kind: str, count: int = 4, **kwargs) -> DataLoader:
    """The train loaders users write, over ``count`` batches of windows, by ``kind`` (one of ``LOADER_KINDS``)."""
    data = windows(0, count)
    if kind == "in order":
        return DataLoader(data, BATCH, **kwargs)
    if kind == "shuffle":
        return DataLoader(data, BATCH, shuffle=True, **kwargs)
    if kind == "shuffle, own generator":  # what docs/callback.md used to recommend
        return DataLoader(data, BATCH, shuffle=True, generator=torch.Generator().manual_seed(1), **kwargs)
    if kind == "RandomSampler, own generator":
        return DataLoader(
            data, BATCH, sampler=RandomSampler(data, generator=torch.Generator().manual_seed(1)), **kwargs
        )
    if kind == "seeded DistributedSampler":
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=1)
        return DataLoader(data, BATCH, sampler=sampler, **kwargs)
    raise ValueError(f"kind={kind!r}: not one of {LOADER_KINDS}")


LOADER_KINDS = (
    "in order",
    "shuffle",
    "shuffle, own generator",
    "RandomSampler, own generator",
    "seeded DistributedSampler",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is fastest, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG state, so one that draws without a generator is reproducible."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Nothing a test does lands outside its temporary directories: the corpus cache and matplotlib's included."""
    monkeypatch.setenv("LIGHTNING_SELFISH_CACHE", str(tmp_path_factory.getbasetemp() / "corpus_cache"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "matplotlib"))


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def enforcement_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """The optimizer of every call of the library's own re-zeroing (``SparseEngine.enforce_after_step_``), in order,
    whoever registered the hook: a hook installed twice, or run for a skipped step, shows here."""
    calls: list = []
    original = SparseEngine.enforce_after_step_

    def counting(engine, optimizer, *args, **kwargs):
        calls.append(optimizer)
        return original(engine, optimizer, *args, **kwargs)

    monkeypatch.setattr(SparseEngine, "enforce_after_step_", counting)
    return calls


def update_engine(
    engine: SparseEngine,
    prune_rate: float,
    generator: torch.Generator,
    removal: str = "magnitude",
    growth: str = "random",
    optimizers=(),
    synchronize=None,
    gradients=None,
    *,
    redistribution: str = "none",
    target_density: float | None = None,
    removed_and_regrown: str = "restart",
    threshold: float | None = None,
    threshold_tolerance: float = 0.02,
    grown_optimizer_state: str = "zero",
    grow_into_removed: bool = True,
    removal_rounding: str = "ceil",
    gate_redistribution: str | None = None,
):
    """One engine update with the parts named as in the callback's arguments (the method built from the
    registries, unchecked as a whole, so a test may combine parts freely). ``gate_redistribution`` defaults to the
    engine's blocks: ``"joint"`` when every tensor is one block, else ``"none"``."""
    if gate_redistribution is None:
        per_gate = any(len(t.groups) > 1 for t in engine.tensors.values())
        gate_redistribution = "none" if per_gate else "joint"
    config = dataclasses.replace(
        resolve("selfish", 0.5, gate_redistribution=gate_redistribution),
        removal=REMOVALS[removal],
        growth=GROWTHS[growth],
        redistribution=REDISTRIBUTIONS[redistribution],
        removed_and_regrown=removed_and_regrown,
        threshold_tolerance=threshold_tolerance,
        grown_optimizer_state=grown_optimizer_state,
        grow_into_removed=grow_into_removed,
        removal_rounding=removal_rounding,
    )
    amount = UpdateAmount(prune_rate, target_density)
    context = UpdateContext(generator, list(optimizers), gradients, synchronize, threshold)
    return engine.update(amount, config, context)


@pytest.fixture
def one_process_group(tmp_path: Path):
    """A gloo process group of one process (this one): the collectives' real code path, without a second process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# scripts in ddp_scripts/, run as processes (gloo ranks) on the code under test
# ----------------------------------------------------------------------------------------------------------------

DDP_SCRIPTS = Path(__file__).parent / "ddp_scripts"
#: The code under test, also from a second checkout: the scripts' processes import it first.
ROOT = Path(__file__).resolve().parents[1]
#: 2 processes against 1 under FSDP2: the reduce-scatter's summation order differs from one process's backward,
#: so a few float32 steps differ by a few ulps (seen: up to 6e-8); a wrong shard, batch or state moves them > 1e-3.
FSDP2_ATOL = 1e-6


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``ddp_scripts/<script>`` run by this Python with ``args``: one thread per process, warnings off, the code under
    test first on the path."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    command = [sys.executable, str(DDP_SCRIPTS / script), *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def script_module(name: str) -> Any:
    """The script ``ddp_scripts/<name>.py`` as a module (its scenario, run in this process as the reference)."""
    sys.path.insert(0, str(DDP_SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DDP_SCRIPTS))


class ScriptRuns:
    """Each run of a script that writes ``rank<r>.pt`` and ``rank<r>.json`` per rank, made once, on demand, in its
    own folder under ``base`` (the tests of a module share them); its ranks' records read back."""

    def __init__(self, base: Path, script: str) -> None:
        self.base, self.script, self.done = base, script, {}

    def run(self, name: str, *args: str) -> list[dict]:
        if name not in self.done:
            out = self.base / name
            self.done[name] = (out, run_script(self.script, str(out), *args, env={"MASTER_PORT": str(free_port())}))
        out, result = self.done[name]
        errors = [line for line in result.stderr.splitlines() if "rror" in line or "abort" in line.lower()]
        assert result.returncode == 0, "\n".join(errors)[-3000:] + result.stderr[-3000:]
        ranks = sorted(out.glob("rank*.pt"))
        return [{**torch.load(pt), **json.loads(pt.with_suffix(".json").read_text()), "out": out} for pt in ranks]

    def failed(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """A run that must fail: its process's output."""
        try:
            self.run(name, *args)
        except AssertionError:
            return self.done[name][1]
        raise AssertionError(f"{name} ran to its end")
