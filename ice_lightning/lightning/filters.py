"""Sample filters: keep samples that show an erased concept out of a fine-tune.

A filter is any callable from a training batch to a keep mask (one bool per sample);
:class:`~ice_lightning.lightning.filter_callback.SampleFilterCallback` runs each filter on the rows the ones
before it kept and removes the rest from the batch in place (:func:`drop_rows`), before ``training_step``, and
counts what each dropped (``ICECallback``'s export records the counts and each filter's settings). Two kinds ship
here:

- :class:`CaptionFilter` drops the samples whose caption names an erased concept or one of its synonyms. It
  misses data that shows the concept under other words ("a circle" for a red circle).
- :class:`ImageDetectorFilter` calls a classifier on the batch's images or frames and drops the samples it
  flags, whatever their captions say. :class:`NudeNetFilter` is one, for explicit content (the optional
  ``nudenet`` extra); the shapes world's detector is another (``ice_lightning.demos.shapes.ShapesDetectorFilter``).

Example:
    >>> from ice_lightning.lightning.filters import CaptionFilter, drop_rows
    >>> keep = CaptionFilter(["red", "crimson"])
    >>> batch = {"captions": ["a red circle", "a green square", "one Crimson box"], "ids": [0, 1, 2]}
    >>> keep(batch)
    [False, True, False]
    >>> drop_rows(batch, keep(batch)), batch
    (2, {'captions': ['a green square'], 'ids': [1]})

    A detector filter on pixels in [-1, 1] (the data modules' range), here a toy detector of bright images:

    >>> import torch
    >>> from ice_lightning.lightning.filters import ImageDetectorFilter
    >>> bright = ImageDetectorFilter(lambda images: images.mean(dim=(1, 2, 3)) > 0.5, name="bright")
    >>> bright({"pixel_values": torch.stack([torch.ones(3, 4, 4), -torch.ones(3, 4, 4)])})
    [False, True]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.concepts import ConceptSpec

__all__ = ["SampleFilter", "CaptionFilter", "ImageDetectorFilter", "NudeNetFilter", "drop_rows", "filter_name",
           "filter_settings", "keep_mask"]

#: NudeNet's labels of exposed explicit content (its ``*_COVERED`` and face labels are not explicit).
NUDENET_EXPLICIT = (
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)


class SampleFilter:
    """Base class of the shipped filters: ``filter(batch)`` is the keep mask (``True``: train on the sample).

    Any callable with that signature works as a filter; subclassing only adds a readable :attr:`name`, under which
    :class:`~ice_lightning.lightning.filter_callback.SampleFilterCallback` counts the samples the filter dropped.
    """

    name: str = "filter"

    def __call__(self, batch: Any) -> list[bool]:  # pragma: no cover - abstract
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What decides this filter's answers, recorded in the export manifest so that counts compare across
        runs and teams."""
        return {"filter": f"{type(self).__module__}.{type(self).__qualname__}"}


