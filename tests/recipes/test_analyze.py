"""``selfish-rnn analyze`` on the output of real tiny runs of the ``selfish-rnn fit`` command."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch

from recipes.cli import CONFIG_DIR, TOOL_COMMANDS, build_cli, main
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
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 3-epoch runs of a tiny sparse stacked LSTM, one mask init, two training seeds, checkpoints every epoch."""
    root = tmp_path_factory.mktemp("analyze")
    corpus = root / "corpus"
    corpus.mkdir()
    write_random_corpus(corpus, seed=1, vocab=15)
    extra = root / "every_epoch.yaml"
    extra.write_text(EVERY_EPOCH)
    paths = []
    for seed in (1, 2):
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
            "--trainer.max_epochs=3",
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
    return paths[0], paths[1]


def analyze(*args: str) -> int:
    """``selfish-rnn analyze ARGS`` through the console script's entry point; returns the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *args])
    return exit_info.value.code


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_analyze_writes_every_figure_and_table_it_promises(runs: tuple[Path, Path], tmp_path: Path):
    run, other = runs
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
    within = read_csv(out / "distance_within.csv")
    assert {row["epoch"] for row in within} == {"0", "1", "2"}  # the earliest epoch is the reference here
    assert all(float(row["distance"]) == 0.0 for row in within if row["epoch"] == "0")
    hh = [float(r["distance"]) for r in within if r["tensor"] == "network.rnn.weight_hh_l0" and r["part"] == "all"]
    assert hh[0] == 0.0 and all(0.0 < d <= 1.0 for d in hh[1:])  # the topology moves away from where it started
    assert {r["part"] for r in within if r["tensor"] == "network.rnn.weight_hh_l0"} == {"all", "i", "f", "g", "o"}
    assert {r["aligned"] for r in within} == {"0"}
    assert all(0.79 < float(r["chance"]) < 0.81 for r in within if r["part"] == "all")  # 2(1-d)/(2-d), d = 0.33
    between = read_csv(out / "distance_between.csv")
    first = [float(r["distance"]) for r in between if r["epoch"] == "0"]
    last = [float(r["distance"]) for r in between if r["epoch"] == "2" and r["part"] == "all"]
    assert first and all(d == 0.0 for d in first)  # one mask seed: the same initial topology
    assert all(0.0 <= d <= 1.0 for d in last) and any(d > 0 for d in last)  # different seeds, different updates
    table = (out / "gate_sparsity.md").read_text().splitlines()
    assert table[0] == "| tensor | i | f | g | o | whole tensor |"
    assert any(line.startswith("| network.rnn.weight_hh_l1 |") for line in table)


def test_analyze_aligns_units_by_activations_from_checkpoints(runs: tuple[Path, Path], tmp_path: Path):
    run, other = runs
    out = tmp_path / "aligned"
    code = analyze(str(run), "--compare", str(other), "--align", "activations", "--max-batches", "5", "--out", str(out))
    assert code == 0
    within = read_csv(out / "distance_within.csv")
    recurrent = [r for r in within if ".rnn.weight_" in r["tensor"]]
    assert recurrent and {r["aligned"] for r in recurrent} == {"1"}
    assert {r["aligned"] for r in within if r["tensor"] == "network.decoder.weight"} == {"0"}
    assert all(float(r["distance"]) == 0.0 for r in within if r["epoch"] == "0")  # aligned with itself
    between = read_csv(out / "distance_between.csv")
    assert all(0.0 <= float(r["distance"]) <= 1.0 for r in between)
    assert (out / "distance_between.png").read_bytes()[:8] == PNG


def test_analyze_errors_name_what_is_missing(runs: tuple[Path, Path], tmp_path: Path, capsys):
    run, _ = runs
    assert analyze(str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert analyze(str(run), "--reference-epoch", "7", "--out", str(tmp_path / "x")) == 2
    assert "saved epochs: [0, 1, 2]" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert analyze(str(empty), "--align", "activations") == 2
    assert "ModelCheckpoint(every_n_epochs=1, save_top_k=-1)" in capsys.readouterr().err


def test_replayed_lstm_layers_are_the_modules_own_activations():
    from recipes.analyze import lstm_unit_activations
    from recipes.models import StackedLSTM

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
    from recipes.lm import LanguageModel
    from recipes.models import StackedLSTM

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

    from recipes.data import LanguageModelingDataModule
    from recipes.lm import LanguageModel
    from recipes.models import StackedLSTM

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
