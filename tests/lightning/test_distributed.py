"""DDP with two CPU processes (gloo): every rank holds byte-identical edited weights after each application."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_ddp_rank_zero_solves_and_ranks_hold_identical_weights_after_every_application(tmp_path):
    script = Path(__file__).with_name("ddp_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["solver_calls"] for r in results] == [1, 0]  # rank 0 solves once (one space); rank 1 never
    ranks = [r["applications"] for r in results]
    assert [a["reason"] for a in ranks[0]] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    assert ranks[0] == ranks[1]  # same applications, same weight hashes, on both ranks
    assert len({a["sha"] for a in ranks[0]}) >= 3  # and training did move the weights between applications