def filter_settings(f: Callable) -> dict[str, Any]:
    """:meth:`SampleFilter.settings` of a shipped filter; a plain callable's qualified name."""
    if callable(getattr(f, "settings", None)):
        return f.settings()
    return {"filter": f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"}


def nudenet_settings(detector: Any) -> dict[str, Any]:
    """NudeNet's model as far as it can be told: the detector's class, the nudenet version, and its model file and
    input resolution where the detector exposes them (NudeNet's default is its 320n model at 320 px)."""
    from importlib import metadata

    try:
        version = metadata.version("nudenet")
    except metadata.PackageNotFoundError:
        version = "not installed"
    cls = f"{type(detector).__module__}.{type(detector).__qualname__}"
    default = "320n (nudenet's default)" if cls.startswith("nudenet.") else None
    return {"detector": cls, "nudenet": version, "model": str(getattr(detector, "model_path", None) or default),
            "resolution": getattr(detector, "inference_resolution", None) or getattr(detector, "input_width", None)}


def filter_name(f: Callable) -> str:
    """The name a filter's dropped samples are counted under: its ``name``, else its class or function name."""
    name = getattr(f, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(f, "__name__", None) or type(f).__name__


def _require_key(batch: Any, key: str, what: str, option: str) -> Any:
    if not isinstance(batch, MutableMapping) or key not in batch:
        keys = f" with keys {sorted(batch)}" if isinstance(batch, MutableMapping) else ""
        raise TypeError(
            f"the {what} needs dict batches with {key!r}; got {type(batch).__name__}{keys}: set {option} to the key "
            "that holds them"
        )
    return batch[key]


class CaptionFilter(SampleFilter):
    """Keep mask of a dict batch: ``False`` for samples whose caption names one of ``names`` (whole words, any
    case). Samples that show the concept under other words still get through.

    Args:
        names: the concepts and synonyms to look for.
        caption_key: the batch key that holds the captions.
    """

    name = "caption"

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

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "names": list(self.names), "caption_key": self.caption_key}

    def names_concept(self, caption: str) -> bool:
        """Whether ``caption`` names one of the concepts (a whole word, any case)."""
        return self._pattern.search(caption) is not None

    def __call__(self, batch: Any) -> list[bool]:
        captions = _require_key(batch, self.caption_key, "caption filter", "caption_key")
        return [not self.names_concept(c) for c in captions]


class ImageDetectorFilter(SampleFilter):
    """Drop the samples in which ``detector`` finds the concept, whatever their captions say.

    Args:
        detector: a callable from images ``(N, 3, H, W)``, float in [0, 1], to one flag or score per image (a bool
            tensor, a float tensor of scores, or a list). Clips ``(B, F, 3, H, W)`` are passed as their ``B * F``
            frames; a clip is dropped when any of its frames is flagged.
        image_key: the batch key that holds the pixels.
        value_range: the range of the batch's pixels (the data modules give ``(-1, 1)``); rescaled to [0, 1].
        threshold: scores at or above it flag an image (ignored for bool flags).
        name: what the dropped samples are counted under.
    """

    def __init__(self, detector: Callable[[Tensor], Any], image_key: str = "pixel_values",
                 value_range: tuple[float, float] = (-1.0, 1.0), threshold: float = 0.5,
                 name: str = "detector") -> None:  # fmt: skip
        if not callable(detector):
            raise TypeError(f"detector must be callable (images -> flags or scores), got {type(detector).__name__}")
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
        self.detector, self.image_key, self.value_range = detector, image_key, (float(lo), float(hi))
        self.threshold, self.name = threshold, name

    def settings(self) -> dict[str, Any]:
        detector = getattr(self.detector, "__qualname__", type(self.detector).__qualname__)
        return {**super().settings(), "detector": detector, "threshold": self.threshold, "image_key": self.image_key,
                "value_range": list(self.value_range)}  # fmt: skip

    @torch.no_grad()
    def flags(self, pixels: Tensor) -> list[bool]:
        """One flag per sample of ``pixels`` (``(B, 3, H, W)`` or ``(B, F, 3, H, W)``, in ``value_range``)."""
        if not isinstance(pixels, Tensor) or pixels.dim() not in (4, 5) or pixels.shape[-3] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(
                f"{self.name} filter: batch[{self.image_key!r}] must be images (B, 3, H, W) or clips (B, F, 3, H, W), "
                f"got {shape}"
            )
        b = pixels.shape[0]
        if b == 0:
            return []
        lo, hi = self.value_range
        images = ((pixels.detach().float() - lo) / (hi - lo)).clamp(0, 1).reshape(-1, *pixels.shape[-3:])
        out = self.detector(images)
        flags = torch.as_tensor(out).reshape(-1).cpu()
        if flags.numel() != images.shape[0]:
            raise ValueError(
                f"{self.name} filter: the detector returned {flags.numel()} results for {images.shape[0]} images; it "
                "must return one flag or score per image"
            )
        if flags.dtype != torch.bool:
            flags = flags.float() >= self.threshold
        return flags.reshape(b, -1).any(dim=1).tolist()

    def __call__(self, batch: Any) -> list[bool]:
        pixels = _require_key(batch, self.image_key, f"{self.name} filter", "image_key")
        return [not f for f in self.flags(pixels)]


class NudeNetFilter(ImageDetectorFilter):
    """Drop samples in which NudeNet (its ONNX detector, shipped in the ``nudenet`` wheel) finds exposed explicit
    content. Needs the optional extra: ``pip install "ice-lightning[nudenet]"``.

    Args:
        classes: the NudeNet labels that count (default: :data:`NUDENET_EXPLICIT`).
        threshold: detection score at or above which a label counts.
        image_key, value_range: as for :class:`ImageDetectorFilter`.
        detector: a ready ``nudenet.NudeDetector`` (or any object with its ``detect(image) -> [{"class",
            "score"}]``); ``None`` loads NudeNet's.
    """

    def __init__(self, classes: Sequence[str] = NUDENET_EXPLICIT, threshold: float = 0.5,
                 image_key: str = "pixel_values", value_range: tuple[float, float] = (-1.0, 1.0),
                 detector: Any = None) -> None:  # fmt: skip
        self.nudenet = detector if detector is not None else load_nudenet()
        self.classes = frozenset(classes)
        super().__init__(self._detect, image_key, value_range, threshold, name="nudenet")

    def _detect(self, images: Tensor) -> list[float]:
        return nudenet_scores(self.nudenet, images, self.classes)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **nudenet_settings(self.nudenet), "classes": sorted(self.classes)}


