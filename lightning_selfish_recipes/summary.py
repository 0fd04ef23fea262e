"""What ``selfish-rnn`` reports when ``fit`` or ``test`` ends: the result, where it is, and what to run next.

Computed once, after the run (nothing here runs per step), from the trainer's checkpoint callback, the
``NonMonotonicTrigger`` and the ``SelfishSparsityCallback`` of the run.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch

from lightning_selfish.callbacks.sparsity import SelfishSparsityCallback
from lightning_selfish.callbacks.trigger import NonMonotonicTrigger

__all__ = ["best_validation", "fit_summary", "latest_checkpoint", "test_summary"]


def best_validation(trainer: Any) -> tuple[float, int, str] | None:
    """``(perplexity, epoch, path)`` of the best ``val_loss`` checkpoint of this run, or None without one.

    The perplexity is ``exp`` of the checkpoint callback's ``best_model_score`` in float32, the very value the
    model logged as ``val_ppl`` for that epoch; the epoch (counting from 0, as in the checkpoint's file name) is
    read from the checkpoint file.
    """
    callback = next((cb for cb in _checkpoint_callbacks(trainer) if cb.monitor == "val_loss"), None)
    path = getattr(callback, "best_model_path", "") or ""
    score = getattr(callback, "best_model_score", None)
    if not path or score is None or not Path(path).is_file():
        return None
    perplexity = float(torch.exp(torch.as_tensor(score).detach().cpu()))
    return perplexity, _epoch_of(path), path


def latest_checkpoint(trainer: Any) -> tuple[int, str] | None:
    """``(epoch, path)`` of the run's latest-epoch checkpoint (the recipes' ``last.ckpt``: a ``ModelCheckpoint``
    without a monitor, :func:`lightning_selfish_recipes.lm.run_checkpoints`), or None without one."""
    for callback in _checkpoint_callbacks(trainer):
        path = Path(getattr(callback, "best_model_path", "") or "")
        if callback.monitor is None and path.stem == callback.CHECKPOINT_NAME_LAST and path.is_file():
            return _epoch_of(str(path)), str(path)
    return None


def _checkpoint_callbacks(trainer: Any) -> list[Any]:
    return [cb for cb in getattr(trainer, "checkpoint_callbacks", []) if hasattr(cb, "monitor")]


def _epoch_of(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"])


def fit_summary(trainer: Any, model: Any) -> str:
    """The end-of-``fit`` report: best validation perplexity, its epoch and checkpoint, the latest epoch's
    checkpoint, averaging start, final per-gate sparsity of the recurrent weights, and the ``selfish-rnn test``
    command to run next."""
    lines = ["", "selfish-rnn fit: done"]
    best = best_validation(trainer)
    if best is not None:
        perplexity, epoch, path = best
        lines.append(f"  best validation perplexity  {perplexity:.4f} (epoch {epoch}, counting from 0)")
        lines.append(f"  best checkpoint             {path}")
    elif "val_ppl" in trainer.callback_metrics:
        lines.append(f"  last validation perplexity  {float(trainer.callback_metrics['val_ppl']):.4f} (no checkpoint)")
    latest = latest_checkpoint(trainer)
    if latest is not None:
        lines.append(f"  last checkpoint             {latest[1]} (epoch {latest[0]}; --ckpt_path last resumes from it)")
    trigger = next((cb for cb in trainer.callbacks if isinstance(cb, NonMonotonicTrigger)), None)
    if trigger is not None:
        started = trigger.averaging_started_epoch
        state = f"started at the end of epoch {started}" if started is not None else "not started"
        lines.append(f"  SNT-ASGD averaging          {state}")
    sparsity = next((cb for cb in trainer.callbacks if isinstance(cb, SelfishSparsityCallback)), None)
    if sparsity is not None and sparsity.engine is not None:
        report = sparsity.engine.sparsity_report()
        lines.append(f"  final sparsity              {report['overall']:.4f} overall; recurrent weights per gate:")
        for name, record in sparsity.engine.tensors.items():
            if record.gates:
                gates = ", ".join(f"{gate} {report[f'{name}/{gate}']:.4f}" for gate, _ in record.gates)
                lines.append(f"    {name}: {report[name]:.4f} | {gates}")
    if best is not None:
        config = Path(trainer.log_dir or ".") / "config.yaml"
        config_arg = shlex.quote(str(config)) if config.is_file() else "<your config>"
        lines.append(f"  next: selfish-rnn test --config {config_arg} --ckpt_path {shlex.quote(best[2])}")
    return "\n".join(lines)


def test_summary(trainer: Any) -> str:
    """The end-of-``test`` line: the test perplexity and the checkpoint it belongs to."""
    metrics = trainer.callback_metrics
    if "test_ppl" not in metrics:
        return "selfish-rnn test: no test_ppl was logged"
    source = f" (checkpoint {trainer.ckpt_path})" if trainer.ckpt_path else ""
    return f"selfish-rnn test: test perplexity {float(metrics['test_ppl']):.4f}{source}"
