"""The ``LightningCLI`` behind ``ice-lightning fit|validate|test`` (the console script is
:mod:`ice_lightning.cli`)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from .module import ICEModule

__all__ = ["ICELightningCLI"]


class ICELightningCLI(LightningCLI):
    """``LightningCLI`` over :class:`ICEModule` and any ``LightningDataModule`` (``fit|validate|test``), given by
    ``class_path`` in the ``data`` section: :class:`~ice_lightning.CaptionFolderDataModule` (caption folders) or
    :class:`~ice_lightning.demos.shapes.ShapesDataModule` (the shapes world)."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(ICEModule, LightningDataModule, args=args, subclass_mode_data=True, **kwargs)
