"""What the package reads of a pipeline, and what it keeps beside it: the denoiser components, a layer by its
qualified name, the embedding spaces the denoiser's architecture reads (built once), and the history of the
erasures applied to it.

Nothing here plans, solves or writes: the plan (:mod:`ice_lightning.core.plan`) and the export
(:mod:`ice_lightning.core.export`) both read a pipeline through these functions.
"""

from __future__ import annotations

import weakref

from torch import nn

from .architectures import NoTextConditioningLayerError, default_embedding_spaces, lookup_architecture
from .encoders import EmbeddingSpace

__all__ = ["DENOISER_COMPONENTS", "denoisers", "resolve_layer", "pipeline_spaces", "edit_history", "history_of"]

#: Pipeline components that may hold a denoiser (Wan 2.2 has two experts).
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")
_ENCODER_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")

# Kept beside the pipeline, never on it: keyed weakly by the pipeline's first denoiser, which nothing stored
# here refers to (the values hold the edited linear layers and the encoders, not their parent), so a dropped
# pipeline is freed with its entries.
_HISTORY: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()
_SPACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, EmbeddingSpace]]] = weakref.WeakKeyDictionary()


def denoisers(pipeline) -> dict[str, nn.Module]:
    """``{component: denoiser}`` of ``pipeline`` (``unet``, ``transformer``, ``transformer_2``)."""
    found = {n: getattr(pipeline, n) for n in DENOISER_COMPONENTS if getattr(pipeline, n, None) is not None}
    if not found:
        raise NoTextConditioningLayerError(
            f"{type(pipeline).__name__} has no denoiser component ({', '.join(DENOISER_COMPONENTS)}); "
            "no text-conditioning layer found"
        )
    return found


def resolve_layer(pipeline, qualified: str) -> nn.Module:
    """The module named ``"component.path.in.component"`` (e.g. ``"unet.mid_block...attn2.to_k"``)."""
    comp, sub = qualified.split(".", 1)
    return getattr(pipeline, comp).get_submodule(sub)


def pipeline_spaces(pipeline) -> dict[str, EmbeddingSpace]:
    """Embedding spaces of ``pipeline``, built by its denoiser's architecture once and cached (the text encoders are
    frozen). The cache is keyed by the identity of the tokenizers and text encoders: swapping one rebuilds it."""
    denoiser = next(iter(denoisers(pipeline).values()))
    key = tuple(id(getattr(pipeline, n, None)) for n in _ENCODER_PARTS)
    cached = _SPACES.get(denoiser)
    if cached is None or cached[0] != key:
        arch = lookup_architecture(denoiser)  # None: a class outside the table, its layers named explicitly
        build = arch.embedding_spaces if arch is not None else default_embedding_spaces
        cached = (key, build(pipeline, denoiser))
        _SPACES[denoiser] = cached
    return cached[1]


def edit_history(pipeline) -> list:
    """The live (not undone) erasures applied to ``pipeline`` with :func:`~ice_lightning.core.plan.erase`, oldest
    first (their :class:`~ice_lightning.core.result.ErasureResult` objects)."""
    return list(_HISTORY.get(next(iter(denoisers(pipeline).values())), []))




def history_of(denoiser: nn.Module) -> list:
    """The history list itself, keyed by the pipeline's first denoiser (created empty): the plan appends to it, an
    undo removes from it."""
    return _HISTORY.setdefault(denoiser, [])
