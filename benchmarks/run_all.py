"""Every speed figure of the library and the GPU-only tests, in one command: one JSON line per figure.

On a GPU machine (under 8 minutes on one GPU; the figures go to docs/performance.md)::

    python benchmarks/run_all.py --device cuda

and, to check that the script itself works where there is no GPU (tiny sizes, a minute or two)::

    python benchmarks/run_all.py --device cpu --quick

Each figure runs as its own process (a crash or a hang costs one figure, not the run, and a ``--timeout`` bounds
each). Figures, with their targets:

* ``callback_step``: ms per training step, dense and with the callback, stacked LSTM 2 x 1500
  (target: <= 1.03x on a GPU, <= 1.05x on the CPU at hidden 200), and the isolated per-step re-zeroing;
* ``topology_update``: one update of the 66M-parameter stacked LSTM (target: <= 0.1 s on a GPU, <= 2.37 s on one
  CPU thread, i.e. a third of the 7.1 s measured before device-side growth);
* ``sntasgd_step``: SNT-ASGD's averaging step with masks against ``torch.optim.ASGD`` (target: <= 1.15x);
* ``recipe_epoch``: the recipe's epoch (``selfish-rnn fit``'s loop) against a plain PyTorch loop, before and after
  the NT-ASGD trigger, and validation on the averages (target: <= 1.10x on a GPU, <= 1.05x on the CPU);
* ``inference``: sparse inference of the stacked LSTM at densities 0.33 to 0.05, per word (batch 1) and per window
  (batch 20): dense vs CSR (cuSPARSE on a GPU; 2:4 semi-structured as a kernel reference); on the CPU, time per
  word sparse / dense <= 0.5 at density 0.1 and <= 1 at 0.33 (one thread); the compressed export <= 0.4x the dense
  bytes of the masked tensors at density 0.33;
* ``sharded_update``: the same update with the parameters sharded by FSDP2's ``fully_shard`` over 2 processes
  against one process (issue #23): per-rank peak extra memory <= 0.6x the single process's, time <= 1x, the bytes
  sent between ranks, and masks equal to the single process's;
* ``gpu_tests``: ``pytest -m gpu`` (on the CPU: the CPU variants of the same tests).

A final ``summary`` line lists every figure against its target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def figures(device: str, quick: bool) -> list[tuple[str, list[str]]]:
    """(name, command) of every figure; ``quick`` shrinks the sizes so the whole run takes a minute or two."""
    python = sys.executable
    hidden = "32" if quick else ("1500" if device == "cuda" else "200")
    threads = ["--threads", "1"] if device == "cpu" else []
    callback = [python, str(HERE / "bench_callback.py"), "--device", device, "--hidden", hidden, *threads]
    callback += ["--vocab", "1000", "--steps", "12", "--warmup", "2", "--rounds", "1"] if quick else ["--rounds", "3"]
    update = [python, str(HERE / "bench_update.py"), "--device", device, *threads]
    update += ["--hidden", "64", "--vocab", "1000", "--repeats", "1"] if quick else []
    sntasgd = [python, str(HERE / "bench_sntasgd.py"), "--device", device]
    sntasgd += ["--scale", "0.02", "--rounds", "3", "--warmup", "1"] if quick else []
    epoch = [python, str(HERE / "bench_epoch.py"), "--device", device, "--hidden", hidden, *threads]
    epoch += ["--phases", "sgd,averaging"]
    epoch += ["--steps", "12", "--warmup", "2", "--rounds", "1", "--val-batches", "3"] if quick else []
    inference = [python, str(HERE / "bench_inference.py"), "--device", device, *threads]
    inference += ["--quick"] if quick else []
    sharded = [python, str(HERE / "bench_sharded.py"), "--device", device]
    sharded += ["--small"] if quick else []
    if device == "cuda":
        tests = [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    else:
        tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_devices.py")]
    return [
        ("callback_step", callback),
        ("topology_update", update),
        ("sntasgd_step", sntasgd),
        ("recipe_epoch", epoch),
        ("inference", inference),
        ("sharded_update", sharded),
        ("gpu_tests", tests),
    ]


def targets(name: str, line: dict, device: str) -> list[dict]:
    """The target checks that one JSON line of a figure carries."""
    checks = []
    gpu = device == "cuda"
    if name == "callback_step" and "overhead_ratio" in line:
        checks.append(("callback step / dense step", line["overhead_ratio"], 1.03 if gpu else 1.05))
    if name == "topology_update" and "update_s" in line:
        checks.append(("66M topology update, s", line["update_s"], 0.1 if gpu else 2.37))
    if name == "sntasgd_step" and "sntasgd_masked_over_asgd" in line:
        checks.append(("SNT-ASGD / ASGD", line["sntasgd_masked_over_asgd"], 1.15))
    if name == "recipe_epoch" and "ratio" in line:
        checks.append((f"recipe / plain loop ({line['phase']})", line["ratio"], 1.10 if gpu else 1.05))
        if "validation_ratio" in line:
            checks.append(("recipe / plain validation", line["validation_ratio"], 1.10 if gpu else 1.05))
    if name == "inference" and line.get("part") == "export" and line["density"] == 0.33:
        what = "compressed / dense bytes of the masked tensors, density 0.33"
        checks.append((what, line["masked_tensors_ratio"], 0.4))
    if name == "inference" and not gpu and line.get("part") == "generation" and line.get("threads") == 1:
        # as time per word: sparse / dense <= 0.5 (at least 2x the words per second) at density 0.1, <= 1 at 0.33
        limit = {0.1: 0.5, 0.33: 1.0}.get(line["density"])
        if limit is not None:
            what = f"sparse / dense time per word, density {line['density']}"
            checks.append((what, 1 / line["sparse_vs_dense"], limit))
    if name == "sharded_update" and "time_ratio" in line:
        what = f"sharded / single-process update ({line['method']}, {line['ranks']} ranks)"
        checks.append((f"{what}: time", line["time_ratio"], 1.0))
        if line["memory_ratio"] is not None:
            checks.append((f"{what}: peak extra memory per rank", line["memory_ratio"], 0.6))
    return [{"figure": what, "value": value, "target": limit, "met": value <= limit} for what, value, limit in checks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--only", default=None, help="comma-separated figure names to run")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds allowed to each figure")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    selected = set(args.only.split(",")) if args.only else None
    checks: list[dict] = []
    failed = []
    for name, command in figures(args.device, args.quick):
        if selected is not None and name not in selected:
            continue
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as expired:
            returncode, stdout, stderr = "timeout", expired.stdout or "", expired.stderr or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        seconds = round(time.perf_counter() - start, 1)
        if name == "gpu_tests":
            tail = [line for line in stdout.splitlines() if line.strip()][-1:] or [""]
            print(json.dumps({"figure": name, "returncode": returncode, "result": tail[0], "seconds": seconds}))
        else:
            for text in stdout.splitlines():
                if text.startswith("{"):
                    line = json.loads(text)
                    print(json.dumps({"figure": name, **line}), flush=True)
                    checks += targets(name, line, args.device)
        if returncode != 0:
            failed.append(name)
            print(json.dumps({"figure": name, "returncode": returncode, "stderr_tail": stderr[-2000:]}), flush=True)
        print(json.dumps({"figure": name, "done": True, "seconds": seconds}), flush=True)
    print(json.dumps({"summary": checks, "failed": failed, "device": args.device, "quick": args.quick}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
