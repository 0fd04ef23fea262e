"""Runs of earlier versions, whose recipes were the top-level package ``recipes``: the tools that read a run folder
still read them, and ``selfish-rnn fit``/``test`` refuse their saved config in one line naming the new class path.

The old run is a run of this version with the one thing an earlier version wrote differently: ``class_path:
recipes.models.StackedLSTM`` (in ``config.yaml``, ``hparams.yaml`` and the checkpoints' hyperparameters; a run of
the version before the rename holds no other reference to the package: no pickled class of it). ``recipes`` is made
unimportable, as for a user who no longer has it (or has another project's ``recipes`` installed).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_selfish_recipes import old_names
from lightning_selfish_recipes.cli import CONFIG_DIR, build_cli, main
from lightning_selfish_recipes.lm import LanguageModel
from lightning_selfish_recipes.old_names import current_class_path, with_current_class_paths
from lightning_selfish_recipes.tools.export import export_run, load_network
from lightning_selfish_recipes.tools.results import collect_runs
from tests.conftest import write_random_corpus

NEW = "lightning_selfish_recipes.models.StackedLSTM"
OLD = "recipes.models.StackedLSTM"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def no_old_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "recipes", None)  # `import recipes...` raises ModuleNotFoundError


def make_old(version: Path) -> None:
    """Turn a run's version directory into what an earlier version left: the old class path, nothing else."""
    for name in ("config.yaml", "hparams.yaml"):
        text = (version / name).read_text()
        assert f"class_path: {NEW}" in text
        (version / name).write_text(text.replace(f"class_path: {NEW}", f"class_path: {OLD}"))
    for path in (version / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["hyper_parameters"]["network"]["class_path"] == NEW
        checkpoint["hyper_parameters"]["network"]["class_path"] = OLD
        torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 2-epoch sparse run of the quickstart config (tiny network and corpus, a checkpoint every epoch) as an
    earlier version saved it; and the arguments that trained it."""
    root = tmp_path_factory.mktemp("old_run")
    corpus = root / "corpus"
    corpus.mkdir()
    write_random_corpus(corpus, seed=1, vocab=15)
    args = [
        "--config",
        str(CONFIG_DIR / "quickstart.yaml"),
        "--config",
        str(CONFIG_DIR / "analysis" / "every_epoch_checkpoints.yaml"),
        "--model.network.init_args.ninp=8",
        "--model.network.init_args.nhid=8",
        "--model.sparsity.update_every=2",
        "--data.corpus=tiny",
        f"--data.data_dir={corpus}",
        "--data.batch_size=4",
        "--data.eval_batch_size=4",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        *QUIET,
    ]
    with warnings.catch_warnings():  # (a module fixture runs outside conftest's per-test quieting)
        warnings.simplefilter("ignore")
        cli = build_cli(["fit", *args, "--trainer.max_epochs=2"])
    version = Path(cli.trainer.log_dir)
    make_old(version)
    return version, args


def test_the_old_package_name_maps_to_the_new_one_and_nothing_else() -> None:
    assert current_class_path(OLD) == NEW
    for unchanged in (NEW, "my_recipes.models.X", "recipes", "recipesx.models.X", "TensorBoardLogger"):
        assert current_class_path(unchanged) == unchanged
    saved = {"network": {"class_path": OLD, "init_args": {"class_path": "recipes.x.Y"}}, "list": [{"_class_path": OLD}]}
    assert with_current_class_paths(saved) == {
        "network": {"class_path": NEW, "init_args": {"class_path": "lightning_selfish_recipes.x.Y"}},
        "list": [{"_class_path": NEW}],
    }
    assert saved["network"]["class_path"] == OLD  # a copy: the caller's config is left as it was


def one_error_line(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Corpus" not in captured.out + captured.err  # refused before the corpus is read
    return lines[0]


def refusal(path: Path, update: Path) -> str:
    return (
        f"error: {path} names class_path {OLD}, now {NEW} (the recipes' package was renamed from recipes to "
        f"lightning_selfish_recipes): update it once with python -m lightning_selfish_recipes.old_names {update}"
    )


@pytest.mark.parametrize("command", ["fit", "test"])
def test_the_cli_refuses_an_old_saved_config_in_one_line_naming_the_new_path(
    old_run: tuple[Path, list[str]], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    version, _ = old_run
    config = version / "config.yaml"
    before = sorted(version.parent.iterdir())
    last = str(version / "checkpoints" / "last.ckpt")
    line = one_error_line(capsys, [command, "--config", str(config), "--ckpt_path", last])
    assert line == refusal(config, version)  # the run's directory: its checkpoints too
    assert one_error_line(capsys, [command, f"--config={config}"]) == line
    assert sorted(version.parent.iterdir()) == before  # no new log version


@pytest.mark.parametrize("command", ["fit", "test"])
def test_the_cli_refuses_an_old_checkpoint_in_one_line_naming_the_new_path(
    old_run: tuple[Path, list[str]], command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, args = old_run
    last = version / "checkpoints" / "last.ckpt"
    line = one_error_line(capsys, [command, *args, "--ckpt_path", str(last)])  # today's config, an old checkpoint
    assert line == refusal(last, version)
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"model:\n  network:\n    class_path: {OLD}\n")
    assert one_error_line(capsys, [command, *args, "--config", str(mine)]) == refusal(mine, mine)


def test_an_old_run_updated_once_resumes_and_loads(
    old_run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = tmp_path / "run" / "version_0"
    shutil.copytree(old_run[0], version)
    assert old_names.main([str(version)]) == 0
    updated = capsys.readouterr().out.split()
    checkpoints = sorted(str(p) for p in (version / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 3  # epoch 0 and epoch 1 (every_epoch_checkpoints; one of them is the best), last
    assert sorted(updated[1::2]) == sorted([*checkpoints, str(version / "config.yaml"), str(version / "hparams.yaml")])
    text = (version / "config.yaml").read_text()
    assert f"class_path: {NEW}" in text and "recipes.models" not in text.replace(NEW, "")
    assert text.startswith("# pytorch_lightning==")  # the rest of the file as it was
    assert old_names.main([str(version)]) == 0 and "nothing names recipes." in capsys.readouterr().out
    assert old_names.main([str(version / "masks" / "init.pt")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {version / 'masks' / 'init.pt'}: not a checkpoint (.ckpt) or a YAML config (.yaml, .yml)\n"
    )
    assert old_names.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such run directory or file\n"

    last = version / "checkpoints" / "last.ckpt"
    assert type(LanguageModel.load_from_checkpoint(last).network).__name__ == "StackedLSTM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_cli(
            ["fit", "--config", str(version / "config.yaml"), *QUIET, "--trainer.max_epochs=3"]
            + [f"--trainer.logger.init_args.save_dir={tmp_path}", "--ckpt_path", str(last)]
        )
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step > 0


def test_results_reads_an_old_run_as_the_same_run_under_the_new_name(old_run: tuple[Path, list[str]]) -> None:
    version, _ = old_run
    (old,) = collect_runs(version.parent)
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["model"]["network"]["class_path"] == OLD  # the run folder is read, not rewritten
    assert old.settings is not None and old.settings["network"] == "StackedLSTM"
    assert old.settings["network.nhid"] == 8 and old.settings["network.dropout"] == 0.0  # the class's defaults, too
    assert old.best_val_ppl is not None and old.epochs_done == 2


def test_export_and_generate_read_an_old_run_and_write_the_new_name(
    old_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    version, _ = old_run
    for format in ("dense", "compressed"):
        written = export_run(version, format, tmp_path / f"model.{format}.pt")
        loaded = load_network(written["out"])  # what `selfish-rnn generate` loads
        assert type(loaded.network).__module__ == "lightning_selfish_recipes.models.stacked_lstm"
    exported = torch.load(tmp_path / "model.dense.pt", weights_only=False)
    assert exported["hyper_parameters"]["network"]["class_path"] == NEW
    assert type(load_network(version).network).__name__ == "StackedLSTM"  # the run directory itself


def test_analyze_aligns_an_old_run_by_activations(
    old_run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, _ = old_run
    out = tmp_path / "figures"
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(version), "--align", "activations", "--max-batches", "2", "--out", str(out)])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert (out / "distance_within.csv").is_file()
