"""The concept's imprint on its context: what the concept changes in the *other* tokens of a prompt.

A text encoder with attention spreads a concept over the whole prompt: in "a painting by Van Gogh", the states of
"a", "painting" and "by" (and, in CLIP, every token after the name, the end-of-text token included) move towards
Van Gogh. ICE's erase rows are the concept's own tokens, so that shift passes through the edited layers untouched,
and every attack scored on a whole prompt finds it there: a Ring-A-Bell prompt, whose words pull the surrounding
tokens the same way, or an adversarial input that replaces only the concept's tokens.

:func:`context_shifts` measures the imprint on the training templates alone: each context token's state in the
erase prompt minus its mean state, at the same position, in the same template filled with each preserve concept (the
concept's peers, so what every artist or object does to a template stays), summed over the prompt's context tokens.
``ICEHyperParams.context_expansion`` (2 by default) erases these rows as an erasure of their own, applied to what the
concept's erasure leaves: ``I - D = (I - D_context)(I - D_concept)`` (``docs/method.md``, section 9).

Example:
    >>> import ice_lightning
    >>> result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")  # context_expansion=2  # doctest: +SKIP
    >>> ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", context_expansion=0)  # leave it  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from .concepts import ConceptSpec, Prompt
from .encoders import EmbeddingSpace, Request

__all__ = ["context_parts", "context_sides", "context_requests", "context_shifts"]

#: Shift rows below this share of the largest one's norm are dropped (a prompt whose context does not move).
_NEGLIGIBLE = 1e-6


def context_parts(prompt: Prompt) -> tuple[Prompt, Prompt]:
    """The tokens before the concept's span and after it, as two prompts on the same text."""
    lo, hi = prompt.span if prompt.span is not None else (0, len(prompt.text))
    return Prompt(prompt.text, (0, lo)), Prompt(prompt.text, (hi, len(prompt.text)))


def context_sides(prompt: Prompt, include_eot: bool = False) -> list[Request]:
    """The requests for ``prompt``'s context sides that hold a token: before the concept, then after it (with
    ``include_eot``, the side after it with its end-of-text token, which it always has). Two prompts of one template
    have the same sides, in the same order."""
    sides = []
    for side, part in enumerate(context_parts(prompt)):
        eot = include_eot and side == 1
        if eot or part.span[0] < part.span[1]:  # an empty side has no token
            sides.append((part, eot))
    return sides


def _filled(spec: ConceptSpec) -> list[tuple[Prompt, list[Prompt]]]:
    """Per training template and erase name: the erase prompt and the same template with each preserve concept."""
    return [(Prompt.fill(t, n), [Prompt.fill(t, p) for p in spec.preserve]) for t in spec._templates()
            for n in spec.erase_names()]  # fmt: skip


def context_requests(spec: ConceptSpec, include_eot: bool = False) -> list[Request]:
    """What :func:`context_shifts` encodes: both context sides of every erase prompt and of its peers (with
    ``include_eot``, the side after the concept with its end-of-text token). Their texts are the spec's erase and
    preserve prompts: asked for in the same :meth:`EmbeddingSpace.requested` call, each text is encoded once."""
    wanted: dict[Request, None] = {}
    for own, peers in _filled(spec) if spec.preserve else ():
        for q in (own, *peers):
            wanted.update(dict.fromkeys(context_sides(q, include_eot)))
    return list(wanted)


def context_shifts(space: EmbeddingSpace, spec: ConceptSpec, include_eot: bool = False) -> Tensor | None:
    """(n, d) float64 rows, one per training template and erase name: the prompt's total imprint, the sum over its
    context tokens of each token's state minus its mean over the same template filled with each preserve concept
    (tokens matched by position before and after the concept; with ``include_eot`` the end-of-text token too).
    ``None`` where there is nothing to measure: a pooled space (one state per prompt), no preserve concept to compare
    with, or no context token that moves.

    The sum, not a row per token: what the concept adds to every context token alike adds up in the sum, and it is
    what an attention read of the whole prompt (or a token-averaged score) finds; each token's own remainder does not.
    Erased per token instead, the same robustness took far more collateral (``docs/method.md``, section 9)."""
    if space.pooled or not spec.preserve:
        return None
    wanted = context_requests(spec, include_eot)
    states = dict(zip(wanted, space.requested(wanted), strict=True))
    rows = []
    for own, peers in _filled(spec):
        total = None
        # one template: the peers' sides are the erase prompt's, in the same order (context_sides)
        for side, *peer_sides in zip(*(context_sides(q, include_eot) for q in (own, *peers)), strict=True):
            mine = states[side]
            theirs = [r for r in (states[s] for s in peer_sides) if r.shape[0] == mine.shape[0]]
            if theirs:
                shift = (mine.to(torch.float64) - torch.stack(theirs).to(torch.float64).mean(0)).sum(0)
                total = shift if total is None else total + shift
        if total is not None:
            rows.append(total)
    if not rows:
        return None
    shifts = torch.stack(rows)
    norms = shifts.norm(dim=1)
    shifts = shifts[norms > _NEGLIGIBLE * norms.max()]
    return shifts if shifts.shape[0] else None
