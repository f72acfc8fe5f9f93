"""Baselines fed their own published recipes, beside the project's token sets (``benchmarks/``).

The trade-off tables' "UCE" rows run UCE's closed form (``solver.uce_operator``) on this project's token sets
(every concept token in every template, the preserve concepts' tokens and the generic prompts, no guide).
:func:`uce_as_published` runs the same formula on UCE's own recipe (Gandikota et al. 2024, its
``train-scripts/train_erase.py``):

- one state per concept: the last token of the bare name (``attention_mask.sum() - 2``, the token before the
  end-of-text token), for every erased and every preserved concept;
- the guide concept: ``"art"`` for styles, ``""`` otherwise (for ``""`` that token is the start token);
- ``lam = 0.5``, erase and preserve scale 1.

Example:
    >>> from ice_lightning.demos.tiny import build_tiny_pipeline
    >>> from ice_lightning.core.concepts import ConceptSpec
    >>> pipe = build_tiny_pipeline("sd")
    >>> result = uce_as_published(pipe, ConceptSpec(erase=["Van Gogh"], family="style"))
    >>> result.method, result.operators["text"].hparams["lam"]
    ('uce', 0.5)
    >>> result.undo()
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.concepts import ConceptSpec
from ..core.encoders import EmbeddingSpace, FeatureConcatSource, SequenceSource, _tokenize
from ..core.plan import ErasurePlan
from ..core.result import ErasureResult
from ..core.solver import uce_operator

__all__ = ["uce_as_published", "uce_published_states", "UCE_PUBLISHED_LAM"]

#: UCE's default ``lamb`` (its erase and preserve scales are 1).
UCE_PUBLISHED_LAM = 0.5


def _last_subject_token(space: EmbeddingSpace, texts: list[str]) -> Tensor:
    """Each text's state at ``attention_mask.sum() - 2``: its last token before the end-of-text token (the start
    token for ``""``), as UCE reads it; feature-concatenated spaces concatenate their parts' states there."""
    rows = []
    for src in space.sources:
        parts = src.parts if isinstance(src, FeatureConcatSource) else [src]
        if not all(isinstance(p, SequenceSource) for p in parts):
            raise TypeError(f"UCE's recipe reads per-token states; the {space.name!r} space is pooled")
        per_part = []
        with torch.no_grad():
            for p in parts:
                enc = _tokenize(p.tokenizer, texts, p.max_length)
                states = p._states(enc)
                idx = (enc["attention_mask"].sum(1) - 2).clamp_min(0)
                per_part.append(states[torch.arange(len(texts)), idx])
        x = torch.cat(per_part, dim=-1)
        width = getattr(src, "width", None)
        if width is not None and x.shape[-1] != width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        rows.append(x)
    return torch.cat(rows, dim=0)


def uce_published_states(space: EmbeddingSpace, spec: ConceptSpec) -> tuple[Tensor, Tensor, Tensor]:
    """UCE's own inputs in ``space``: erase states, paired guide states, preserve states (one per concept)."""
    guide = "art" if spec.family == "style" else ""
    erase = _last_subject_token(space, list(spec.erase))
    guides = _last_subject_token(space, [guide]).expand(len(spec.erase), -1)
    preserve = _last_subject_token(space, list(spec.preserve)) if spec.preserve else erase[:0]
    return erase, guides.clone(), preserve


def uce_as_published(pipeline, spec: ConceptSpec, lam: float = UCE_PUBLISHED_LAM,
                     verify: bool = False) -> ErasureResult:  # fmt: skip
    """Erase ``spec`` from ``pipeline`` with UCE's closed form on UCE's own recipe (module docstring); undo with
    ``result.undo()`` as for :func:`ice_lightning.erase`."""
    plan = ErasurePlan(pipeline, spec, method="uce", hparams={"lam": lam, "preserve_scale": 1.0}, verify=verify)
    operators = {}
    for name in sorted(set(plan.layer_spaces.values())):
        erase, guides, preserve = uce_published_states(plan.spaces[name], spec)
        if preserve.shape[0] == 0:
            preserve = torch.zeros(1, erase.shape[1], dtype=erase.dtype)
        operators[name] = uce_operator(erase, preserve, lam=lam, preserve_scale=1.0, E_guide=guides)
        operators[name].hparams["recipe"] = "published"
    return plan.apply(operators)
