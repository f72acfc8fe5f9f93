"""Text-space erasure metrics (``ICE_METHOD.md`` section 5) on the edited layers' outputs.

For a text-conditioning layer ``K(x) = W x + b``, compared with reference weights (the model before the
erasure), on held-out prompts:

- ``erasure``: mean ``||K(c) - K_ref(c)|| / ||K_ref(c)||`` over the erased concept's tokens (1.0 = removed);
- ``collateral_near`` / ``collateral_far``: the same over preserve-concept tokens / unrelated prompts
  (0.0 = untouched);
- ``leakage``: share of (prompt, layer) pairs whose token-averaged output is still closer to the original
  prompt's than to the same prompt with the concept replaced by a neutral word.

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

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .concepts import ConceptSpec, Prompt
from .erase import ErasureResult
from .text_encoders import EmbeddingSpace

__all__ = ["RelativeOutputChange", "LeakageRate", "TextSpaceProbe", "relative_change", "erasure_metrics"]


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


def _outputs(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    out = x @ weight.detach().to(x.device, torch.float64).T
    return out if bias is None else out + bias.detach().to(x.device, torch.float64)


class TextSpaceProbe:
    """Computes the four metrics for the current weights of ``layers`` against ``reference`` weights.

    Args:
        layers: ``{name: (linear module, space name)}``.
        spaces: the pipeline's embedding spaces (``ice_lightning.erase.pipeline_spaces``).
        spec: the concept spec whose held-out prompts are measured.
        reference: ``{name: (weight, bias)}`` of the model before erasure; default: the current weights
            (a snapshot, so later edits and training are measured against today's model).
    """

    def __init__(
        self,
        layers: dict[str, tuple[nn.Linear, str]],
        spaces: dict[str, EmbeddingSpace],
        spec: ConceptSpec,
        reference: dict[str, tuple[Tensor, Tensor | None]] | None = None,
    ) -> None:
        self.layers, self.spaces, self.spec = layers, spaces, spec
        if reference is None:
            reference = {
                n: (m.weight.detach().cpu().clone(), None if m.bias is None else m.bias.detach().cpu().clone())
                for n, (m, _) in layers.items()
            }
        self.reference = reference

    @classmethod
    def from_result(cls, result: ErasureResult) -> TextSpaceProbe:
        """Probe of an erasure against the weights it started from (``W + L R``, no copy kept)."""
        mods = result.modules()
        layers = {n: (mods[n], s) for n, s in result.layer_spaces.items()}
        reference = {}
        for name, (module, _) in layers.items():
            L, R = result.weight_delta(name)
            reference[name] = (module.weight.detach().to(L.device, torch.float64) + L @ R, module.bias)
        return cls(layers, result.spaces, result.spec, reference)

    @torch.no_grad()
    def update_change(self, metric: RelativeOutputChange, prompts: Sequence[Prompt]) -> RelativeOutputChange:
        for name, (module, space) in self.layers.items():
            x = self.spaces[space].token_states(prompts)
            if x.shape[0]:
                w_ref, b_ref = self.reference[name]
                metric.update(_outputs(w_ref, b_ref, x), _outputs(module.weight, module.bias, x))
        return metric

    @torch.no_grad()
    def update_leakage(self, metric: LeakageRate, pairs: Sequence[tuple[Prompt, Prompt]]) -> LeakageRate:
        concept = [Prompt(p.text) for p, _ in pairs]
        neutral = [Prompt(q.text) for _, q in pairs]
        for name, (module, space) in self.layers.items():
            sp, (w_ref, b_ref) = self.spaces[space], self.reference[name]
            xc = torch.stack([x.mean(0) for x in sp.per_prompt(concept)])
            xn = torch.stack([x.mean(0) for x in sp.per_prompt(neutral)])
            # outputs are affine in x, so the mean of the outputs is the output of the mean state
            metric.update(
                _outputs(module.weight, module.bias, xc), _outputs(w_ref, b_ref, xc), _outputs(w_ref, b_ref, xn)
            )
        return metric

    def relative_change(self, prompts: Sequence[Prompt]) -> float:
        return float(self.update_change(RelativeOutputChange(), prompts).compute()) if prompts else float("nan")

    def compute(self) -> dict[str, float]:
        """``erasure``, ``collateral_near``, ``collateral_far`` and ``leakage`` on the spec's held-out prompts."""
        spec = self.spec
        return {
            "erasure": self.relative_change(spec.heldout_erase_prompts()),
            "collateral_near": self.relative_change(spec.heldout_near_prompts()),
            "collateral_far": self.relative_change(spec.heldout_far_prompts()),
            "leakage": float(self.update_leakage(LeakageRate(), spec.leakage_pairs()).compute()),
        }


def relative_change(result: ErasureResult, prompts: Sequence[Prompt]) -> float:
    """Mean relative change of the edited layers' outputs over the chosen tokens of ``prompts``."""
    return TextSpaceProbe.from_result(result).relative_change(prompts)


def erasure_metrics(result: ErasureResult) -> dict[str, float]:
    """All four metrics of an erasure on its spec's held-out prompts."""
    return TextSpaceProbe.from_result(result).compute()
