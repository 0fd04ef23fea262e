"""``benchmarks/run_all.py`` is ready for a GPU machine: run on the CPU at tiny sizes, every figure prints its JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run_all)
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


def test_bench_sharded_small_prints_every_figure_and_the_sharded_masks_equal_the_single_process_masks() -> None:
    """``bench_sharded.py --small`` (what ``run_all.py --quick`` runs): two gloo ranks holding the model sharded by
    ``fully_shard`` and one process holding it whole, one line per method, every figure present and the masks
    after every update equal (the script compares each rank's rows with the single process's masks)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), "--small"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["method"] for line in lines] == ["selfish", "rigl"]
    for line in lines:
        assert line["masks_equal"] is True
        assert line["ranks"] == 2 and line["threads"] == 1
        assert line["single_update_s"] > 0 and line["sharded_update_s"] > 0 and line["time_ratio"] > 0
        assert line["single_extra_mb"] > 0 and len(line["sharded_extra_mb_per_rank"]) == 2
        assert "memory_ratio" in line
        # counts cross ranks, through the library's collective only: the same on both ranks, below the weights' bytes
        assert line["sent_bytes_per_rank"][0] == line["sent_bytes_per_rank"][1] > 0
        assert line["torch_distributed_bytes_per_rank"] == line["sent_bytes_per_rank"]
        assert line["sent_bytes_per_rank"][0] < line["sparsified"] * 4
    names = {check["figure"] for check in run_all.targets("sharded_update", lines[0], "cpu")}
    assert names == {
        "sharded / single-process update (selfish, 2 ranks): time",
        "sharded / single-process update (selfish, 2 ranks): peak extra memory per rank",
    }
