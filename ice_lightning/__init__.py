"""ice-lightning: ICE (Instant Concept Erasure) for diffusion models, as a Lightning plugin.

- :mod:`ice_lightning.core`: the method and the edit, no Lightning (:func:`erase`, :func:`save_erased`,
  the solver in :mod:`ice_lightning.core.solver`, the denoiser family table);
- :mod:`ice_lightning.lightning`: :class:`ICECallback`, :class:`ICEModule`, data, the ``ice-lightning`` CLI;
- beside them, never imported by them: :mod:`ice_lightning.evaluation` (development set, attacks) and
  :mod:`ice_lightning.demos.shapes` (the shapes world). ``docs/architecture.md`` draws the layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_NAMES = {
    "ConceptSpec": ".core",
    "DissociationOperator": ".core",
    "ErasurePlan": ".core",
    "ErasureResult": ".core",
    "ICEHyperParams": ".core",
    "NoTextConditioningLayerError": ".core",
    "Prompt": ".core",
    "TextConditioningLayers": ".core",
    "dissociation_operator": ".core",
    "erase": ".core",
    "find_text_conditioning": ".core",
    "save_erased": ".core",
    "verify_export": ".core",
    "CaptionFilter": ".lightning",
    "CaptionFolderDataModule": ".lightning",
    "CLIPConceptPresence": ".lightning",
    "ConceptPresence": ".lightning",
    "ICECallback": ".lightning",
    "ICEModule": ".lightning",
    "ImageDetectorFilter": ".lightning",
    "NudeNetFilter": ".lightning",
    "NudeNetPresence": ".lightning",
    "SampleFilter": ".lightning",
    "SampleFilterCallback": ".lightning",
    "SavePipeline": ".lightning",
}
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)

if TYPE_CHECKING:  # the names for type checkers and editors; at run time each loads on first use
    from .core import (
        ConceptSpec,
        DissociationOperator,
        ErasurePlan,
        ErasureResult,
        ICEHyperParams,
        NoTextConditioningLayerError,
        Prompt,
        TextConditioningLayers,
        dissociation_operator,
        erase,
        find_text_conditioning,
        save_erased,
        verify_export,
    )
    from .lightning import (
        CaptionFilter,
        CaptionFolderDataModule,
        CLIPConceptPresence,
        ConceptPresence,
        ICECallback,
        ICEModule,
        ImageDetectorFilter,
        NudeNetFilter,
        NudeNetPresence,
        SampleFilter,
        SampleFilterCallback,
        SavePipeline,
    )

__all__ = [
    "ICECallback",
    "ICEModule",
    "CaptionFilter",
    "ImageDetectorFilter",
    "NudeNetFilter",
    "SampleFilter",
    "SampleFilterCallback",
    "ConceptPresence",
    "CLIPConceptPresence",
    "NudeNetPresence",
    "CaptionFolderDataModule",
    "SavePipeline",
    "ConceptSpec",
    "Prompt",
    "ErasurePlan",
    "ErasureResult",
    "erase",
    "find_text_conditioning",
    "save_erased",
    "verify_export",
    "NoTextConditioningLayerError",
    "TextConditioningLayers",
    "DissociationOperator",
    "ICEHyperParams",
    "dissociation_operator",
]
