"""The examples run as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_plain_lightning_example():
    run = subprocess.run(
        [sys.executable, "examples/plain_lightning_callback.py", "--epochs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "setup" in run.stdout and "fit_end" in run.stdout


@pytest.mark.slow
def test_enterprise_example(tmp_path):
    run = subprocess.run(
        [sys.executable, "examples/enterprise_finetune.py", "--epochs", "2", "--out", str(tmp_path / "shipped")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'hashes_ok': True" in run.stdout
