"""The Lightning layer: the callback, sample filters, pipeline saving, the fine-tuning module, data, the CLI.

It builds on :mod:`ice_lightning.core` only; evaluation and the shapes world are imported only when asked for.
"""

from .callback import ICECallback, ICEState, find_pipeline
from .data import CaptionFolderDataModule
from .filters import CaptionFilter, ImageDetectorFilter, NudeNetFilter, SampleFilter, drop_rows
from .module import ICEModule
from .sample_metrics import CLIPConceptPresence, ConceptPresence, NudeNetPresence
from .save import SavePipeline

__all__ = [
    "ICECallback",
    "ICEState",
    "find_pipeline",
    "CaptionFolderDataModule",
    "CaptionFilter",
    "ImageDetectorFilter",
    "NudeNetFilter",
    "SampleFilter",
    "drop_rows",
    "ICEModule",
    "ConceptPresence",
    "CLIPConceptPresence",
    "NudeNetPresence",
    "SavePipeline",
]
