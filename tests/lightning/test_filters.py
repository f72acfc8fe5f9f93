"""Sample filters: detector filters on images and clips, the callback's chain and its per-filter counts."""

import sys

import pytest
import torch

from ice_lightning import SampleFilterCallback
from ice_lightning.core.concepts import ConceptSpec
from ice_lightning.demos.shapes import ShapesDetectorFilter, ShapeSpec, render, render_clip
from ice_lightning.lightning.filters import NUDENET_EXPLICIT, CaptionFilter, ImageDetectorFilter, NudeNetFilter


def _bright(images):
    return images.mean(dim=(1, 2, 3))  # a score per image


def test_detector_filter_reads_images_and_clips_in_the_batch_range():
    f = ImageDetectorFilter(_bright, threshold=0.5, name="bright")
    images = torch.stack([torch.full((3, 4, 4), v) for v in (1.0, -1.0, 0.2, -0.2)])  # [-1, 1]: 1.0, 0.0, 0.6, 0.4
    assert f({"pixel_values": images}) == [False, True, False, True]
    clips = torch.stack([torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)]),  # one bright frame
                         torch.full((2, 3, 4, 4), -1.0)])  # fmt: skip
    assert f({"pixel_values": clips}) == [False, True]
    assert ImageDetectorFilter(lambda x: x.mean(dim=(1, 2, 3)) > 0.5, value_range=(0, 1))(
        {"pixel_values": torch.stack([torch.ones(3, 2, 2), torch.zeros(3, 2, 2)])}
    ) == [False, True]


def test_detector_filter_errors_name_the_problem():
    f = ImageDetectorFilter(_bright, name="bright")
    with pytest.raises(ValueError, match=r"bright filter: batch\['pixel_values'\] must be images"):
        f({"pixel_values": torch.zeros(2, 4, 4)})
    with pytest.raises(TypeError, match="image_key"):
        f({"images": torch.zeros(2, 3, 4, 4)})
    with pytest.raises(ValueError, match="returned 1 results for 2 images"):
        ImageDetectorFilter(lambda x: torch.tensor([True]))({"pixel_values": torch.zeros(2, 3, 4, 4)})
    with pytest.raises(TypeError, match="detector must be callable"):
        ImageDetectorFilter("not a detector")


def test_shapes_detector_filter_drops_red_shapes_whatever_the_caption():
    red, green = ShapeSpec("red", "circle", 12, 12, 6), ShapeSpec("green", "square", 12, 12, 6)
    images = torch.stack([render(red), render(green), render(ShapeSpec("red", "triangle", 10, 12, 7))]) * 2 - 1
    batch = {"pixel_values": images, "captions": ["a circle", "a green square", "a shape"]}
    assert ShapesDetectorFilter("red")(batch) == [False, True, False]
    assert ShapesDetectorFilter("circle")(batch) == [False, True, True]
    clips = torch.stack([render_clip(red, "left"), render_clip(green, "right")]) * 2 - 1
    assert ShapesDetectorFilter("left")({"pixel_values": clips}) == [False, True]
    assert ShapesDetectorFilter("red")({"pixel_values": clips}) == [False, True]
    with pytest.raises(ValueError, match="unknown shapes concept 'purple'"):
        ShapesDetectorFilter("purple")


class _FakeNudeNet:
    """NudeNet's interface: ``detect(BGR uint8 image) -> [{"class", "score", "box"}]``; flags images whose blue
    channel (BGR index 0) is bright, so the test also checks the channel order."""

    def __init__(self):
        self.shapes = []

    def detect(self, image):
        self.shapes.append((image.shape, str(image.dtype)))
        blue = float(image[..., 0].mean()) / 255
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": blue, "box": [0, 0, 1, 1]},
                {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}]  # fmt: skip


def test_nudenet_filter_counts_only_exposed_classes_above_threshold():
    fake = _FakeNudeNet()
    f = NudeNetFilter(detector=fake, threshold=0.6)
    blue, red = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    blue[2], red[0] = 1.0, 1.0  # RGB
    assert f({"pixel_values": torch.stack([blue, red]) * 2 - 1}) == [False, True]
    assert fake.shapes == [((8, 8, 3), "uint8")] * 2
    faces_only = NudeNetFilter(classes=["FACE_MALE"], detector=_FakeNudeNet())
    assert faces_only({"pixel_values": torch.stack([blue]) * 2 - 1}) == [True]
    assert "MALE_GENITALIA_EXPOSED" in NUDENET_EXPLICIT and "FACE_FEMALE" not in NUDENET_EXPLICIT


def test_nudenet_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ice-lightning\[nudenet\]'"):
        NudeNetFilter()


def _batch(n=6):
    return {"captions": [f"a red thing {i}" if i % 3 == 0 else f"a blue thing {i}" for i in range(n)],
            "pixel_values": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(),
            "ids": list(range(n))}  # fmt: skip


