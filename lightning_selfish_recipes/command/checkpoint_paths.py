"""Checkpoint paths of ``selfish-rnn``: ``--ckpt_path best`` / ``last`` resolved in a fresh process from the newest run
of the same logger name, a run continued in its own log version directory, and a checkpoint file that is not there
refused before any work."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lightning_selfish_recipes.compat import module

rank_zero_warn = module("utilities.rank_zero").rank_zero_warn

__all__ = [
    "check_checkpoint_path",
    "checkpoint_global_step",
    "config_log_root",
    "continue_log_version",
    "resolve_checkpoint",
    "resolve_checkpoint_in",
]


#: ``--ckpt_path`` values that are no file: this command's ``best``/``last`` and Lightning's ``hpc``/``registry``.
_CHECKPOINT_WORDS = ("best", "last", "hpc", "registry")


def check_checkpoint_path(ckpt_path: Any) -> None:
    """Refuse a ``--ckpt_path`` file that is not there, before the corpus is read and a log folder is made.

    Lightning finds out only when it restores the checkpoint: after the data, the Trainer and the run's log
    version directory exist. Remote paths (``s3://...``) and Lightning's keywords are left to Lightning.
    """
    if ckpt_path is None or "://" in str(ckpt_path):
        return
    text = str(ckpt_path)
    if text.lower() in _CHECKPOINT_WORDS or text.lower().startswith("registry:"):
        return
    path = Path(text)
    if not path.is_file():
        found = "a directory, not a checkpoint file" if path.is_dir() else "no such checkpoint file"
        raise FileNotFoundError(
            f"--ckpt_path {text}: {found} (give the path of a .ckpt file, or best / last for the newest run of this "
            "config's logger name)"
        )


def resolve_checkpoint(trainer: Any, which: str, require: bool = True) -> Path | None:
    """The ``best`` or ``last`` checkpoint of the newest earlier run logged under the trainer's logger name.

    See :func:`resolve_checkpoint_in`; the runs' root is the logger's ``root_dir``.
    """
    return resolve_checkpoint_in(_runs_root(trainer), which, require)


def resolve_checkpoint_in(root: Path, which: str, require: bool = True) -> Path | None:
    """The ``best`` or ``last`` checkpoint of the newest run under ``root`` (a logger's ``<save_dir>/<name>``).

    Runs are ``<root>/version_*``; the newest one that has ``checkpoints/last.ckpt`` is used. ``last`` is that file:
    the run's latest epoch, which the recipes rewrite after every epoch
    (:func:`lightning_selfish_recipes.lm.run_checkpoints`). A
    ``last.ckpt`` written instead by a ``ModelCheckpoint`` with a monitor and ``save_last=True`` (runs of earlier
    recipes, or a checkpoint callback of your own) holds the last epoch whose validation *improved*, which may be
    older than the run's end: that is said in a warning. ``best`` is read from the file's monitored
    ``ModelCheckpoint`` state (``best_model_path``). Returns None when nothing is found and ``require`` is False;
    raises ``FileNotFoundError`` otherwise.
    """
    candidates = sorted(root.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        if not require:
            return None
        raise FileNotFoundError(
            f"--ckpt_path {which}: no earlier run with a last.ckpt under {root}. Train first (selfish-rnn fit with "
            "the same config and logger name), or pass the path of a checkpoint file."
        )
    last = candidates[-1]
    checkpoint = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    states = [
        state
        for key, state in checkpoint.get("callbacks", {}).items()
        if key.startswith("ModelCheckpoint") and isinstance(state, dict)
    ]
    if which == "last":
        if not any(s.get("monitor") is None and Path(s.get("best_model_path") or "").name == last.name for s in states):
            rank_zero_warn(
                f"--ckpt_path last: {last} (epoch {checkpoint.get('epoch')}) was not written as the run's latest "
                "epoch but by a ModelCheckpoint with a monitor and save_last=True, which Lightning writes only when "
                "that checkpoint improves: it is the last epoch whose validation improved, and the epochs after it "
                "are trained again. Runs of the current recipes keep the latest epoch in last.ckpt"
            )
        return last
    for state in states:
        if state.get("monitor") is not None and state.get("best_model_path"):
            best = Path(state["best_model_path"])
            if best.is_file():
                return best
            raise FileNotFoundError(f"--ckpt_path best: {last} names {best} as the best checkpoint, which is missing")
    raise FileNotFoundError(
        f"--ckpt_path best: {last} records no best checkpoint (was a val_loss monitor configured?); pass a path"
    )


def _runs_root(trainer: Any) -> Path:
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root is None:
        return Path(trainer.default_root_dir) / "lightning_logs"
    return Path(root)


def config_log_root(trainer_config: Any) -> Path | None:
    """``<save_dir>/<name>`` of the configured logger (a TensorBoard or CSV logger), before it exists."""
    logger = trainer_config.get("logger")
    init_args = getattr(logger, "init_args", None)
    if init_args is None or init_args.get("save_dir") is None or "version" not in init_args:
        return None
    return Path(init_args["save_dir"]) / (init_args.get("name") or "")


def continue_log_version(trainer_config: Any, root: Path, ckpt_path: Path) -> bool:
    """Log to the version directory that holds ``ckpt_path`` (``<root>/<version>/checkpoints/<file>``).

    Besides keeping one run's curves in one place, the checkpoint callback then finds its own directory again
    and restores its whole state (top-k, last) instead of warning that the directory changed. Returns whether
    the version was set.
    """
    init_args = trainer_config["logger"].init_args
    version_dir = ckpt_path.resolve().parent.parent
    if init_args.get("version") is not None or ckpt_path.resolve().parent.name != "checkpoints":
        return False
    if version_dir.parent != root.resolve():
        return False
    match = re.fullmatch(r"version_(\d+)", version_dir.name)
    init_args["version"] = int(match.group(1)) if match else version_dir.name
    return True


def checkpoint_global_step(ckpt_path: Any) -> int:
    """The optimizer steps a checkpoint has already trained (0 without one)."""
    if not ckpt_path:
        return 0
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    return int(checkpoint.get("global_step", 0))
