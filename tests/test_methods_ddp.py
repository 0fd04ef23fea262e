"""2-process DDP on CPU (gloo) for the across-layer methods: identical masks and random streams on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "ddp_scripts" / "methods_ddp.py"


@pytest.mark.parametrize("method", ["dsr", "snfs"])
def test_across_layer_methods_keep_ranks_identical(method: str, tmp_path: Path):
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "masks_rank0.pt")
    rank1 = torch.load(tmp_path / "masks_rank1.pt")
    assert len(rank0) == len(rank1) == 6  # 4 epoch starts, the end, the generator and threshold
    for epoch, (a, b) in enumerate(zip(rank0, rank1)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs between ranks at record {epoch}"
    first, last = rank0[0], rank0[4]
    counts = {name: (int(first[name].sum()), int(last[name].sum())) for name in first}
    assert sum(c for c, _ in counts.values()) == sum(c for _, c in counts.values())  # the total is exact
    assert any(a != b for a, b in counts.values())  # and counts did move between tensors
