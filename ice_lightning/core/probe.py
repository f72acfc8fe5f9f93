"""Text-space metrics of an edit, measured on the edited layers' outputs (``docs/method.md``, metrics).

For a text-conditioning layer ``K(x) = W x + b``, compared with reference weights (the model before the
erasure), on held-out prompts:

- ``erasure``: mean ``||K(c) - K_ref(c)|| / ||K_ref(c)||`` over the erased concept's tokens (1.0 = removed);
- ``collateral_near`` / ``collateral_far``: the same over preserve-concept tokens / unrelated prompts
  (0.0 = untouched);
- ``leakage``: share of (prompt, layer) pairs whose token-averaged output is still closer to the original
  prompt's than to the same prompt with the concept replaced by a neutral word;
- ``concept_residual`` (given the operators): how strongly the *current* layers respond along the erased
  directions, ``||W D c|| / (||c|| g(W))`` with ``g(W) = ||W||_F / sqrt(n)`` the layer's average gain;
  insensitive to fine-tuning drift elsewhere, so it shows whether training re-learned the concept.

Each quantity is a torchmetrics ``Metric`` (:class:`RelativeOutputChange`, :class:`LeakageRate`) with
summed states, so it reduces correctly across ranks; :class:`TextSpaceProbe` feeds them from a model.

Example:
    >>> import torch
    >>> m = RelativeOutputChange()
    >>> m.update(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]))
    >>> float(m.compute())
    1.0
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .concepts import ConceptSpec, Prompt
from .editing import concept_responses, layer_outputs
from .encoders import EmbeddingSpace
from .parts import pipeline_spaces, resolve_layer
from .plan import text_conditioning_layers
from .result import ErasureResult
from .solver import DissociationOperator

__all__ = [
    "RelativeOutputChange",
    "LeakageRate",
    "TextSpaceProbe",
    "layer_outputs",
    "concept_residual",
    "residual_of_responses",
    "erasure_metrics",
    "erasure_table",
    "format_table",
    "compare_pipelines",
]


# Every rank computes these from the same whole outputs (a sharded layer's are gathered), and an export computes
# them on rank 0 alone: no reduction across ranks, which would count each rank's copy and wait for ranks
# that do not take part.
_LOCAL = {"sync_on_compute": False}


class RelativeOutputChange(Metric):
    """Mean over rows of ``||after - before|| / ||before||`` (erasure or collateral, by prompt set)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, before: Tensor, after: Tensor) -> None:
        before, after = before.to(torch.float64), after.to(torch.float64)
        rel = (after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
        self.total += rel.sum().to(self.total.device)
        self.count += rel.numel()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)


