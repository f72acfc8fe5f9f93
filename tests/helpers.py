"""Helpers shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` from the repo root; fails the test with the script's stderr."""
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def snapshot(pipe) -> dict:
    """Every parameter and buffer of every torch component, cloned, keyed ``component.name``."""
    out = {}
    for comp, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                out[f"{comp}.{name}"] = t.detach().clone()
    return out


def changed(before: dict, pipe) -> set:
    now = snapshot(pipe)
    assert now.keys() == before.keys()
    return {k for k in before if not (before[k].dtype == now[k].dtype and _equal(before[k], now[k]))}


def _equal(a, b) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point():  # bit for bit, with NaN equal to NaN
        return bool(
            torch.equal(
                a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                b.view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8),
            )
        )
    return bool(torch.equal(a, b))


# What earlier versions made the libraries say about our own calls (each fixed at its source).
OURS = ("args parameter is intended", "`torch_dtype` is deprecated", "kept in float32", "is outdated",
        "Expected types for", "clip_sample")  # fmt: skip


def warnings_of_ours(caught, text: str) -> list[str]:
    """Warnings raised from ice_lightning's files, and known messages about our calls, in ``caught`` (recorded by
    ``warnings.catch_warnings``) or ``text`` (what was printed)."""
    import ice_lightning

    package = Path(ice_lightning.__file__).parent
    found = [f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in caught
             if Path(w.filename).resolve().is_relative_to(package) or any(s in str(w.message) for s in OURS)]
    found += [line for line in text.splitlines() if any(s in line for s in OURS)]
    return found
