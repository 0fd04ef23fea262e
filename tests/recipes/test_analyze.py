"""``selfish-rnn analyze`` on the output of real tiny runs of the ``selfish-rnn fit`` command."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch

from lightning_selfish_recipes.cli import CONFIG_DIR, TOOL_COMMANDS, build_cli, main
from tests.conftest import write_random_corpus

PNG = b"\x89PNG\r\n\x1a\n"
EVERY_EPOCH = """
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        save_top_k: -1
        every_n_epochs: 1
        monitor: val_loss
        filename: "epoch{epoch:04d}"
        auto_insert_metric_name: false
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two 3-epoch runs of a tiny sparse stacked LSTM, one mask init, two training seeds, checkpoints every epoch;
    and a 1-epoch run (too short for some figures)."""
    root = tmp_path_factory.mktemp("analyze")
    corpus = root / "corpus"
    corpus.mkdir()
    write_random_corpus(corpus, seed=1, vocab=15)
    extra = root / "every_epoch.yaml"
    extra.write_text(EVERY_EPOCH)
    paths = []
    for seed, epochs in ((1, 3), (2, 3), (3, 1)):
        args = [
            "fit",
            "--config",
            str(CONFIG_DIR / "stacked_lstm_ptb.yaml"),
            "--config",
            str(extra),
            f"--seed_everything={seed}",
            "--model.sparsity.seed=5",
            "--model.network.init_args.ninp=8",
            "--model.network.init_args.nhid=8",
            "--data.corpus=tiny",
            f"--data.data_dir={corpus}",
            "--data.batch_size=4",
            f"--trainer.max_epochs={epochs}",
            "--trainer.limit_train_batches=4",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={root / 'logs'}",
            f"--trainer.logger.init_args.name=seed{seed}",
        ]
        with warnings.catch_warnings():  # (a module fixture runs outside conftest's per-test quieting)
            warnings.simplefilter("ignore")
            cli = build_cli(args=args)
        paths.append(Path(cli.trainer.log_dir))
    return paths[0], paths[1], paths[2]


def analyze(*args: str) -> int:
    """``selfish-rnn analyze ARGS`` through the console script's entry point; returns the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *args])
    return exit_info.value.code


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_analyze_writes_every_figure_and_table_it_promises(runs: tuple[Path, Path, Path], tmp_path: Path):
    run, other, _ = runs
    assert sorted(p.name for p in (run / "masks").iterdir()) == [
        "epoch_0000.pt",
        "epoch_0001.pt",
        "epoch_0002.pt",
        "init.pt",
    ]
    assert "analyze" in TOOL_COMMANDS
    out = tmp_path / "out"
    assert analyze(str(run), "--compare", str(other), "--out", str(out)) == 0
    for name in ("distance_within", "distance_between", "magnitude", "gate_sparsity"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
    for name in ("ih0", "hh0", "ih1", "hh1"):
        assert (out / f"masks_{name}_start.png").is_file() and (out / f"masks_{name}_epoch0002.png").is_file()
    within = read_csv(out / "distance_within.csv")
    assert {row["epoch"] for row in within} == {"0", "1", "2"}  # the earliest epoch is the reference here
    assert all(float(row["distance"]) == 0.0 for row in within if row["epoch"] == "0")
    hh = [float(r["distance"]) for r in within if r["tensor"] == "network.rnn.weight_hh_l0" and r["part"] == "all"]
    assert hh[0] == 0.0 and all(0.0 < d <= 1.0 for d in hh[1:])  # the topology moves away from where it started
    assert {r["part"] for r in within if r["tensor"] == "network.rnn.weight_hh_l0"} == {"all", "i", "f", "g", "o"}
    assert {r["aligned"] for r in within} == {"0"} and all(r["distance"] == r["distance_by_position"] for r in within)
    assert all(0.79 < float(r["chance"]) < 0.81 for r in within if r["part"] == "all")  # 2(1-d)/(2-d), d = 0.33
    between = read_csv(out / "distance_between.csv")
    first = [float(r["distance"]) for r in between if r["epoch"] == "0"]
    last = [float(r["distance"]) for r in between if r["epoch"] == "2" and r["part"] == "all"]
    assert first and all(d == 0.0 for d in first)  # one mask seed: the same initial topology
    assert all(0.0 <= d <= 1.0 for d in last) and any(d > 0 for d in last)  # different seeds, different updates
    table = (out / "gate_sparsity.md").read_text().splitlines()
    assert table[0] == "| tensor | i | f | g | o | whole tensor |"
    assert any(line.startswith("| network.rnn.weight_hh_l1 |") for line in table)


def test_analyze_aligns_units_by_activations_from_checkpoints(runs: tuple[Path, Path, Path], tmp_path: Path):
    run, other, _ = runs
    out = tmp_path / "aligned"
    code = analyze(str(run), "--compare", str(other), "--align", "activations", "--max-batches", "5", "--out", str(out))
    assert code == 0
    within = read_csv(out / "distance_within.csv")
    recurrent = [r for r in within if ".rnn.weight_" in r["tensor"]]
    assert recurrent and {r["aligned"] for r in recurrent} == {"1"}
    # the embedding's columns feed the first layer, the decoder's read the last: aligned with those units
    assert {r["aligned"] for r in within if r["tensor"] in ("network.encoder.weight", "network.decoder.weight")} == {
        "1"
    }
    assert all(float(r["distance"]) == 0.0 for r in within if r["epoch"] == "0")  # aligned with itself
    assert all(float(r["distinct_partners"]) == 1.0 for r in within if r["epoch"] == "0")
    assert all(float(r["match_correlation"]) == pytest.approx(1.0) for r in within if r["epoch"] == "0")
    between = read_csv(out / "distance_between.csv")
    assert all(0.0 <= float(r["distance"]) <= 1.0 for r in between)
    assert (out / "distance_between.png").read_bytes()[:8] == PNG


def test_analyze_errors_name_what_is_missing(runs: tuple[Path, Path, Path], tmp_path: Path, capsys):
    run, _, _ = runs
    assert analyze(str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert analyze(str(run), "--reference-epoch", "7", "--out", str(tmp_path / "x")) == 2
    assert "saved epochs: [0, 1, 2]" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert analyze(str(empty), "--align", "activations") == 2
    assert "ModelCheckpoint(every_n_epochs=1, save_top_k=-1)" in capsys.readouterr().err


def test_replayed_lstm_layers_are_the_modules_own_activations():
    from lightning_selfish_recipes.models import StackedLSTM
    from lightning_selfish_recipes.tools.topology_sources import lstm_unit_activations

    torch.manual_seed(0)
    network = StackedLSTM(ntoken=20, ninp=6, nhid=5, nlayers=3, dropout=0.0).eval()
    batches = [torch.randint(0, 20, (7, 3)) for _ in range(2)]
    acts, groups = lstm_unit_activations(network, batches)
    hidden, outputs = network.init_hidden(3), []
    with torch.no_grad():
        for tokens in batches:
            out, hidden = network.rnn(network.encoder(tokens), hidden)
            outputs.append(out.reshape(-1, 5))
    assert torch.allclose(acts["rnn.l2"], torch.cat(outputs), atol=1e-6)
    assert acts["rnn.input"].shape == (42, 6) and acts["rnn.l0"].shape == (42, 5)
    assert groups["rnn.weight_ih_l1"] == ("rnn.l1", "rnn.l0") and groups["rnn.weight_hh_l2"] == ("rnn.l2", "rnn.l2")
    assert groups["rnn.weight_ih_l0"] == ("rnn.l0", "rnn.input")


def test_sparse_recipes_monitor_and_save_masks_by_default():
    from lightning_selfish import MaskHistory, TopologyMonitor
    from lightning_selfish_recipes.lm import LanguageModel
    from lightning_selfish_recipes.models import StackedLSTM

    def kinds(**kwargs):
        model = LanguageModel(StackedLSTM(ntoken=10, ninp=4, nhid=4, dropout=0.0), lr=1.0, **kwargs)
        return {type(cb) for cb in model.configure_callbacks()}

    assert {TopologyMonitor, MaskHistory} <= kinds(sparsity={"sparsity": 0.5})
    assert not {TopologyMonitor, MaskHistory} & kinds(
        sparsity={"sparsity": 0.5}, topology_monitor=False, mask_history=False
    )
    assert not {TopologyMonitor, MaskHistory} & kinds()  # dense: nothing to watch


def test_recipes_save_masks_only_beside_a_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pytorch_lightning as pl

    from lightning_selfish_recipes.data import LanguageModelingDataModule
    from lightning_selfish_recipes.lm import LanguageModel
    from lightning_selfish_recipes.models import StackedLSTM

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("a b c d e f\nb c d e f a\n" * 4)
    data = LanguageModelingDataModule("tiny", data_dir=str(corpus), batch_size=2, eval_batch_size=2, bptt=4)
    model = LanguageModel(
        StackedLSTM(ntoken=8, ninp=4, nhid=4, dropout=0.0), lr=1.0, sparsity={"sparsity": 0.5}, checkpoint=False
    )
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, data)
    assert list(tmp_path.iterdir()) == [corpus]  # no masks/ in the working directory


# ------------------------------------------------------------------------------------------------------------
# alignment of every tensor whose rows or columns are aligned units
# ------------------------------------------------------------------------------------------------------------


def renumbered(network, generator: torch.Generator):
    """A copy of a StackedLSTM whose embedding features and every layer's hidden units are renumbered."""
    import copy

    copy_ = copy.deepcopy(network)
    rnn, hidden = network.rnn, network.nhid
    features = torch.randperm(network.ninp, generator=generator)
    units = [torch.randperm(hidden, generator=generator) for _ in range(rnn.num_layers)]
    gate_rows = [torch.cat([gate * hidden + u for gate in range(4)]) for u in units]  # unit j of every gate
    with torch.no_grad():
        copy_.encoder.weight.copy_(network.encoder.weight[:, features])
        for k in range(rnn.num_layers):
            inputs = features if k == 0 else units[k - 1]
            getattr(copy_.rnn, f"weight_ih_l{k}").copy_(getattr(rnn, f"weight_ih_l{k}")[gate_rows[k]][:, inputs])
            getattr(copy_.rnn, f"weight_hh_l{k}").copy_(getattr(rnn, f"weight_hh_l{k}")[gate_rows[k]][:, units[k]])
            for bias in ("bias_ih", "bias_hh"):
                getattr(copy_.rnn, f"{bias}_l{k}").copy_(getattr(rnn, f"{bias}_l{k}")[gate_rows[k]])
        copy_.decoder.weight.copy_(network.decoder.weight[:, units[-1]])
    return copy_


def test_renumbered_units_are_at_distance_zero_in_every_aligned_tensor():
    """The issue's case: after alignment the decoder read 0.655 (chance 0.667) while the LSTM tensors read 0."""
    from lightning_selfish.core.gates import detect_gate_layouts
    from lightning_selfish_recipes.models import StackedLSTM
    from lightning_selfish_recipes.tools.topology_sources import aligned_rows, lstm_unit_activations

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    network = StackedLSTM(ntoken=30, ninp=12, nhid=10, nlayers=2, dropout=0.0).eval()
    other = renumbered(network, g).eval()
    # masks: a weight's position is active where the weight is large, so the copy's masks are renumbered alike
    masks_a = {n: p.abs() > 0.05 for n, p in network.named_parameters() if p.dim() == 2}
    masks_b = {n: p.abs() > 0.05 for n, p in other.named_parameters() if p.dim() == 2}
    gates = {name: list(layout) for name, layout in detect_gate_layouts(network).items()}
    batches = [torch.randint(0, 30, (9, 4), generator=g) for _ in range(6)]
    acts_a, groups = lstm_unit_activations(network, batches)
    acts_b, _ = lstm_unit_activations(other, batches)
    assert groups["encoder.weight"] == (None, "rnn.input") and groups["decoder.weight"] == (None, "rnn.l1")
    rows = aligned_rows((masks_a, gates, acts_a, groups), (masks_b, gates, acts_b, groups))
    assert {row.tensor for row in rows} == set(masks_a)
    for row in rows:
        assert row.aligned and row.distance == 0.0, row
        assert row.partners == 1.0 and row.correlation == pytest.approx(1.0) and not row.poor
    by_position = {row.tensor: row.by_position for row in rows if row.part == "all"}
    assert all(value > 0.2 for value in by_position.values()), by_position  # far apart before alignment


# ------------------------------------------------------------------------------------------------------------
# the figures: every text inside the written picture, no empty axes, and what a short run gets
# ------------------------------------------------------------------------------------------------------------


def drawn_texts(figure):
    """Every text the figure draws: titles, axis labels, the tick labels within the axes' limits, legends."""
    for ax in figure.axes:
        yield from (ax.title, ax.xaxis.label, ax.yaxis.label)
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    yield from (tick.label1, tick.label2)
        if ax.get_legend() is not None:
            yield from (ax.get_legend().get_title(), *ax.get_legend().get_texts())
    for legend in figure.legends:
        yield from (legend.get_title(), *legend.get_texts())
    yield from figure.texts


def assert_readable(figure, png: Path) -> None:
    """``png`` is ``figure`` as drawn, every text of it lies inside the picture, and every plot has data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imread

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    assert imread(png).shape[:2] == (height, width), png.name
    texts = [t for t in drawn_texts(figure) if t.get_visible() and t.get_text()]
    assert texts, png.name
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (
            png.name,
            text.get_text(),
        )
    plots_ = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert plots_, png.name
    for ax in plots_:
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) >= 2]
        assert lines or ax.images or ax.patches, (png.name, "an empty plot")


def test_every_figure_fits_its_picture_and_has_data(runs: tuple[Path, Path, Path], tmp_path: Path):
    from lightning_selfish_recipes.tools.analyze import analyze as run_analysis

    run, other, _ = runs
    result = run_analysis(run, compare=other, out=tmp_path / "out")
    assert set(result.figures) >= {"distance_within.png", "distance_between.png", "magnitude.png", "gate_sparsity.png"}
    for name, figure in result.figures.items():
        assert_readable(figure, tmp_path / "out" / name)
    # Figure 3 against epochs (one point per epoch), the runs named in full in the line-style legend
    magnitude = result.figures["magnitude.png"]
    assert magnitude.axes[0].get_xlabel() == "epoch"
    assert list(magnitude.axes[0].get_lines()[0].get_xdata()) == [0.0, 1.0, 2.0]
    legend_text = " ".join(t.get_text() for legend in magnitude.legends for t in legend.get_texts())
    assert f"{run.parent.name}/{run.name}" in legend_text.replace("\n", "")
    assert f"{other.parent.name}/{other.name}" in legend_text.replace("\n", "")
    # the gate chart shows the whole range of sparsity
    assert result.figures["gate_sparsity.png"].axes[0].get_ylim() == (0.0, 1.0)
    # the mask pictures name the gates and have a colour scale
    mask = result.figures["masks_hh0_start.png"]
    assert [t.get_text() for t in mask.axes[0].get_yticklabels()] == ["i", "f", "g", "o"]
    assert any(ax.get_label() == "<colorbar>" for ax in mask.axes)


def test_a_long_title_is_wrapped_to_the_figure(tmp_path: Path):
    from lightning_selfish.analysis import plots

    title = "Distance to epoch 4 (the paper's 5th), units aligned by activations; chance level 0.79-0.81"
    figure = plots.distance_heatmap([[0.0, 0.1], [0.2, 0.3]], ["ih0", "hh0"], [0, 1], title)
    path = plots.save_figure(figure, tmp_path / "two_columns.png")
    assert "\n" in figure.axes[0].get_title()
    assert_readable(figure, path)


def test_a_short_run_gets_the_figures_it_can_and_says_what_it_left_out(runs, tmp_path: Path, capsys):
    from lightning_selfish_recipes.tools.analyze import analyze as run_analysis

    _, _, short = runs
    result = run_analysis(short, out=tmp_path / "short")
    assert "distance_within.png" not in result.figures and "magnitude.png" not in result.figures
    assert "gate_sparsity.png" in result.figures
    assert any(note.startswith("distance_within.png left out: the run saved one epoch (0)") for note in result.notes)
    assert any(note.startswith("magnitude.png left out") for note in result.notes)
    assert analyze(str(short), "--out", str(tmp_path / "cli")) == 0
    err = capsys.readouterr().err
    assert "selfish-rnn analyze: distance_within.png left out" in err and "magnitude.png left out" in err


def test_epochs_before_the_reference_are_drawn_too(runs, tmp_path: Path):
    from lightning_selfish_recipes.tools.analyze import analyze as run_analysis

    run, _, _ = runs
    result = run_analysis(run, out=tmp_path / "ref", reference_epoch=1)
    within = read_csv(tmp_path / "ref" / "distance_within.csv")
    assert {row["epoch"] for row in within} == {"0", "1", "2"}
    assert all(float(row["distance"]) == 0.0 for row in within if row["epoch"] == "1")
    assert all(float(row["distance"]) > 0.0 for row in within if row["epoch"] == "0" and row["part"] == "all")
    assert "Distance to epoch 1" in result.figures["distance_within.png"].axes[0].get_title()