def test_callback_chains_filters_in_order_and_counts_each():
    seen = []

    def odd_ids(batch):  # a plain function: counted under its name
        seen.append(list(batch["ids"]))
        return [i % 2 == 0 for i in batch["ids"]]

    ice = SampleFilterCallback([odd_ids, odd_ids], drop_concepts=ConceptSpec(erase=["red"]))
    assert ice.filter_names == ["caption", "odd_ids", "odd_ids#2"]
    batch = _batch()
    assert ice.filter_batch(batch) == 4
    assert batch["ids"] == [2, 4] and batch["pixel_values"][:, 0, 0, 0].tolist() == [2.0, 4.0]
    assert seen == [[1, 2, 4, 5], [2, 4]]  # each filter sees only what the ones before it kept
    assert ice.state.dropped_by_filter == {"caption": 2, "odd_ids": 2, "odd_ids#2": 0}
    assert ice.dropped_samples == 4
    state = ice.state_dict()
    assert state["dropped_by_filter"] == {"caption": 2, "odd_ids": 2, "odd_ids#2": 0}
    again = SampleFilterCallback([odd_ids, odd_ids], drop_concepts=ConceptSpec(erase=["red"]))
    again.load_state_dict(state)
    assert again.state.dropped_by_filter == state["dropped_by_filter"] and again.dropped_samples == 4
    summary = ice.summary()
    assert summary["sample_filters"] == ["caption", "odd_ids", "odd_ids#2"]
    assert summary["dropped_by_filter"] == {"caption": 2, "odd_ids": 2, "odd_ids#2": 0}
    empty = {"captions": ["a red cat"], "ids": [0]}
    assert ice.filter_batch(empty) == 1 and empty["ids"] == []  # the later filters do not run on nothing


def test_callback_refuses_bad_filters_and_bad_masks():
    with pytest.raises(TypeError, match="sample_filter must be callables"):
        SampleFilterCallback(["not callable"])
    ice = SampleFilterCallback(lambda b: [True])
    with pytest.raises(ValueError, match="returned 1 flags for a batch of 6 samples"):
        ice.filter_batch(_batch())
    with pytest.raises(TypeError, match="dict batches"):
        ice.filter_batch([torch.zeros(2)])


def test_detector_filter_as_the_callbacks_sample_filter_in_a_config():
    """What LightningCLI builds from a config's ``sample_filter: {class_path: ..., init_args: ...}``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SampleFilterCallback, "ice")
    cfg = parser.parse_object({"ice": {"sample_filter": [
        {"class_path": "ice_lightning.demos.shapes.ShapesDetectorFilter", "init_args": {"concept": "red"}},
        {"class_path": "ice_lightning.lightning.filters.CaptionFilter", "init_args": {"names": ["crimson"]}},
    ]}})  # fmt: skip
    ice = parser.instantiate_classes(cfg)["ice"]
    assert ice.filter_names == ["shapes_detector:red", "caption"]
    assert isinstance(ice.sample_filters[0], ShapesDetectorFilter) and isinstance(ice.sample_filters[1], CaptionFilter)


def test_real_nudenet_when_installed():
    """With the ``nudenet`` extra installed, its ONNX detector runs on our batches (plain images hold nothing)."""
    pytest.importorskip("nudenet")
    f = NudeNetFilter()
    images = torch.stack([torch.full((3, 64, 64), v) for v in (-1.0, 0.0, 1.0)])
    assert f({"pixel_values": images}) == [True, True, True]


@pytest.mark.parametrize(
    ("returned", "error", "message"),
    [
        ([0.01] * 6, TypeError, r"'scores' returned float values such as 0.01; it must return booleans"),
        (["False"] * 6, TypeError, r"'scores' returned str values such as 'False'"),
        (None, TypeError, r"'scores' returned None; it must return one keep flag"),
        (torch.full((6,), 0.01), TypeError, r"'scores' returned a torch.float32 tensor"),
    ],
)
def test_filters_must_return_booleans_and_errors_name_the_filter(returned, error, message):
    def scores(batch):
        return returned

    ice = SampleFilterCallback(scores)
    batch = _batch()
    with pytest.raises(error, match=message):
        ice.filter_batch(batch)
    assert batch["ids"] == _batch()["ids"]  # nothing dropped


def test_filters_accept_bool_tensors_numpy_bools_and_filter_nested_dicts():
    import numpy as np

    keep = [True, False, True, False, True, False]
    for returned in (torch.tensor(keep), np.array(keep), [np.bool_(k) for k in keep]):
        ice = SampleFilterCallback(lambda b, r=returned: r)
        batch = {**_batch(), "cond": {"input_ids": torch.arange(6)[:, None], "names": list("abcdef")}}
        assert ice.filter_batch(batch) == 3
        assert batch["cond"]["input_ids"][:, 0].tolist() == [0, 2, 4] and batch["cond"]["names"] == ["a", "c", "e"]
        assert batch["ids"] == [_batch()["ids"][i] for i in (0, 2, 4)]
    ice = SampleFilterCallback(lambda b: keep)
    batch = {**_batch(), "pair": (torch.zeros(6, 2), torch.ones(6, 2))}
    with pytest.raises(ValueError, match=r"batch\['pair'\] is a tuple of 2 tensors with one row per sample"):
        ice.filter_batch(batch)
