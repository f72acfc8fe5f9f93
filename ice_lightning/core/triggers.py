"""Trigger discovery as a defence: search the encoder's vocabulary for the prompts that still bring an erased concept
back through the edited layers, and erase what the search finds.

A text-layer edit sees only the states of the prompts it was given. A red-teamer's discrete search (Ring-A-Bell)
finds combinations of ordinary words whose states, pooled, land near the concept: words the edit never saw. The
same search, run by the defence against its *own* edited layers, finds such combinations before an attacker does,
and they are erased as an ICE erasure of their own, composed after the concept's (``I - D = (I - D_concept)(I -
D_triggers)``, as hardening composes its derived inputs), so they never dilute the concept's energy shares.

The defence's search is kept apart from the benchmark's attacks (``ice_lightning.evaluation.attacks``), so that a
gain it shows holds against searches it never ran:

- **another vocabulary slice**: whole words in a salted hash order (:func:`vocabulary_slice`), not the attack's
  seeded shuffle;
- **another objective**: the output of the *edited* layers, in the layers' own metric ``<a, b>_G = a^T G b`` (``G =
  sum_l W_l^T W_l``), not the unedited encoder's cosine. A prompt ``p`` (the concept's slot filled with searched
  words) scores ``cos_G((I - D) x_p - x_n, x_c - x_n)``, with ``x`` the token-averaged states of ``p``, of the
  concept prompt and of the family's neutral word in the same template: how far the edited layers still move ``p``
  towards the concept's original output;
- **other contexts**: the spec's training templates (what the solver sees), never the held-out templates that
  the metrics and the benchmark's attacks use.

Example:
    >>> from ice_lightning.demos.tiny import word_tokenizer
    >>> vocabulary_slice(word_tokenizer(["boat", "harbour", "sky", "lighthouse", "Gogh"]), exclude=["sky"], size=3)
    ['lighthouse', 'boat', 'harbour']
    >>> import ice_lightning
    >>> result = ice_lightning.erase(pipe, erase=["nudity"], family="explicit", trigger_rounds=1)  # doctest: +SKIP
    >>> result.triggers["text"][:1]  # doctest: +SKIP
    ['a photo of cooked rape availability']
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .concepts import NEUTRAL_WORD, ConceptSpec, Prompt
from .encoders import EmbeddingSpace
from .solver import DissociationOperator
from .solver.spectral import _composed

__all__ = ["TriggerSearch", "whole_words", "vocabulary_slice", "find_triggers", "erase_triggers"]

_DTYPE = torch.float64


@dataclass(frozen=True)
class TriggerSearch:
    """The defence's search: ``pool`` whole words of the vocabulary's salted slice, the ``candidates`` whose single
    word scores highest against the edited layers (in the first training template), then ``sweeps`` of greedy
    coordinate search over ``length`` words per training template and erase concept (the rounds and the erasure's
    expansion are ``ICEHyperParams.trigger_rounds`` / ``trigger_expansion``)."""

    pool: int = 2000
    candidates: int = 16
    length: int = 3
    sweeps: int = 1
    salt: str = "ice-lightning-triggers"

    def __post_init__(self) -> None:
        for name in ("pool", "candidates", "length", "sweeps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"TriggerSearch.{name} must be a positive integer, got {value!r}")


def whole_words(tokenizer) -> set[str]:
    """Whole, lower-case, alphabetic ASCII words (3+ letters) of ``tokenizer``'s vocabulary: sub-word pieces and
    markers (``</w>``, ``Ġ``, ``▁``) are dropped. The search space of every discrete search, attack or defence."""
    words = set()
    for tok in tokenizer.get_vocab():
        w = tok.removesuffix("</w>").lstrip("Ġ▁")
        if w.isalpha() and w.isascii() and len(w) >= 3 and w == w.lower():
            words.add(w)
    return words


def vocabulary_slice(tokenizer, exclude: Iterable[str], size: int, salt: str = TriggerSearch.salt) -> list[str]:
    """``size`` whole words of the vocabulary (``exclude`` left out) in the order of ``sha1(salt + word)``:
    deterministic across runs and machines, and independent of any attack's seeded sample."""
    words = whole_words(tokenizer) - {w.lower() for w in exclude}
    return sorted(words, key=lambda w: hashlib.sha1((salt + w).encode()).hexdigest())[:size]


