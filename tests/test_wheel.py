"""The wheel as a user installs it: built from this checkout, installed into a fresh virtual environment, and one
short ``selfish-rnn fit`` from another folder on the packaged quickstart config and the bundled corpus.

The environment sees the installed torch and Lightning (``--system-site-packages``, and the site directories of the
interpreter running the tests, in case that one is itself a virtual environment) but imports this project from the
wheel only: the test checks where the packages were imported from. Offline: nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.subprocess

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_selfish", "lightning_selfish_recipes")
#: What the wheel is built from: the project's metadata and its two packages.
SOURCES = ("pyproject.toml", "README.md", *PACKAGES)


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The timeout only guards against a hang; nothing here measures time.
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built from a copy (a ``build/`` folder left in the checkout is not read)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    dist = root / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    run([*command, str(source), "-w", str(dist)], cwd=root)
    (built,) = dist.glob("lightning_selfish-*.whl")
    return built


@pytest.fixture(scope="module")
def environment(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A fresh virtual environment with the wheel installed: its ``bin``, its site-packages and a clean environ."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv).stdout.strip()
    )
    # the test interpreter's own site-packages (torch, Lightning, pip), after the environment's own
    (purelib / "outer_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    environ = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    environ.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)]
    run(install, cwd=venv.parent, env=environ)
    return venv / "bin", purelib, environ


def test_the_wheel_holds_the_two_packages_their_data_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {*PACKAGES, entry_points.split("/")[0]}  # no top-level `recipes`, nor tests, nor benchmarks
    assert "selfish-rnn = lightning_selfish_recipes.cli:main" in scripts
    for data in ("configs/quickstart.yaml", "configs/methods/rigl.yaml", "corpora/ptb.tar.xz", "corpora/SHA256SUMS"):
        assert f"lightning_selfish_recipes/{data}" in names, data


def test_an_installed_wheel_fits_from_another_folder_with_its_own_config_and_corpus(
    environment: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, purelib, environ = environment
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {**environ, "LIGHTNING_SELFISH_CACHE": str(tmp_path / "cache")}  # empty: the bundled corpus is extracted

    where = run(
        [
            str(bin_dir / "python"),
            "-c",
            f"import {', '.join(PACKAGES)}; print({PACKAGES[0]}.__file__); print({PACKAGES[1]}.__file__)",
        ],
        elsewhere,
        environ,
    )
    for imported in where.stdout.split():
        assert Path(imported).is_relative_to(purelib), f"imported from {imported}, not from the wheel in {purelib}"
    record = run([str(bin_dir / "python"), "-m", "pip", "show", "-f", "lightning-selfish"], elsewhere, environ).stdout
    assert "lightning_selfish_recipes/cli.py" in record and "\n  recipes/" not in record

    config = purelib / "lightning_selfish_recipes" / "configs" / "quickstart.yaml"
    fit = run(
        [str(bin_dir / "selfish-rnn"), "fit", "--config", str(config)]
        + ["--model.network.init_args.ninp=8", "--model.network.init_args.nhid=8", "--model.sparsity.update_every=2"]
        + ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]
        + ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.download=false"],
        elsewhere,
        environ,
    )
    text = fit.stdout + fit.stderr
    assert "Extracting bundled corpus ptb" in text and "selfish-rnn fit: done" in text, text
    (saved,) = elsewhere.glob("lightning_logs/quickstart/*/version_0/config.yaml")
    assert (
        yaml.safe_load(saved.read_text())["model"]["network"]["class_path"]
        == "lightning_selfish_recipes.models.StackedLSTM"
    )
    assert (saved.parent / "checkpoints" / "last.ckpt").is_file()