class LeakageRate(Metric):
    """Share of rows whose edited output is closer to the original concept output than to the neutral one."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, edited: Tensor, original: Tensor, neutral: Tensor) -> None:
        closer = (edited - original).norm(dim=-1) < (edited - neutral).norm(dim=-1)
        self.hits += int(closer.sum())
        self.total += closer.numel()

    def compute(self) -> Tensor:
        return self.hits.to(torch.float64) / self.total.clamp_min(1)


class TextSpaceProbe:
    """The four metrics of the current weights of ``layers`` against the outputs of reference weights.

    The reference *outputs* on the held-out prompts are computed once at construction (a few thousand
    vectors, far smaller than the weights), so the probe keeps measuring against the original model while
    the layers are edited and fine-tuned, and travels in a checkpoint (``state_dict``).

    Args:
        layers: ``{name: (linear module, space name)}``.
        spaces: the pipeline's embedding spaces (:func:`~ice_lightning.core.parts.pipeline_spaces`).
        spec: the concept spec whose held-out prompts are measured.
        reference: ``{name: (weight, bias)}`` of the model before erasure; default: the current weights.
    """

    def __init__(
        self,
        layers: dict[str, tuple[nn.Linear, str]],
        spaces: dict[str, EmbeddingSpace],
        spec: ConceptSpec,
        reference: dict[str, tuple[Tensor, Tensor | None]] | None = None,
    ) -> None:
        self.layers, self.spaces, self.spec = layers, spaces, spec
        pairs = spec.leakage_pairs()
        self.groups: dict[str, tuple[list[Prompt], bool]] = {  # name -> (prompts, mean-pool per prompt)
            "erasure": (spec.heldout_erase_prompts(), False),
            "collateral_near": (spec.heldout_near_prompts(), False),
            "collateral_far": (spec.heldout_far_prompts(), False),
            "leak_concept": ([Prompt(p.text) for p, _ in pairs], True),
            "leak_neutral": ([Prompt(q.text) for _, q in pairs], True),
        }
        weights = reference or {n: (m.weight, m.bias) for n, (m, _) in layers.items()}
        self.reference = {
            g: {n: layer_outputs(*weights[n], self._states(g, s)) for n, (_, s) in layers.items()} for g in self.groups
        }

    @classmethod
    def from_result(cls, result: ErasureResult, spec: ConceptSpec | None = None,
                    reference: dict[str, tuple[Tensor, Tensor | None]] | None = None) -> TextSpaceProbe:  # fmt: skip
        """Probe of an erasure against the weights it started from (``W + L R``, no copy kept; or ``reference``,
        that result's :meth:`~ice_lightning.core.result.ErasureResult.reference_weights` already rebuilt)."""
        if reference is None:
            reference = result.reference_weights()
        return cls(result.layer_map, result.spaces, spec or result.spec, reference)

    def _states(self, group: str, space: str) -> Tensor:
        prompts, pooled = self.groups[group]
        if pooled:
            return torch.stack([x.mean(0) for x in self.spaces[space].per_prompt(prompts)])
        return self.spaces[space].token_states(prompts)

    def _current(self, group: str, weights: dict[str, tuple[Tensor, Tensor | None]] | None = None) -> dict[str, Tensor]:
        """Outputs of the current layers (or of ``weights``, ``{name: (W, b)}``) on ``group``'s prompts."""
        return {n: layer_outputs(*(weights[n] if weights else (m.weight, m.bias)), self._states(group, s))
                for n, (m, s) in self.layers.items()}  # fmt: skip

    @torch.no_grad()
    def concept_residual(self, operators: dict[str, DissociationOperator]) -> float:
        """:func:`concept_residual` of the current layers on the spec's held-out concept prompts."""
        weights = {n: (m.weight, m.bias) for n, (m, _) in self.layers.items()}
        spaces = {n: s for n, (_, s) in self.layers.items()}
        return concept_residual(weights, spaces, {s: self._states("erasure", s) for s in set(spaces.values())},
                                operators)  # fmt: skip

    @torch.no_grad()
    def compute(self, operators: dict[str, DissociationOperator] | None = None,
                weights: dict[str, tuple[Tensor, Tensor | None]] | None = None) -> dict[str, float]:  # fmt: skip
        """``erasure``, ``collateral_near``, ``collateral_far`` and ``leakage`` on the spec's held-out prompts,
        and ``concept_residual`` when the ``operators`` are given; of the current layers, or of ``weights``
        (``{name: (W, b)}``, say the weights before an application: what fine-tuning alone moved)."""
        out = {}
        for group in ("erasure", "collateral_near", "collateral_far"):
            metric, now = RelativeOutputChange(**_LOCAL), self._current(group, weights)
            for name, ref in self.reference[group].items():
                if ref.shape[0]:
                    metric.update(ref, now[name])
            out[group] = float(metric.compute()) if metric.count else float("nan")
        leak, now = LeakageRate(**_LOCAL), self._current("leak_concept", weights)
        for name in self.layers:
            leak.update(now[name], self.reference["leak_concept"][name], self.reference["leak_neutral"][name])
        out["leakage"] = float(leak.compute())
        if operators is not None and weights is None:
            out["concept_residual"] = self.concept_residual(operators)
        return out

    def state_dict(self) -> dict:
        return {"reference": {g: {n: t.cpu() for n, t in d.items()} for g, d in self.reference.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.reference = state["reference"]


@torch.no_grad()
def concept_residual(
    weights: dict[str, tuple[Tensor, Tensor | None]],
    layer_spaces: dict[str, str],
    states: dict[str, Tensor],
    operators: dict[str, DissociationOperator],
) -> float:
    """Mean ``||W D c|| / (||c|| g(W))`` over the concept states ``c`` of each layer's space, ``g(W) = ||W||_F /
    sqrt(n)`` the layer's root-mean-square gain over its ``n`` inputs: how strongly layers with ``weights``
    (``{name: (W, b)}``) respond along the erased directions, relative to how they respond on average.

    Unlike ``erasure`` it ignores unrelated weight drift (and a change of the weights' scale cancels), so it
    tells whether fine-tuning re-learned the concept. The edit lowers it for any operator, soft or not: along
    an eigenvector ``u`` of ``D`` with eigenvalue ``d`` the response ``W D u = d W u`` becomes ``W (I - D) D u =
    d (1 - d) W u``, while ``g`` moves little (a low-rank edit of the whole layer). A ratio to the concept's own
    output ``||W c + b||`` would not: that output shrinks by the same ``1 - d``, and a soft edit leaves such a
    ratio where it was, or raises it where the layer mixes directions the edit shrinks unequally."""
    return residual_of_responses(concept_responses(weights, layer_spaces, states, operators).values())


def residual_of_responses(responses) -> float:
    """The mean of :func:`~ice_lightning.core.editing.concept_responses`' per-row values, over every layer."""
    rows = torch.cat([torch.zeros(0, dtype=torch.float64), *(r.reshape(-1).cpu() for r in responses)])
    return float(rows.mean()) if rows.numel() else 0.0


def erasure_metrics(result: ErasureResult) -> dict[str, float]:
    """All four metrics of an erasure on its spec's held-out prompts."""
    return TextSpaceProbe.from_result(result).compute()


def format_table(metrics: dict[str, float]) -> str:
    """Before/after table of the text-space metrics (before is the unedited model)."""
    rows = [
        ("erasure (held-out concept tokens)", 0.0, metrics["erasure"], "higher = more removed"),
        ("collateral, near concepts", 0.0, metrics["collateral_near"], "lower = better kept"),
        ("collateral, unrelated prompts", 0.0, metrics["collateral_far"], "lower = better kept"),
        ("leakage (still closer to concept)", 1.0, metrics["leakage"], "lower = better"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  before   after  ", "-" * (width + 26)]
    lines += [f"{name:<{width}}  {b:6.3f}  {a:6.3f}  {note}" if a == a else
              f"{name:<{width}}     n/a     n/a  nothing to measure (no held-out prompt of this kind)"
              for name, b, a, note in rows]  # fmt: skip
    return "\n".join(lines)


def erasure_table(result: ErasureResult) -> str:
    """:func:`erasure_metrics` as the before/after table the ``erase`` command prints."""
    return format_table(erasure_metrics(result))


def compare_pipelines(edited, original, spec: ConceptSpec) -> dict[str, float]:
    """The four metrics of ``edited`` (say, a shipped model reloaded from disk) against ``original``:
    same architecture, same text encoder; layers are found on ``edited``."""
    layers = text_conditioning_layers(edited, verify=False)
    reference = {n: (resolve_layer(original, n).weight, resolve_layer(original, n).bias) for n in layers}
    return TextSpaceProbe(layers, pipeline_spaces(edited), spec, reference).compute()


