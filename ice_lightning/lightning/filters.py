"""Sample filters: keep samples that show an erased concept out of a fine-tune.

A filter is a callable from a training batch to a keep mask (one bool per sample); :func:`drop_rows` removes
the other rows from the batch in place. :class:`CaptionFilter` drops the samples whose caption names an
erased concept or one of its synonyms.

Example:
    >>> from ice_lightning.lightning.filters import CaptionFilter, drop_rows
    >>> keep = CaptionFilter(["red", "crimson"])
    >>> batch = {"captions": ["a red circle", "a green square", "one Crimson box"], "ids": [0, 1, 2]}
    >>> keep(batch)
    [False, True, False]
    >>> drop_rows(batch, keep(batch)), batch
    (2, {'captions': ['a green square'], 'ids': [1]})
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

import torch

from ..core.concepts import ConceptSpec

__all__ = ["CaptionFilter", "drop_rows"]


class CaptionFilter:
    """Keep mask of a dict batch: ``False`` for samples whose caption names one of ``names`` (whole words, any
    case). Samples that show the concept under other words still get through.

    Args:
        names: the concepts and synonyms to look for.
        caption_key: the batch key that holds the captions.
    """

    def __init__(self, names: Iterable[str], caption_key: str = "captions") -> None:
        names = sorted({n for n in names if n}, key=len, reverse=True)  # longest first: "round dot" before "dot"
        if not names:
            raise ValueError("CaptionFilter needs at least one non-empty name to look for")
        self.names, self.caption_key = names, caption_key
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE)

    @classmethod
    def from_spec(cls, spec: ConceptSpec, caption_key: str = "captions") -> CaptionFilter:
        """The filter of every erase concept of ``spec`` and its synonyms."""
        return cls(spec.erase_names(), caption_key)

    def names_concept(self, caption: str) -> bool:
        """Whether ``caption`` names one of the concepts (a whole word, any case)."""
        return self._pattern.search(caption) is not None

    def __call__(self, batch: Any) -> list[bool]:
        if not isinstance(batch, MutableMapping) or self.caption_key not in batch:
            raise TypeError(
                f"the caption filter needs dict batches with the captions under {self.caption_key!r}; got "
                f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, MutableMapping) else "")
                + ": set caption_key to your captions' key"
            )  # fmt: skip
        return [not self.names_concept(c) for c in batch[self.caption_key]]


def drop_rows(batch: MutableMapping, keep: Sequence[bool]) -> int:
    """Remove, in place, the rows of every tensor and list of ``batch`` whose length is the batch's and whose
    ``keep`` entry is ``False``; returns how many rows went."""
    n, kept = len(keep), sum(bool(k) for k in keep)
    if kept == n:
        return 0
    mask = torch.tensor([bool(k) for k in keep])
    for k, v in list(batch.items()):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            batch[k] = v[mask.to(v.device)]
        elif isinstance(v, (list, tuple)) and len(v) == n:
            batch[k] = type(v)(x for x, k_ in zip(v, keep, strict=True) if k_)
    return n - kept
