"""The Lightning layer: the callback, sample filters, pipeline saving, the fine-tuning module, data, the CLI.

It builds on :mod:`ice_lightning.core` only; evaluation and the shapes world are imported only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

_NAMES = {
    "ICECallback": ".callback",
    "ICEState": ".callback_state",
    "find_pipeline": ".callback",
    "CaptionFolderDataModule": ".data",
    "HFDatasetDataModule": ".data_formats",
    "LitDataModule": ".data_formats",
    "WebDatasetDataModule": ".data_formats",
    "optimize_caption_folder": ".data_formats",
    "CaptionFilter": ".filters",
    "ImageDetectorFilter": ".filters",
    "NudeNetFilter": ".filters",
    "SampleFilter": ".filters",
    "SampleFilterCallback": ".filter_callback",
    "ExportOptions": ".callback_state",
    "LayerTargets": ".callback_state",
    "LogOptions": ".callback_state",
    "DiffusersEMA": ".ema",
    "drop_rows": ".filters",
    "ICEModule": ".module",
    "CLIPConceptPresence": ".sample_metrics",
    "ConceptPresence": ".sample_metrics",
    "NudeNetPresence": ".sample_metrics",
    "SavePipeline": ".save",
}
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)

if TYPE_CHECKING:  # the names for type checkers and editors; at run time each loads on first use
    from .callback import (
        ICECallback,
        find_pipeline,
    )
    from .callback_state import (
        ExportOptions,
        ICEState,
        LayerTargets,
        LogOptions,
    )
    from .data import (
        CaptionFolderDataModule,
    )
    from .data_formats import (
        HFDatasetDataModule,
        LitDataModule,
        WebDatasetDataModule,
        optimize_caption_folder,
    )
    from .ema import (
        DiffusersEMA,
    )
    from .filter_callback import (
        SampleFilterCallback,
    )
    from .filters import (
        CaptionFilter,
        ImageDetectorFilter,
        NudeNetFilter,
        SampleFilter,
        drop_rows,
    )
    from .module import (
        ICEModule,
    )
    from .sample_metrics import (
        CLIPConceptPresence,
        ConceptPresence,
        NudeNetPresence,
    )
    from .save import (
        SavePipeline,
    )

__all__ = [
    "ICECallback",
    "ICEState",
    "find_pipeline",
    "CaptionFolderDataModule",
    "HFDatasetDataModule",
    "LitDataModule",
    "WebDatasetDataModule",
    "optimize_caption_folder",
    "CaptionFilter",
    "ImageDetectorFilter",
    "NudeNetFilter",
    "SampleFilter",
    "SampleFilterCallback",
    "ExportOptions",
    "LayerTargets",
    "LogOptions",
    "DiffusersEMA",
    "drop_rows",
    "ICEModule",
    "ConceptPresence",
    "CLIPConceptPresence",
    "NudeNetPresence",
    "SavePipeline",
]
