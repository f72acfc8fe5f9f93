"""ice-lightning: ICE (Instant Concept Erasure) for diffusion models, as a Lightning plugin.

The solver lives in :mod:`ice_lightning.solver` (pure torch); :func:`erase` applies it to a diffusers
pipeline and :func:`save_erased` exports the result with a manifest.
"""

from .callback import ICECallback
from .concepts import ConceptSpec, Prompt
from .data import CaptionFolderDataModule
from .erase import ErasureResult, erase, find_text_conditioning
from .export import save_erased, verify_export
from .layers import NoTextConditioningLayerError, TextConditioningLayers
from .module import ICEModule
from .solver import DissociationOperator, ICEHyperParams, dissociation_operator

__version__ = "0.1.0"

__all__ = [
    "ICECallback",
    "ICEModule",
    "CaptionFolderDataModule",
    "ConceptSpec",
    "Prompt",
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
