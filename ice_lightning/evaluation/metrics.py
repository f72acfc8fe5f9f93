"""Metrics of the development set (``benchmarks/tradeoff.py``, ``benchmarks/minilm_sweep.py``): how an erasure
changes the edited layers' outputs on any prompts, and the per-concept columns of the trade-off tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.concepts import Prompt
from ..core.probe import RelativeOutputChange, erasure_metrics, layer_outputs
from ..core.result import ErasureResult
from .devset import DevConcept

__all__ = ["relative_change", "dev_concept_metrics"]


@torch.no_grad()
def relative_change(result: ErasureResult, prompts: Sequence[Prompt], read: bool = False) -> float:
    """Mean relative change that ``result`` made to the edited layers' outputs over the chosen tokens of
    ``prompts`` (any prompts, not only the spec's held-out ones). ``read``: over every position the denoiser reads
    of each prompt instead (:meth:`~ice_lightning.core.encoders.EmbeddingSpace.read_rows`: its words, its start and
    end-of-text tokens and, where the denoiser reads it, its padding)."""
    if not prompts:
        return float("nan")
    metric, mods, before = RelativeOutputChange(), result.modules(), result.reference_weights()
    rows = {}
    for name, space in result.layer_spaces.items():
        if space not in rows:
            states = result.spaces[space]
            rows[space] = torch.cat(states.read_rows(prompts)) if read else states.token_states(prompts)
        x = rows[space]
        if x.shape[0]:
            module = mods[name]
            after = layer_outputs(module.weight, module.bias, x)
            metric.update(layer_outputs(*before[name], x), after)
    return float(metric.compute())


def dev_concept_metrics(result: ErasureResult, concept: DevConcept) -> dict[str, float]:
    """Metrics of an erasure on a development concept's held-out prompts (``benchmarks/tradeoff.py``):
    ``erasure`` (name in new contexts), ``paraphrase``, ``collateral_near`` (held-out nearby concepts, never
    in the preserve set), ``collateral_near_preserved`` (the preserve set's concepts in new contexts),
    ``collateral_far`` (unrelated prompts: their words), ``collateral_far_read`` (the same prompts at every position
    the denoiser reads: the start and end-of-text tokens and the padding too) and ``leakage``."""
    spec_metrics = erasure_metrics(result)  # the spec's held-out erase and far prompts are the concept's
    return {
        "erasure": spec_metrics["erasure"],
        "paraphrase": relative_change(result, concept.paraphrase_prompts()),
        "collateral_near": relative_change(result, concept.nearby_prompts()),
        "collateral_near_preserved": spec_metrics["collateral_near"],
        "collateral_far": spec_metrics["collateral_far"],
        "collateral_far_read": relative_change(result, result.spec.heldout_far_prompts(), read=True),
        "leakage": spec_metrics["leakage"],
    }
