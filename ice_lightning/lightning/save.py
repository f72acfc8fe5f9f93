"""``SavePipeline``: save the trained pipeline with ``save_pretrained`` at the end of ``fit``."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from .callback import find_pipeline

__all__ = ["SavePipeline"]


class SavePipeline(Callback):
    """Save the module's diffusers pipeline with ``save_pretrained`` at the end of ``fit`` (rank zero), so a
    model trained through ``ice-lightning fit`` comes out as a folder ``from_pretrained`` loads.

    Example (in a config's ``trainer.callbacks``)::

        - class_path: ice_lightning.SavePipeline
          init_args: {dirpath: models/shapes-image}
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            pipe = find_pipeline(pl_module)
            pipe.save_pretrained(self.dirpath)
            rank_zero_info(f"SavePipeline: saved {type(pipe).__name__} to {self.dirpath}")
