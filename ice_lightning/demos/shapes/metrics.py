r"""The shapes world's detectors as the product's plug-ins: torchmetrics ``Metric``\ s of what generated samples
show (presence of a concept, accuracy of the others, failures), a sample filter and an image-level presence metric
for ``SampleFilterCallback`` and ``ICEModule``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ...lightning.filters import ImageDetectorFilter
from ...lightning.sample_metrics import ConceptPresence
from .world import Detection, attribute_of, detect

__all__ = ["ConceptPresenceRate", "AttributeAccuracy", "FailureRate", "ShapesDetectorFilter", "ShapesConceptPresence",
           "shows"]  # fmt: skip


class _DetectedRate(Metric):
    """Share of samples for which ``_hit`` holds on the detection (summed states, so ranks reduce)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _hit(self, d: Detection, target: str | None) -> bool:
        raise NotImplementedError

    def _count(self, samples: Tensor, targets) -> None:
        for s, t in zip(samples, targets, strict=True):
            self.hits += int(self._hit(detect(s), t))
            self.total += 1

    def compute(self) -> Tensor:
        return self.hits.double() / self.total.clamp_min(1)


class ConceptPresenceRate(_DetectedRate):
    """Share of samples in which the detector finds ``value`` (a colour, shape or direction), out of all
    samples (blank and garbled ones count as absent; :class:`FailureRate` reports them)."""

    higher_is_better = None

    def __init__(self, attribute: str, value: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if attribute not in ("colour", "shape", "direction"):
            raise ValueError(f"attribute must be colour, shape or direction, got {attribute!r}")
        self.attribute, self.value = attribute, value

    def _hit(self, d: Detection, target: str | None) -> bool:
        return getattr(d, self.attribute) == self.value

    def update(self, samples: Tensor) -> None:
        self._count(samples, [None] * len(samples))


class AttributeAccuracy(_DetectedRate):
    """Share of samples whose detected ``attribute`` equals the one their prompt asked for."""

    higher_is_better = True

    def __init__(self, attribute: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attribute = attribute

    def _hit(self, d: Detection, target: str | None) -> bool:
        return getattr(d, self.attribute) == target

    def update(self, samples: Tensor, targets: list[str]) -> None:
        self._count(samples, targets)


class FailureRate(_DetectedRate):
    """Share of samples the detector calls ``blank`` (or ``garbled``): erasure into nothing, not into
    something else."""

    higher_is_better = False

    def __init__(self, status: str = "blank", **kwargs) -> None:
        super().__init__(**kwargs)
        if status not in ("blank", "garbled"):
            raise ValueError(f"status must be 'blank' or 'garbled', got {status!r}")
        self.status = status

    def _hit(self, d: Detection, target: str | None) -> bool:
        return d.status == self.status

    def update(self, samples: Tensor) -> None:
        self._count(samples, [None] * len(samples))


def shows(samples: Tensor, concept: str) -> list[bool]:
    """Whether the detector sees ``concept`` in each sample (images, or clips read whole; values in [0, 1])."""
    attribute = attribute_of(concept)
    return [getattr(detect(x), attribute) == concept for x in samples]


# -- sample filter -------------------------------------------------------------------------------------
class ShapesDetectorFilter(ImageDetectorFilter):
    """``SampleFilterCallback(ShapesDetectorFilter("red"))``: drop the training samples in which the shapes
    detector sees ``concept`` (a colour, shape or direction), however they are captioned.

    Example:
        >>> from ice_lightning.demos.shapes import ShapeSpec, ShapesDetectorFilter, render
        >>> red = ShapesDetectorFilter("red")
        >>> pixels = torch.stack([render(ShapeSpec("red", "circle", 12, 12, 6)),
        ...                       render(ShapeSpec("green", "circle", 12, 12, 6))]) * 2 - 1
        >>> red({"pixel_values": pixels})
        [False, True]
    """

    def __init__(self, concept: str, image_key: str = "pixel_values") -> None:
        attribute_of(concept)  # an unknown concept is refused here, before training
        self.concept = concept
        super().__init__(self._detect, image_key=image_key, name=f"shapes_detector:{concept}")

    def flags(self, pixels: Tensor) -> list[bool]:
        if pixels.dim() == 5:  # a clip's direction needs its frames together
            lo, hi = self.value_range
            clips = ((pixels.detach().float() - lo) / (hi - lo)).clamp(0, 1)
            return shows(clips, self.concept)
        return super().flags(pixels)

    def _detect(self, images: Tensor) -> list[bool]:
        return shows(images, self.concept)


class ShapesConceptPresence(ConceptPresence):
    """``ICEModule(sample_metrics=[ShapesConceptPresence()])``: share of generated samples in which the shapes
    detector sees the concept (a colour, shape or direction; clips are read whole, so directions count)."""

    name = "shapes_presence"

    def detect(self, images: Tensor) -> Tensor:
        return torch.tensor(shows(images, self.concept), dtype=torch.bool)

    def detect_samples(self, samples: Tensor) -> Tensor:
        if samples.dim() == 4:
            return self.detect(samples)
        return torch.tensor(shows(samples, self.concept), dtype=torch.bool)
