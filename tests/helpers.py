"""Helpers shared by the tests."""

import torch


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
    return a.shape == b.shape and bool(torch.equal(a, b))
