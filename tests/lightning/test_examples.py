"""The examples run as documented."""

import pytest
from helpers import run_script as _run


@pytest.mark.slow
def test_plain_lightning_example():
    run = _run("examples/plain_lightning_callback.py", "--epochs", "1")
    assert "setup" in run.stdout and "fit_end" in run.stdout


@pytest.mark.slow
def test_enterprise_example(tmp_path):
    run = _run("examples/enterprise_finetune.py", "--epochs", "2", "--out", str(tmp_path / "shipped"))
    assert "'hashes_ok': True" in run.stdout
