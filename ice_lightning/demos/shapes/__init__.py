r"""The shapes world: a small world where image-level erasure is measured exactly.

- :mod:`~ice_lightning.demos.shapes.world`: the renderer, the caption grammar, the data module and the detector;
- :mod:`~ice_lightning.demos.shapes.metrics`: the detector as torchmetrics ``Metric``\ s, a sample filter and a
  presence metric;
- :mod:`~ice_lightning.demos.shapes.pipeline`: the pixel-space pipeline, untrained models and the shipped ones;
- :mod:`~ice_lightning.demos.shapes.evaluation`: prompts, sampling, scores, the before/after report and grid.

It sits beside the product: nothing in :mod:`ice_lightning.core` or :mod:`ice_lightning.lightning` imports it.
The shipped models are reached by name through the pipeline registry (``--pipeline shapes-image``).
"""

from .metrics import (
    AttributeAccuracy,
    ConceptPresenceRate,
    FailureRate,
    ShapesConceptPresence,
    ShapesDetectorFilter,
)
from .pipeline import (
    MODELS_DIR,
    PROMPT_LENGTH,
    SHIPPED_MODELS,
    PixelDiffusionPipeline,
    PixelPipelineOutput,
    load_shapes_pipeline,
    new_pipeline,
    save_shapes_model,
)
from .world import (
    COLOURS,
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SYNONYMS,
    TEMPLATES,
    Detection,
    ShapesDataModule,
    ShapesDataset,
    ShapeSpec,
    caption,
    detect,
    place,
    render,
    render_clip,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "PALETTE",
    "SYNONYMS",
    "TEMPLATES",
    "ShapeSpec",
    "Detection",
    "render",
    "render_clip",
    "place",
    "caption",
    "detect",
    "ShapesDataset",
    "ShapesDataModule",
    "ConceptPresenceRate",
    "ShapesDetectorFilter",
    "ShapesConceptPresence",
    "AttributeAccuracy",
    "FailureRate",
    "PixelDiffusionPipeline",
    "PixelPipelineOutput",
    "PROMPT_LENGTH",
    "new_pipeline",
    "MODELS_DIR",
    "SHIPPED_MODELS",
    "save_shapes_model",
    "load_shapes_pipeline",
]
