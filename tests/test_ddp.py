"""A real 2-process DDP run on CPU (gloo), ranks seeded differently: every rank holds identical masks after every
update (rank 0's seed is shared, rank 0's update decisions broadcast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "ddp_scripts" / "sparsity_ddp.py"


@pytest.mark.subprocess
def test_masks_identical_on_every_rank(tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved0 = torch.load(tmp_path / "masks_rank0.pt")
    saved1 = torch.load(tmp_path / "masks_rank1.pt")
    assert saved0["global_seed"] != saved1["global_seed"]  # each rank drew from its own global RNG
    rank0, rank1 = saved0["history"], saved1["history"]
    assert len(rank0) == len(rank1) == 5  # 4 epoch starts + the end
    for epoch, (a, b) in enumerate(zip(rank0, rank1)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs between ranks at epoch {epoch}"
    assert not torch.equal(rank0[0]["rnn.weight_hh_l0"], rank0[-1]["rnn.weight_hh_l0"])  # the masks did evolve
    # RandomStateCheckpoint gathers every rank's own random state into the one checkpoint rank 0 writes
    ranks = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["RandomStateCheckpoint"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert torch.equal(ranks[0]["torch"], saved0["random_state"])
    assert torch.equal(ranks[1]["torch"], saved1["random_state"])
