"""TopologyMonitor and MaskHistory in real Trainer runs: tags, images in the event files, exactness, resume."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyLM, make_trainer, token_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_selfish import SelfishSparsityCallback, SparseEngine
from lightning_selfish.callbacks.history import MaskHistory, load_mask_history, load_mask_snapshot
from lightning_selfish.callbacks.monitor import TopologyMonitor

RECURRENT = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"]
ALL = ["encoder.weight", *RECURRENT, "decoder.weight"]


class MaskRecorder(Callback):
    """Keeps a copy of the masks after every notification, the way the monitor sees them."""

    def __init__(self) -> None:
        self.sequence: list[dict[str, torch.Tensor]] = []

    def on_topology_update(self, trainer, pl_module, engine, stats):
        self.sequence.append({name: mask.clone() for name, mask in engine.masks.items()})


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def assert_labelled_mask_picture(event, trainer, name: str) -> None:
    """The picture is the labelled one: matplotlib's frame (gate names, colour scale) around the density grid."""
    import io

    from matplotlib.image import imread

    from lightning_selfish.analysis import plots

    picture = (imread(io.BytesIO(event.encoded_image_string)) * 255).round()
    sparse = next(cb for cb in trainer.callbacks if isinstance(cb, SelfishSparsityCallback))
    record = sparse.engine.tensors[name]
    expected = plots.figure_to_array(plots.mask_density_figure(record.mask, record.gates, name)).float()
    assert picture.shape[:2] == expected.shape[:2]
    # the same picture up to the colour quantisation of the grid and a pixel of line placement
    # the same picture, up to where a block edge falls (a pixel either way) and the grid's colour quantisation
    got = torch.from_numpy(picture[..., :3])
    nearest = torch.stack(
        [(got - expected.roll((dy, dx), (0, 1))).abs().amax(-1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    ).amin(0)
    assert nearest.gt(8).float().mean() < 0.002


def assert_custom_scalars_layout(log_dir: str, scalars: set[str]) -> None:
    """One chart per tensor with its gates (sparsity, exploration, drift), one of the overall figures."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    accumulator = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    [event] = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {(c.title, chart.title): list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    tags = {
        key: sorted(t for t in scalars if any(re.search(p, t) for p in patterns)) for key, patterns in charts.items()
    }
    assert tags[("overall", "sparsity, exploration, drift")] == [
        "drift/overall",
        "exploration/overall",
        "sparsity/overall",
    ]
    for kind in ("sparsity", "exploration", "drift"):
        for name in RECURRENT:
            assert tags[(f"{kind} per gate", name)] == sorted(
                [f"{kind}/{name}", *(f"{kind}/{name}/{g}" for g in "ifgo")]
            )
        assert tags[(f"{kind} per gate", "encoder.weight")] == [f"{kind}/encoder.weight"]
    magnitude = tags[("overall", "weights above the magnitude threshold")]
    assert magnitude == sorted(f"magnitude_above/{name}" for name in [*ALL, "overall"])


def test_scalars_images_and_gate_chart_reach_tensorboard(tmp_path: Path):
    pl.seed_everything(0, verbose=False)
    sparse = SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0)
    monitor, recorder = TopologyMonitor(), MaskRecorder()
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = make_trainer([sparse, monitor, recorder], max_epochs=3, logger=logger)
    trainer.fit(TinyLM(), token_loader(), token_loader(1, 2))

    acc = events(logger.log_dir)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for name in ALL:
        assert {f"exploration/{name}", f"drift/{name}", f"magnitude_above/{name}"} <= scalars
    for name in RECURRENT:
        assert {f"exploration/{name}/{gate}" for gate in "ifgo"} <= scalars
        assert f"masks/{name}" in images
    assert {"exploration/overall", "drift/overall", "magnitude_above/overall"} <= scalars
    assert images == {f"masks/{name}" for name in RECURRENT} | {"gates/sparsity"}

    # one picture at the start and one per update; the gate chart once, at the end; all real PNGs
    assert [e.step for e in acc.Images("masks/rnn.weight_hh_l0")] == [0, 8, 16]
    chart = acc.Images("gates/sparsity")
    assert [e.step for e in chart] == [24]
    assert chart[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and chart[0].width > 200
    assert_labelled_mask_picture(acc.Images("masks/rnn.weight_hh_l0")[-1], trainer, "rnn.weight_hh_l0")
    assert_custom_scalars_layout(logger.log_dir, scalars)

    # exploration: exact against the masks the monitor was told about, and monotone
    ever = {}
    for masks in recorder.sequence:
        ever = {n: ever.get(n, torch.zeros_like(m)) | m for n, m in masks.items()}
    total = sum(m.numel() for m in ever.values())
    expected = sum(int(m.sum()) for m in ever.values()) / total
    logged = [e.value for e in acc.Scalars("exploration/overall")]
    assert logged == sorted(logged) and len(logged) == 3
    assert logged[-1] == pytest.approx(expected, rel=1e-6)
    assert [e.value for e in acc.Scalars("drift/overall")][0] == 0.0
    # weights above 0.1, once per epoch, counted on the sparsified tensors
    params = dict(trainer.lightning_module.named_parameters())
    final = acc.Scalars("magnitude_above/rnn.weight_hh_l0")
    assert len(final) == 3 and final[-1].value == int((params["rnn.weight_hh_l0"].abs() > 0.1).sum())


def test_loggers_without_images_are_skipped_with_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    pl.seed_everything(0, verbose=False)
    sparse = SelfishSparsityCallback(sparsity=0.5, seed=0)
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO, logger="lightning_selfish.callbacks.monitor"):
        trainer = make_trainer([sparse, TopologyMonitor()], max_epochs=2, logger=logger)
        trainer.fit(TinyLM(), token_loader(), token_loader(1, 2))
    lines = [r.getMessage() for r in caplog.records if "cannot take images" in r.getMessage()]
    assert lines == ["TopologyMonitor: CSVLogger cannot take images; mask pictures are skipped for it"]
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "exploration/overall" in header and "magnitude_above/rnn.weight_hh_l0" in header


def test_scripted_masks_give_exact_exploration_and_the_state_resumes_it():
    params = {"w": torch.nn.Parameter(torch.randn(4, 3))}
    start = torch.zeros(4, 3, dtype=torch.bool)
    start[:2] = True
    engine = SparseEngine(params, {"w": start}, {"w": [("a", slice(0, 2)), ("b", slice(2, 4))]})
    logged: list[dict[str, float]] = []
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=0, loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))]
    )
    monitor = TopologyMonitor(mask_images=False)
    monitor.on_topology_update(trainer, None, engine, None)
    script = [[(2, 0), (2, 1), (0, 0), (0, 1), (1, 0), (1, 1)], [(3, 2), (0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]]
    stats = object()  # anything but None: an update happened
    for step, active in enumerate(script):
        if step == 1:  # resume in between: a fresh monitor from the saved state carries on exactly
            state = monitor.state_dict()
            monitor = TopologyMonitor(mask_images=False)
            monitor.load_state_dict(state)
            monitor.on_topology_update(trainer, None, engine, None)
        engine.tensors["w"].mask.zero_()
        for r, c in active:
            engine.tensors["w"].mask[r, c] = True
        monitor.on_topology_update(trainer, None, engine, stats)
    # ever active: rows 0-1 (6) + (2,0), (2,1) + (3,2) = 9 of 12
    assert logged[-1]["exploration/w"] == 9 / 12
    assert logged[-1]["exploration/w/a"] == 1.0 and logged[-1]["exploration/w/b"] == 3 / 6
    assert logged[-1]["drift/w"] == 1 / 6  # only (3, 2) is new relative to the start
    assert [m["exploration/overall"] for m in logged] == [6 / 12, 8 / 12, 8 / 12, 9 / 12]
    assert monitor.num_updates == 2


class StopAfterSecondEpoch(Callback):  # an interrupted run, with its 4-epoch schedule
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch == 1


def test_resumed_run_explores_exactly_like_an_uninterrupted_one(tmp_path: Path):
    def run(ckpt_path=None, extra=(), history_dir="m"):
        pl.seed_everything(0, verbose=False)
        monitor, history = TopologyMonitor(mask_images=False, gate_chart=False), MaskHistory(tmp_path / history_dir)
        callbacks = [SelfishSparsityCallback(sparsity=0.6, prune_rate=0.5, seed=0), monitor, history, *extra]
        trainer = make_trainer(callbacks, max_epochs=4, enable_checkpointing=bool(extra))
        trainer.fit(TinyLM(), token_loader(), token_loader(1, 2), ckpt_path=ckpt_path)
        return monitor

    whole = run(history_dir="whole")
    run(extra=[StopAfterSecondEpoch(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    resumed = run(ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.num_updates == whole.num_updates == 3
    for name in whole.ever_active:
        assert torch.equal(resumed.initial[name], whole.initial[name])
        assert torch.equal(resumed.ever_active[name], whole.ever_active[name])
    # the history of the interrupted and resumed run is the uninterrupted run's, epoch by epoch
    history, reference = load_mask_history(tmp_path / "m"), load_mask_history(tmp_path / "whole")
    assert sorted(history) == sorted(reference) == [0, 1, 2, 3]
    for epoch, snapshot in reference.items():
        assert all(torch.equal(snapshot.masks[n], history[epoch].masks[n]) for n in snapshot.masks)
    ever = {n: m.clone() for n, m in load_mask_snapshot(tmp_path / "m" / "init.pt").masks.items()}
    for snapshot in history.values():  # epoch updates: every topology is some epoch's, so the union is exact
        ever = {n: ever[n] | snapshot.masks[n] for n in ever}
    assert all(torch.equal(ever[n], whole.ever_active[n]) for n in ever)


def test_step_updates_and_masks_that_start_dense(tmp_path: Path):
    pl.seed_everything(0, verbose=False)
    # GMP's masks start dense and only lose weights: every position was active, none is new (a sparsity of 0,
    # which this test used before, is refused: issue 25.2)
    sparse = SelfishSparsityCallback(sparsity=0.5, method="gmp", update_every=3, pruning_end=0.9, seed=0)
    monitor, history = TopologyMonitor(images_every_n_updates=2), MaskHistory(tmp_path / "masks")
    logger = TensorBoardLogger(tmp_path, name="dense")
    trainer = make_trainer([sparse, monitor, history], max_epochs=2, logger=logger)
    trainer.fit(TinyLM(), token_loader(), token_loader(1, 2))
    assert monitor.num_updates == sparse.num_updates == 5  # steps 3, 6, 9, 12 and the window's end, 14
    acc = events(logger.log_dir)
    assert {e.value for e in acc.Scalars("exploration/overall")} == {1.0}
    assert {e.value for e in acc.Scalars("drift/overall")} == {0.0}
    assert [e.step for e in acc.Images("masks/rnn.weight_ih_l0")] == [0, 6, 12]
    saved = load_mask_history(tmp_path / "masks")
    assert sorted(saved) == [0, 1] and saved[1].step == 16
    assert saved[1].gates["rnn.weight_hh_l1"] == [(g, slice(16 * k, 16 * (k + 1))) for k, g in enumerate("ifgo")]


def test_monitor_without_a_sparsity_callback_and_bad_arguments():
    with pytest.raises(ValueError, match="add SelfishSparsityCallback"):
        make_trainer([TopologyMonitor()], max_epochs=1).fit(TinyLM(), token_loader())
    with pytest.raises(ValueError, match="magnitude_threshold"):
        TopologyMonitor(magnitude_threshold=-1)
    with pytest.raises(ValueError, match="images_every_n_updates"):
        TopologyMonitor(images_every_n_updates=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        MaskHistory(every_n_epochs=0)


def test_argument_types_follow_the_error_rule() -> None:
    # docs/callback.md "Errors": TypeError for a wrong type, ValueError for a wrong value; a flag is a bool, never
    # anything truthy ("no" used to mean True).
    for kwargs, error, message in [
        (dict(magnitude_threshold="0.1"), TypeError, "magnitude_threshold must be a number >= 0 or None, got '0.1'"),
        (dict(magnitude_threshold=True), TypeError, "magnitude_threshold must be a number >= 0 or None, got True"),
        (
            dict(magnitude_threshold=-0.5),
            ValueError,
            "magnitude_threshold must be a finite number >= 0 or None, got -0.5",
        ),
        (
            dict(magnitude_threshold=float("nan")),
            ValueError,
            "magnitude_threshold must be a finite number >= 0 or None, got nan",
        ),
        (dict(mask_images="no"), TypeError, "mask_images must be True or False, got 'no'"),
        (dict(gate_chart=1), TypeError, "gate_chart must be True or False, got 1"),
        (dict(images_every_n_updates=2.0), TypeError, "images_every_n_updates must be a positive int, got 2.0"),
        (dict(image_resolution=True), TypeError, "image_resolution must be a positive int, got True"),
        (dict(image_resolution=0), ValueError, "image_resolution must be a positive int, got 0"),
    ]:
        with pytest.raises(error) as raised:
            TopologyMonitor(**kwargs)
        assert str(raised.value) == message
    for kwargs, error, message in [
        (dict(every_n_epochs=1.0), TypeError, "every_n_epochs must be a positive int, got 1.0"),
        (dict(every_n_epochs=True), TypeError, "every_n_epochs must be a positive int, got True"),
        (dict(every_n_epochs=0), ValueError, "every_n_epochs must be a positive int, got 0"),
        (dict(dirpath=3), TypeError, "dirpath must be a path (str or os.PathLike) or None, got 3"),
    ]:
        with pytest.raises(error) as raised:
            MaskHistory(**kwargs)
        assert str(raised.value) == message
    assert TopologyMonitor(mask_images=False, gate_chart=False).mask_images is False


@pytest.mark.parametrize("method", ["gmp", "dsr", "rigl"])
def test_other_methods_dense_start_and_moving_counts(method: str, tmp_path: Path):
    pl.seed_everything(0, verbose=False)
    kwargs = {"gmp": dict(update_every=2), "dsr": {}, "rigl": dict(update_every=4)}[method]
    sparse = SelfishSparsityCallback(sparsity=0.6, method=method, seed=1, **kwargs)
    monitor, recorder = TopologyMonitor(), MaskRecorder()
    logger = TensorBoardLogger(tmp_path, name=method)
    optimizer = "momentum" if method == "dsr" else "sgd"
    trainer = make_trainer([sparse, monitor, recorder], max_epochs=3, logger=logger)
    trainer.fit(TinyLM(optimizer=optimizer), token_loader(), token_loader(1, 2))
    assert monitor.num_updates == sparse.num_updates == len(recorder.sequence) - 1 > 0
    ever = {n: torch.zeros_like(m) for n, m in recorder.sequence[0].items()}
    for masks in recorder.sequence:
        ever = {n: ever[n] | m for n, m in masks.items()}
    assert all(torch.equal(ever[n], monitor.ever_active[n]) for n in ever)
    logged = [e.value for e in events(logger.log_dir).Scalars("exploration/overall")]
    assert logged == sorted(logged)
    if method == "gmp":  # masks start full: everything was active from the start, nothing is new since
        assert set(logged) == {1.0}
        assert {e.value for e in events(logger.log_dir).Scalars("drift/overall")} == {0.0}


def test_mask_history_writes_nothing_under_fast_dev_run(tmp_path: Path):
    history = MaskHistory(tmp_path / "masks")
    trainer = make_trainer([SelfishSparsityCallback(sparsity=0.5, seed=0), history], fast_dev_run=True)
    trainer.fit(TinyLM(), token_loader(), token_loader(1, 2))
    assert not (tmp_path / "masks").exists()


def test_mask_history_files_their_place_cadence_and_metadata(tmp_path: Path) -> None:
    """Default place ``<log_dir>/masks`` (nested directories created), every ``every_n_epochs``-th epoch counting
    from 1, each snapshot with its epoch and step; the initial masks in ``init.pt``."""
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0)
    logger = CSVLogger(tmp_path / "deep" / "logs", name="run", version=0)
    history = MaskHistory(every_n_epochs=3)
    pl.seed_everything(0, verbose=False)
    make_trainer([callback, history], max_epochs=6, logger=logger).fit(TinyLM(), token_loader())
    directory = tmp_path / "deep" / "logs" / "run" / "version_0" / "masks"
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_0002.pt", "epoch_0005.pt", "init.pt"]
    saved = load_mask_history(directory)
    assert list(saved) == [2, 5] and [(s.epoch, s.step) for s in saved.values()] == [(2, 24), (5, 48)]
    initial = load_mask_snapshot(directory / "init.pt")
    assert (initial.epoch, initial.step) == (None, 0)
    assert set(saved[5].masks) == set(callback.masks)
    assert any(not torch.equal(saved[2].masks[n], saved[5].masks[n]) for n in callback.masks)  # updates apart


def test_mask_history_keeps_the_initial_masks_of_the_real_start_when_resumed(tmp_path: Path) -> None:
    """``init.pt`` is written once, in directories it creates; a resumed run leaves it alone."""
    masks_dir = tmp_path / "not" / "yet" / "there"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(0, verbose=False)
    first = SelfishSparsityCallback(sparsity=0.6, seed=0)
    make_trainer([first, MaskHistory(masks_dir), checkpoint], max_epochs=2, enable_checkpointing=True).fit(
        TinyLM(), token_loader()
    )
    written = (masks_dir / "init.pt").read_bytes()
    resumed = SelfishSparsityCallback(sparsity=0.6, seed=0)
    make_trainer([resumed, MaskHistory(masks_dir)], max_epochs=3).fit(
        TinyLM(), token_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert (masks_dir / "init.pt").read_bytes() == written
    assert sorted(load_mask_history(masks_dir)) == [0, 1, 2]


def test_mask_history_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError) as error:
        load_mask_snapshot(tmp_path / "other.pt")
    assert str(error.value) == f"{tmp_path / 'other.pt'} is not a MaskHistory file (expected a dict with 'masks')"
    with pytest.raises(FileNotFoundError) as missing:
        load_mask_history(tmp_path / "nowhere")
    assert str(missing.value) == f"no mask history at {tmp_path / 'nowhere'} (MaskHistory writes <log_dir>/masks)"
    with pytest.raises(ValueError) as alone:
        make_trainer([MaskHistory(tmp_path / "m")], max_epochs=1).fit(TinyLM(), token_loader())
    assert str(alone.value) == (
        "MaskHistory saves the masks of a SelfishSparsityCallback, but none told it about its masks: add "
        "SelfishSparsityCallback(...) to the trainer's callbacks"
    )
    for bad, error in ((0, ValueError), (True, TypeError), (1.0, TypeError)):
        with pytest.raises(error, match="every_n_epochs must be a positive int"):
            MaskHistory(every_n_epochs=bad)


def test_monitor_arguments_and_states_are_checked_word_for_word() -> None:
    assert TopologyMonitor(magnitude_threshold=0).magnitude_threshold == 0.0  # 0: count every nonzero weight
    assert TopologyMonitor(magnitude_threshold=None).magnitude_threshold is None
    for bad, kind in (("0.1", TypeError), (True, TypeError)):
        with pytest.raises(kind) as error:
            TopologyMonitor(magnitude_threshold=bad)
        assert str(error.value) == f"magnitude_threshold must be a number >= 0 or None, got {bad!r}"
    with pytest.raises(ValueError) as error:
        TopologyMonitor(magnitude_threshold=-0.5)
    assert str(error.value) == "magnitude_threshold must be a finite number >= 0 or None, got -0.5"
    for name in ("images_every_n_updates", "image_resolution"):
        for bad, kind in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
            with pytest.raises(kind) as error:
                TopologyMonitor(**{name: bad})
            assert str(error.value) == f"{name} must be a positive int, got {bad!r}"
    for keys in (["initial"], ["ever_active"]):
        with pytest.raises(ValueError) as error:
            TopologyMonitor().load_state_dict(dict.fromkeys(keys))
        assert str(error.value) == (
            f"not a TopologyMonitor state: expected keys 'initial' and 'ever_active', got {keys}"
        )
    with pytest.raises(ValueError) as error:
        make_trainer([TopologyMonitor()], max_epochs=1).fit(TinyLM(), token_loader())
    assert str(error.value) == (
        "TopologyMonitor watches the masks of a SelfishSparsityCallback, but none told it about its masks: add "
        "SelfishSparsityCallback(...) to the trainer's callbacks"
    )


def test_a_monitor_state_for_other_parameters_is_refused() -> None:
    whole = TopologyMonitor(mask_images=False, gate_chart=False)
    make_trainer([SelfishSparsityCallback(sparsity=0.6, seed=0), whole], max_epochs=1).fit(TinyLM(), token_loader())
    part = TopologyMonitor(mask_images=False, gate_chart=False)
    part.load_state_dict(whole.state_dict())
    callback = SelfishSparsityCallback(sparsity=0.6, seed=0, include=["decoder.*"])
    with pytest.raises(ValueError) as error:
        make_trainer([callback, part], max_epochs=1).fit(TinyLM(), token_loader())
    assert str(error.value).startswith(
        "the checkpoint's TopologyMonitor state does not match the sparsified parameters: "
        "checkpoint [('decoder.weight', "
    )
    assert str(error.value).endswith("model [('decoder.weight', (40, 16))]")