def nudenet_scores(detector: Any, images: Tensor, classes: frozenset[str]) -> list[float]:
    """Per image ``(N, 3, H, W)`` in [0, 1], NudeNet's highest score among ``classes`` (0 where none is found).
    NudeNet reads uint8 BGR arrays (OpenCV's channel order), ``(H, W, 3)``."""
    arrays = (images.permute(0, 2, 3, 1).flip(-1) * 255).round().to(torch.uint8).cpu().numpy()
    scores = []
    for a in arrays:
        found = [d["score"] for d in detector.detect(a.copy()) if d["class"] in classes]
        scores.append(max(found, default=0.0))
    return scores


def load_nudenet() -> Any:
    """NudeNet's ``NudeDetector``, or an error naming the extra to install."""
    try:
        from nudenet import NudeDetector
    except ImportError as err:
        raise ImportError(
            "NudeNet is not installed: pip install 'ice-lightning[nudenet]' (the nudenet wheel carries its ONNX "
            "detector; it needs onnxruntime and opencv-python-headless)"
        ) from err
    return NudeDetector()


def keep_mask(name: str, flags: Any, n: int) -> list[bool]:
    """The keep flags a filter returned, checked: a bool tensor, a numpy bool array, or a sequence of Python or numpy
    bools, one per sample. Scores, strings and ``None`` are refused with the filter's ``name``: a score of 0.01 or the
    string ``"False"`` would otherwise keep the sample."""
    if flags is None:
        raise TypeError(f"sample filter {name!r} returned None; it must return one keep flag (True: train on it) "
                        "per sample")  # fmt: skip
    if isinstance(flags, torch.Tensor):
        if flags.dtype != torch.bool:
            raise TypeError(f"sample filter {name!r} returned a {flags.dtype} tensor; it must return booleans (True: "
                            "keep), not scores: threshold them in the filter")  # fmt: skip
        flags = flags.reshape(-1).tolist()
    elif hasattr(flags, "dtype") and hasattr(flags, "tolist"):  # a numpy array
        if str(flags.dtype) != "bool":
            raise TypeError(f"sample filter {name!r} returned an array of {flags.dtype}; it must return booleans "
                            "(True: keep), not scores: threshold them in the filter")  # fmt: skip
        flags = flags.reshape(-1).tolist()
    try:
        flags = list(flags)
    except TypeError:
        raise TypeError(f"sample filter {name!r} returned a {type(flags).__name__}; it must return one keep flag "
                        "per sample") from None  # fmt: skip
    wrong = [f for f in flags if not (isinstance(f, bool) or _is_numpy_bool(f))]
    if wrong:
        raise TypeError(f"sample filter {name!r} returned {type(wrong[0]).__name__} values such as {wrong[0]!r}; it "
                        "must return booleans (True: keep), not scores or strings")  # fmt: skip
    if len(flags) != n:
        raise ValueError(
            f"sample filter {name!r} returned {len(flags)} flags for a batch of {n} samples: it must return one "
            "keep flag per sample"
        )
    return [bool(f) for f in flags]


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__module__ == "numpy" and str(getattr(value, "dtype", "")) == "bool"


def drop_rows(batch: MutableMapping, keep: Sequence[bool]) -> int:
    """Remove, in place, the rows of every tensor and list of ``batch`` whose length is the batch's and whose
    ``keep`` entry is ``False``, in nested dicts too; returns how many rows went. A tuple or list of another
    length that holds per-sample tensors is refused (its rows could not be dropped with the others)."""
    n, kept = len(keep), sum(bool(k) for k in keep)
    if kept == n:
        return 0
    _drop(batch, [bool(k) for k in keep], "batch")
    return n - kept


def _drop(batch: MutableMapping, keep: list[bool], where: str) -> None:
    n = len(keep)
    mask = torch.tensor(keep)
    for k, v in list(batch.items()):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            batch[k] = v[mask.to(v.device)]
        elif isinstance(v, MutableMapping):
            _drop(v, keep, f"{where}[{k!r}]")
        elif isinstance(v, (list, tuple)) and len(v) == n:
            batch[k] = type(v)(x for x, k_ in zip(v, keep, strict=True) if k_)
        elif isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n
                                                   for x in v):  # fmt: skip
            raise ValueError(
                f"{where}[{k!r}] is a {type(v).__name__} of {len(v)} tensors with one row per sample: the sample "
                "filters cannot drop its rows with the others. Put them in a dict, or one tensor"
            )
