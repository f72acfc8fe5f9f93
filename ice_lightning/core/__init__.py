"""The core of ice-lightning: pure torch + diffusers/transformers, no Lightning.

- :mod:`.solver`: the mathematics (energy subspaces, overlap projector, ``D*`` in low-rank form, baselines);
- :mod:`.concepts`: concept specs, templates, default preserve and synonym sets;
- :mod:`.encoders`: text-encoder states per embedding space;
- :mod:`.architectures`: the table of denoiser architectures (layer rules, check pass, spaces, training call);
- :mod:`.layers`: finding and verifying the text-conditioning layers;
- :mod:`.plan`: the erasure plan (plan, solve, apply) and :func:`erase`;
- :mod:`.context`: the concept's imprint on a prompt's other tokens, erased by default (``context_expansion``);
- :mod:`.triggers`: trigger discovery, the defence's own vocabulary search (``trigger_rounds``);
- :mod:`.editing`: all-or-nothing, exactly reversible low-rank edits;
- :mod:`.probe`: the text-space metrics of an edit;
- :mod:`.export`: ``save_erased`` / ``verify_export``;
- :mod:`.pipelines`: loading a pipeline by folder, hub id or registered name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

_NAMES = {
    "ConceptSpec": ".concepts",
    "Prompt": ".concepts",
    "load_manifest": ".export",
    "save_erased": ".export",
    "verify_export": ".export",
    "ARCHITECTURES": ".architectures",
    "Architecture": ".architectures",
    "LayerRule": ".architectures",
    "architecture_of": ".architectures",
    "register_architecture": ".architectures",
    "NoTextConditioningLayerError": ".layers",
    "TextConditioningLayers": ".layers",
    "load_pipeline": ".pipelines",
    "register_pipeline": ".pipelines",
    "ErasurePlan": ".plan",
    "ErasureResult": ".result",
    "TargetLayer": ".result",
    "ErasureRecord": ".record",
    "edit_history": ".parts",
    "erase": ".plan",
    "find_text_conditioning": ".plan",
    "TextSpaceProbe": ".probe",
    "DissociationOperator": ".solver",
    "ICEHyperParams": ".solver",
    "dissociation_operator": ".solver",
}
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)

if TYPE_CHECKING:  # the names for type checkers and editors; at run time each loads on first use
    from .architectures import (
        ARCHITECTURES,
        Architecture,
        LayerRule,
        architecture_of,
        register_architecture,
    )
    from .concepts import (
        ConceptSpec,
        Prompt,
    )
    from .export import (
        load_manifest,
        save_erased,
        verify_export,
    )
    from .layers import (
        NoTextConditioningLayerError,
        TextConditioningLayers,
    )
    from .parts import (
        edit_history,
    )
    from .pipelines import (
        load_pipeline,
        register_pipeline,
    )
    from .plan import (
        ErasurePlan,
        erase,
        find_text_conditioning,
    )
    from .probe import (
        TextSpaceProbe,
    )
    from .record import (
        ErasureRecord,
    )
    from .result import (
        ErasureResult,
        TargetLayer,
    )
    from .solver import (
        DissociationOperator,
        ICEHyperParams,
        dissociation_operator,
    )

__all__ = [
    "ConceptSpec",
    "Prompt",
    "load_manifest",
    "save_erased",
    "verify_export",
    "ARCHITECTURES",
    "Architecture",
    "LayerRule",
    "architecture_of",
    "register_architecture",
    "NoTextConditioningLayerError",
    "TextConditioningLayers",
    "load_pipeline",
    "register_pipeline",
    "ErasurePlan",
    "ErasureResult",
    "ErasureRecord",
    "TargetLayer",
    "edit_history",
    "erase",
    "find_text_conditioning",
    "TextSpaceProbe",
    "DissociationOperator",
    "ICEHyperParams",
    "dissociation_operator",
]
