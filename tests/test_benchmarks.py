"""``benchmarks/run_all.py`` is ready for a GPU machine: run on the CPU at tiny sizes, every figure prints its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["callback_step", "topology_update", "sntasgd_step", "recipe_epoch", "inference"]


def test_run_all_quick_on_cpu_prints_every_figure_and_a_summary() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--device",
            "cpu",
            "--quick",
            "--only",
            ",".join(FIGURES),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    measured = {line["figure"] for line in lines if "figure" in line and "done" not in line}
    assert measured == set(FIGURES)
    summary = lines[-1]
    assert summary["failed"] == [] and summary["quick"] is True
    names = {check["figure"] for check in summary["summary"]}
    assert {"callback step / dense step", "SNT-ASGD / ASGD", "recipe / plain loop (sgd)"} <= names
    assert "recipe / plain loop (averaging)" in names and "recipe / plain validation" in names
    update = next(line for line in lines if line.get("figure") == "topology_update" and "update_s" in line)
    assert update["update_s"] > 0 and update["previous_update_s"] > 0
    inference = [line for line in lines if line.get("figure") == "inference" and "part" in line]
    assert {line["part"] for line in inference} == {"export", "kernel", "crossover", "generation", "evaluation"}
    assert all(line["exact_round_trip"] for line in inference if line["part"] == "export")
    assert "compressed / dense bytes of the masked tensors, density 0.33" in names
    generation = [line for line in inference if line["part"] == "generation"]
    assert sorted(line["density"] for line in generation) == [0.05, 0.1, 0.2, 0.33]
    assert all(line["same_words"] for line in generation)
    assert "sparse / dense time per word, density 0.1" in names
