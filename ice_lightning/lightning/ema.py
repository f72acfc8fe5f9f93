"""EMA of the fine-tuned weights as diffusers' training scripts keep it (``--use_ema``), through Lightning's own
:class:`~lightning.pytorch.callbacks.WeightAveraging` callback: a preset of its averaging function, not a copy of it.

diffusers' ``EMAModel`` (``training_utils.py``) does not use a fixed decay: at its ``n``-th update the decay is
``min(decay, (1 + s) / (10 + s))`` with ``s = n - update_after_step - 1`` (``1 - (1 + s / inv_gamma) ** -power``
with ``use_ema_warmup``), clamped below by ``min_decay``, and 0 (a copy) while ``s <= 0``; Lightning's
``EMAWeightAveraging`` uses the fixed decay from the first step. :class:`DiffusersEMA` gives Lightning's callback
the script's schedule, so an ``ICEModule`` fine-tune averages as ``train_text_to_image.py --use_ema`` does.

With :class:`~ice_lightning.lightning.callback.ICECallback` in the same trainer, the average is copied into the
model at ``on_train_end`` and the callback's final application (``at_fit_end``, run at ``on_fit_end``, after it)
erases it before the export: the export ships the EMA weights, erased.

Example:
    >>> ema = DiffusersEMA(decay=0.999)
    >>> [round(diffusers_ema_decay(n, decay=0.999), 4) for n in range(4)]  # a copy, then 2/11, 3/12, 4/13
    [0.0, 0.1818, 0.25, 0.3077]
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging

__all__ = ["DiffusersEMA", "diffusers_ema_decay"]


def diffusers_ema_decay(updates_before: int, decay: float = 0.9999, min_decay: float = 0.0,
                        update_after_step: int = 0, use_ema_warmup: bool = False, inv_gamma: float = 1.0,
                        power: float = 2 / 3) -> float:  # fmt: skip
    """The decay of diffusers' ``EMAModel.get_decay`` for the update that follows ``updates_before`` earlier ones
    (its ``optimization_step`` is ``updates_before + 1``)."""
    step = max(0, updates_before - update_after_step)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / inv_gamma) ** -power if use_ema_warmup else (1 + step) / (10 + step)
    return max(min(value, decay), min_decay)


class DiffusersEMA(WeightAveraging):
    """Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`, updated after every optimizer step with
    diffusers' ``EMAModel`` schedule (same argument names and defaults as ``EMAModel``; see the module docstring).

    It averages every parameter and buffer of the LightningModule (``AveragedModel`` copies the module once), the
    frozen VAE and text encoder included, which stay constant; ``device="cpu"`` keeps the copy off the GPU. Like
    ``WeightAveraging`` it does not shard: not for FSDP2 runs.

    In a ``LightningCLI`` config::

        trainer:
          callbacks:
            - class_path: ice_lightning.lightning.DiffusersEMA
              init_args: {decay: 0.9999}
            - class_path: ice_lightning.ICECallback
              init_args: {erase: ["Van Gogh"], family: style, export: erased}
    """

    def __init__(self, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        if not 0.0 <= min_decay <= decay <= 1.0:
            raise ValueError(f"EMA decays must satisfy 0 <= min_decay <= decay <= 1, got min_decay={min_decay}, "
                             f"decay={decay}")  # fmt: skip
        self.schedule: dict[str, Any] = dict(decay=decay, min_decay=min_decay, update_after_step=update_after_step,
                                             use_ema_warmup=use_ema_warmup, inv_gamma=inv_gamma, power=power)
        super().__init__(device=device, avg_fn=self.average)

    def average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        """One EMA update of one tensor, after ``num_averaged`` earlier ones: ``EMAModel.step``'s
        ``s -= (1 - d) (s - p)``."""
        d = diffusers_ema_decay(int(num_averaged), **self.schedule)
        return averaged - (1.0 - d) * (averaged - current)
