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
