"""Text-space erasure metrics (``ICE_METHOD.md`` section 5), computed on the edited layers' outputs.

For an edited layer ``K(x) = W x + b`` and its edit ``K'``, on held-out prompts:

- ``erasure``: mean ``||K'(c) - K(c)|| / ||K(c)||`` over the erased concept's tokens (1.0 = removed);
- ``collateral_near`` / ``collateral_far``: the same over preserve-concept tokens / unrelated prompts
  (0.0 = untouched);
- ``leakage``: share of (prompt, layer) pairs whose edited, token-averaged output is still closer to
  the original prompt's than to the same prompt with the concept replaced by a neutral word.

The original outputs come from the stored low-rank delta (``W = W' + L R``), so no copy of the
original model is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .concepts import Prompt
from .erase import ErasureResult

__all__ = ["relative_change", "leakage_rate", "erasure_metrics"]


def _outputs(result: ErasureResult, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """(K(x), K'(x)) in float64 for layer ``name`` and states ``x`` (n, d)."""
    module = result.modules()[name]
    L, R = result.weight_delta(name)
    W_new = module.weight.detach().to(L.device, torch.float64)
    x = x.to(L.device, torch.float64)
    b = 0.0 if module.bias is None else module.bias.detach().to(L.device, torch.float64)
    after = x @ W_new.T + b
    before = after + (x @ R.T) @ L.T
    return before, after


@torch.no_grad()
def relative_change(result: ErasureResult, prompts: Sequence[Prompt]) -> float:
    """Mean over edited layers and chosen tokens of ``||K'(x) - K(x)|| / ||K(x)||``."""
    if not prompts:
        return float("nan")
    vals = []
    for name, space in result.layer_spaces.items():
        x = result.spaces[space].token_states(prompts)
        if x.shape[0] == 0:
            continue
        before, after = _outputs(result, name, x)
        vals.append(((after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)).mean())
    return float(torch.stack(vals).mean()) if vals else float("nan")


@torch.no_grad()
def leakage_rate(result: ErasureResult, pairs: Sequence[tuple[Prompt, Prompt]]) -> float:
    """Share of (pair, layer) where the edited output stays closer to the concept than to the neutral."""
    if not pairs:
        return float("nan")
    hits, total = 0, 0
    for name, space in result.layer_spaces.items():
        sp = result.spaces[space]
        whole = [Prompt(p.text) for p, _ in pairs], [Prompt(q.text) for _, q in pairs]
        for xc, xn in zip(sp.per_prompt(whole[0]), sp.per_prompt(whole[1]), strict=True):
            before_c, after_c = _outputs(result, name, xc)
            before_n, _ = _outputs(result, name, xn)
            k_orig, k_edit, k_neutral = before_c.mean(0), after_c.mean(0), before_n.mean(0)
            hits += int((k_edit - k_orig).norm() < (k_edit - k_neutral).norm())
            total += 1
    return hits / max(total, 1)


def erasure_metrics(result: ErasureResult) -> dict[str, float]:
    """All four text-space metrics on the spec's held-out prompts."""
    spec = result.spec
    return {
        "erasure": relative_change(result, spec.heldout_erase_prompts()),
        "collateral_near": relative_change(result, spec.heldout_near_prompts()),
        "collateral_far": relative_change(result, spec.heldout_far_prompts()),
        "leakage": leakage_rate(result, spec.leakage_pairs()),
    }
