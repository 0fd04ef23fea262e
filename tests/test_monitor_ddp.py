"""TopologyMonitor and MaskHistory in a real 2-process DDP run on CPU (gloo): rank-zero output, identical state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_selfish.callbacks.history import load_mask_history

SCRIPT = Path(__file__).parent / "ddp_scripts" / "monitor_ddp.py"


def test_monitor_logs_once_and_keeps_identical_state_on_every_rank(tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"monitor_rank{r}.pt") for r in (0, 1))
    assert rank0["num_updates"] == rank1["num_updates"] == 2
    for key in ("initial", "ever_active"):
        for name, packed in rank0[key].items():
            assert torch.equal(packed["bits"], rank1[key][name]["bits"]), (key, name)
    run = tmp_path / "ddp" / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # rank zero writes, rank one does not
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("exploration/overall")] == [0, 8, 16]  # 8 steps per epoch and rank
    assert len(events.Images("masks/rnn.weight_hh_l0")) == 3 and len(events.Images("gates/sparsity")) == 1
    assert sorted(load_mask_history(run / "masks")) == [0, 1, 2]
