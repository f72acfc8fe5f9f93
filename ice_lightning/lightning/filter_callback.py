"""``SampleFilterCallback``: run the sample filters (:mod:`ice_lightning.lightning.filters`) on every training
batch before ``training_step``, and count what each drops."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..core.concepts import ConceptSpec
from .filters import CaptionFilter, drop_rows, filter_name, filter_settings, keep_mask

__all__ = ["SampleFilterCallback", "FilterState", "filtering_summary"]


def _as_filters(sample_filter: Any) -> list[Callable]:
    if sample_filter is None:
        return []
    filters = list(sample_filter) if isinstance(sample_filter, (list, tuple)) else [sample_filter]
    bad = [type(f).__name__ for f in filters if not callable(f)]
    if bad:
        raise TypeError(f"sample_filter must be callables from a batch to a keep mask (one bool per sample), got {bad}")
    return filters


def _unique_names(filters: list[Callable]) -> list[str]:
    """Each filter's name, numbered where two share one (``detector``, ``detector#2``)."""
    names: list[str] = []
    for f in filters:
        base, k = filter_name(f), 1
        name = base
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.append(name)
    return names


def _batch_size(batch: MutableMapping) -> int:
    """The batch's number of samples: the length of its captions, else of its first tensor or list."""
    for key in ("captions", "pixel_values"):
        if key in batch:
            return len(batch[key])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0 or isinstance(v, (list, tuple)):
            return len(v)
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}: it holds no tensor or list")


@dataclass
class FilterState:
    """What a :class:`SampleFilterCallback` carries through a checkpoint.

    Attributes:
        dropped_samples: training samples removed, in all.
        dropped_by_filter: ``{filter name: samples it removed}`` (a sample is counted under the first filter that
            drops it).
    """

    dropped_samples: int = 0
    dropped_by_filter: dict[str, int] = field(default_factory=dict)


class SampleFilterCallback(Callback):
    """Drop the training samples that show an erased concept, before ``training_step``.

    Re-applying an erasure alone does not stop a fine-tune on data that shows the concept: the denoiser learns it
    back from what the edit leaves of the prompt (measured in ``benchmarks/shapes_resurgence.py``). This callback
    runs its filters in order on each training batch, each on the rows the ones before it kept; the other rows are
    removed from the batch in place (every tensor and list of the batch's length, nested dicts too). A batch left
    empty reaches ``training_step`` empty (``ICEModule`` then skips the step). What each filter dropped is counted
    in its state, and ``ICECallback``'s export records it in the manifest (``sample_filtering``).

    Args:
        sample_filter: one filter or a list: callables from a dict batch to a keep mask (one bool per sample):
            :class:`CaptionFilter`, :class:`ImageDetectorFilter`, :class:`NudeNetFilter`, the shapes world's
            ``ShapesDetectorFilter``, or your own.
        drop_concepts: a :class:`~ice_lightning.core.concepts.ConceptSpec` (usually the ``ICECallback``'s): a
            :class:`CaptionFilter` of its erase concepts and their synonyms goes first (whole words, any case).
        caption_key: the batch key that holds the captions (for ``drop_concepts``).

    Example:
        >>> from ice_lightning.core.concepts import ConceptSpec
        >>> guard = SampleFilterCallback(drop_concepts=ConceptSpec(erase=["red"], synonyms={"red": ["crimson"]}))
        >>> batch = {"captions": ["a red circle", "a green square", "one Crimson box"], "ids": [0, 1, 2]}
        >>> guard.filter_batch(batch), batch["ids"], guard.state.dropped_by_filter
        (2, [1], {'caption': 2})
    """

    def __init__(
        self,
        sample_filter: Callable[[Any], Sequence[bool]] | list[Callable[[Any], Sequence[bool]]] | None = None,
        drop_concepts: ConceptSpec | None = None,
        caption_key: str = "captions",
    ) -> None:
        super().__init__()
        self.sample_filters = _as_filters(sample_filter)
        if drop_concepts is not None:
            self.sample_filters.insert(0, CaptionFilter.from_spec(drop_concepts, caption_key))
        if not self.sample_filters:
            raise ValueError("SampleFilterCallback needs a sample_filter or drop_concepts: it has nothing to run")
        self.filter_names = _unique_names(self.sample_filters)
        self.state = FilterState()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filters=self.filter_names)

    @property
    def dropped_samples(self) -> int:
        return self.state.dropped_samples

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.filter_batch(batch)

    def filter_batch(self, batch: Any) -> int:
        """Run the sample filters on ``batch`` (in place, in order, each on what the ones before it kept) and
        count what each dropped; returns how many samples went."""
        if self.sample_filters and not isinstance(batch, MutableMapping):
            raise TypeError(f"sample filters need dict batches (rows are dropped by key); got {type(batch).__name__}")
        dropped = 0
        for name, f in zip(self.filter_names, self.sample_filters, strict=True):
            n = _batch_size(batch)
            if n == 0:
                break
            keep = keep_mask(name, f(batch), n)
            gone = drop_rows(batch, keep)
            self.state.dropped_by_filter[name] = self.state.dropped_by_filter.get(name, 0) + gone
            dropped += gone
        self.state.dropped_samples += dropped
        return dropped

    def summary(self) -> dict[str, Any]:
        """The filters, their settings and what each dropped (goes into the export manifest)."""
        return {"sample_filters": list(self.filter_names), "dropped_samples": self.state.dropped_samples,
                "dropped_by_filter": dict(self.state.dropped_by_filter),
                "filter_settings": {n: filter_settings(f) for n, f in zip(self.filter_names, self.sample_filters,
                                                                          strict=True)}}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"dropped_samples": self.state.dropped_samples, "dropped_by_filter": dict(self.state.dropped_by_filter)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = FilterState(state_dict["dropped_samples"], dict(state_dict["dropped_by_filter"]))


def filtering_summary(callbacks: Iterable[Any]) -> dict[str, Any] | None:
    """What every :class:`SampleFilterCallback` among ``callbacks`` dropped, merged (``None``: there is none)."""
    guards = [c for c in callbacks if isinstance(c, SampleFilterCallback)]
    if not guards:
        return None
    by_filter: dict[str, int] = {}
    for g in guards:
        for name, n in g.state.dropped_by_filter.items():
            by_filter[name] = by_filter.get(name, 0) + n
    return {"sample_filters": [n for g in guards for n in g.filter_names],
            "dropped_samples": sum(g.state.dropped_samples for g in guards), "dropped_by_filter": by_filter,
            "filter_settings": {n: s for g in guards for n, s in g.summary()["filter_settings"].items()}}
