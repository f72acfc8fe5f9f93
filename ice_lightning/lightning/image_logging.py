"""One image to every logger a ``Trainer`` has, each in its own way: TensorBoard (``add_image``), Weights & Biases
(``log_image``), MLflow (an artifact, ``log_image``), CSV (a PNG beside ``metrics.csv``), and any other logger with
a ``log_image`` method (Neptune, Comet). Sample grids of ``ICEModule`` go through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

__all__ = ["log_image"]


def _png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def log_image(loggers: list[Any], key: str, image: np.ndarray, step: int, written: Path | None = None) -> list[str]:
    """Send ``image`` (``(H, W, 3)`` uint8) under ``key`` at ``step`` to each of ``loggers`` (``trainer.loggers``).
    ``written``: a PNG the caller already saved; a CSV logger whose folder holds it gets no second copy. Returns the
    names of the loggers that took it (a logger that cannot show images is skipped)."""
    name = f"{key.replace('/', '_')}_step{step:06d}.png"
    took = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, artifact_file=f"{key}/{name}")
        elif isinstance(logger, CSVLogger):
            if written is None or Path(logger.log_dir).resolve() not in Path(written).resolve().parents:
                _png(image, Path(logger.log_dir) / "images" / name)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[image], step=step)
        else:
            continue
        took.append(type(logger).__name__)
    return took
