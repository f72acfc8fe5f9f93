"""ice-lightning: ICE (Instant Concept Erasure) for diffusion models, as a Lightning plugin.

- :mod:`ice_lightning.core`: the method and the edit, no Lightning (:func:`erase`, :func:`save_erased`,
  the solver in :mod:`ice_lightning.core.solver`, the denoiser family table);
- :mod:`ice_lightning.lightning`: :class:`ICECallback`, :class:`ICEModule`, data, the ``ice-lightning`` CLI;
- beside them, never imported by them: :mod:`ice_lightning.evaluation` (development set, attacks) and
  :mod:`ice_lightning.shapes` (the shapes world). ``docs/architecture.md`` draws the layout.
"""

from . import _moved
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
    SavePipeline,
)

__version__ = "0.1.0"

__all__ = [
    "ICECallback",
    "ICEModule",
    "CaptionFilter",
    "ImageDetectorFilter",
    "NudeNetFilter",
    "SampleFilter",
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

_moved.install()