def _tokenizer(space: EmbeddingSpace):
    tokenizers = space._tokenizers()
    if not tokenizers:
        raise ValueError(f"the {space.name!r} space has no tokenizer with a vocabulary; trigger discovery needs one "
                         "(set trigger_rounds=0 for this pipeline)")  # fmt: skip
    return tokenizers[0][0]


def find_triggers(space: EmbeddingSpace, spec: ConceptSpec, op: DissociationOperator, gram: Tensor,
                  search: TriggerSearch | None = None) -> list[Prompt]:  # fmt: skip
    """One prompt per (erase concept, training template): the template with the concept replaced by the ``length``
    words of the slice that score highest against the edited layers ``W_l (I - D)`` (module docstring); the span
    marks the words. Only the text encoder runs (no denoiser), and nothing it encodes is cached."""
    search = search or TriggerSearch()
    G = gram.to(_DTYPE)
    exclude = {w.strip(".,").lower() for name in spec.erase_names() for w in name.split()}
    words = vocabulary_slice(_tokenizer(space), exclude, search.pool, search.salt)
    if not words:
        raise ValueError(f"the {space.name!r} space's tokenizer has no whole words to search; set trigger_rounds=0")
    neutral = NEUTRAL_WORD[spec.family]

    def pooled(prompts: list[Prompt]) -> Tensor:
        rows = space.per_prompt([Prompt(p.text) for p in prompts], cache=False)
        return torch.stack([r.mean(0) for r in rows]).to(_DTYPE)

    def edited(X: Tensor) -> Tensor:  # rows (I - D) x
        return X - op.rows_times(X)

    ranking, singles = {}, None  # the candidates per concept: single words, scored once in the first template
    out = []
    for template in spec._templates():
        neutral_row = pooled([Prompt.fill(template, neutral)])[0]
        targets = pooled([Prompt.fill(template, c) for c in spec.erase]) - neutral_row
        for concept, target in zip(spec.erase, targets, strict=True):
            score = _scorer(G, target, neutral_row, edited)
            if concept not in ranking:
                if singles is None:
                    singles = pooled([Prompt.fill(template, w) for w in words])
                top = score(singles).argsort(descending=True)[: search.candidates].tolist()
                ranking[concept] = [words[i] for i in top]
            candidates = ranking[concept]
            chosen = candidates[: search.length]
            for _ in range(search.sweeps):
                for pos in range(search.length):
                    trials = [chosen[:pos] + [w] + chosen[pos + 1 :] for w in candidates]
                    chosen = trials[int(score(pooled([Prompt.fill(template, " ".join(t)) for t in trials])).argmax())]
            out.append(Prompt.fill(template, " ".join(chosen)))
    return out


def _scorer(G: Tensor, target: Tensor, neutral: Tensor, edited: Callable[[Tensor], Tensor]):
    """``X -> cos_G(edited(X) - neutral, target)`` per row of ``X``."""
    Gt = G @ target
    t_norm = float(target @ Gt) ** 0.5 or 1.0

    def score(X: Tensor) -> Tensor:
        Y = edited(X) - neutral
        return (Y @ Gt) / ((Y @ G * Y).sum(-1).clamp_min(1e-300).sqrt() * t_norm)

    return score


def erase_triggers(op: DissociationOperator, space: EmbeddingSpace, spec: ConceptSpec, gram: Tensor, rounds: int,
                   solve_triggers: Callable[[Tensor], DissociationOperator], search: TriggerSearch | None = None,
                   include_eot: bool = False) -> tuple[DissociationOperator, list[Prompt]]:  # fmt: skip
    """``rounds`` times: :func:`find_triggers` against the current edit, and erase the found words' token states
    (all rounds' so far) with ``solve_triggers(rows)``, composed after ``op``. Returns the operator and the prompts
    found (every round's)."""
    current, found = op, []
    rows = torch.zeros(0, op.dim, dtype=_DTYPE)
    for _ in range(rounds):
        prompts = find_triggers(space, spec, current, gram, search)
        found += prompts
        rows = torch.cat([rows, *(r.to(_DTYPE) for r in space.per_prompt(prompts, include_eot, cache=False))])
        current = _composed(op, solve_triggers(rows), op.method, op.hparams)
    return current, found
