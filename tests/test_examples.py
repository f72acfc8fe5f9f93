"""The examples run as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_plain_lightning_example():
    run = _run("examples/plain_lightning_callback.py", "--epochs", "1")
    assert "setup" in run.stdout and "fit_end" in run.stdout


@pytest.mark.slow
def test_enterprise_example(tmp_path):
    run = _run("examples/enterprise_finetune.py", "--epochs", "2", "--out", str(tmp_path / "shipped"))
    assert "'hashes_ok': True" in run.stdout
