"""The shapes world: exact detectors, torchmetrics, data, the pixel-space pipeline and its training CLI."""

import pytest
import torch

import ice_lightning
from ice_lightning.demos.shapes import (
    COLOURS,
    SHAPES,
    SYNONYMS,
    AttributeAccuracy,
    ConceptPresenceRate,
    FailureRate,
    ShapesDataModule,
    ShapesDataset,
    ShapeSpec,
    detect,
    render,
)


@pytest.mark.parametrize(("size", "frames"), [(24, 0), (16, 6)])
def test_detector_is_exact_on_what_the_renderer_draws(size, frames):
    ds = ShapesDataset(400, size, frames=frames, seed=3)
    for i in range(len(ds)):
        x = ds[i]
        d = detect((x["pixel_values"] + 1) / 2)
        assert (d.colour, d.shape, d.direction or "", d.status) == (x["colour"], x["shape"], x["direction"], "ok")


def test_blank_and_garbled_are_counted_apart():
    blank = torch.full((3, 24, 24), 0.9)
    assert detect(blank).status == "blank"
    grey = render(ShapeSpec("red", "square", 12, 12, 5))
    grey[:, 7:18, 7:18] = 0.4  # a clean square in no palette colour
    assert detect(grey) == (None, "square", None, "garbled")
    noise = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert detect(noise).status == "garbled"
    samples = torch.stack([blank, grey, render(ShapeSpec("red", "circle", 12, 12, 5))])
    for status, expected in (("blank", 1 / 3), ("garbled", 1 / 3)):
        m = FailureRate(status)
        m.update(samples)
        assert float(m.compute()) == pytest.approx(expected)
    red = ConceptPresenceRate("colour", "red")
    red.update(samples)
    assert float(red.compute()) == pytest.approx(1 / 3)  # the blank and the grey one are not red
    acc = AttributeAccuracy("shape")
    acc.update(samples, ["circle", "square", "circle"])
    assert float(acc.compute()) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="attribute must be"):
        ConceptPresenceRate("size", "big")


def test_data_is_seeded_and_filters_concepts():
    a, b = ShapesDataset(8, seed=1), ShapesDataset(8, seed=1)
    assert all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) and a[i]["captions"] == b[i]["captions"]
               for i in range(8))  # fmt: skip
    assert a[0]["pixel_values"].shape == (3, 24, 24) and a[0]["pixel_values"].min() >= -1
    held_out = ShapesDataset(50, held_out=True)
    train_words = {w for v in SYNONYMS.values() for w in v[0]}
    for i in range(50):  # held-out captions use only held-out colour and shape words
        x = held_out[i]
        assert not any(w in x["captions"].split() for w in train_words if " " not in w), x["captions"]
    dm = ShapesDataModule(train_size=200, val_size=20, batch_size=16, exclude=["red"])
    dm.setup()
    assert all(dm.train[i]["colour"] != "red" for i in range(len(dm.train)))
    assert 100 < len(dm.train) < 200
    only = ShapesDataModule(train_size=200, val_size=20, only=["triangle"])
    only.setup()
    assert {only.train[i]["shape"] for i in range(len(only.train))} == {"triangle"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (16, 3, 24, 24) and len(batch["captions"]) == 16
    video = ShapesDataset(4, size=16, frames=6)
    assert video[0]["pixel_values"].shape == (6, 3, 16, 16) and video[0]["direction"] in ("left", "right", "up", "down")
    assert set(COLOURS) >= {"red", "green", "blue", "yellow"} and set(SHAPES) == {"circle", "square", "triangle"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shapes-image", "shapes-video"])
def test_pixel_pipeline_round_trip_and_erasure(kind, tmp_path):
    from ice_lightning.core.pipelines import load_pipeline_folder
    from ice_lightning.demos.shapes import new_pipeline
    from ice_lightning.demos.shapes.pipeline import PixelDiffusionPipeline

    pipe = new_pipeline(kind)
    pipe.save_pretrained(tmp_path)
    back = load_pipeline_folder(str(tmp_path))
    assert isinstance(back, PixelDiffusionPipeline)
    assert back.tokenizer.model_max_length == 16 and back.text_encoder.config.use_attention_mask
    for (n, a), b in zip(pipe.unet.state_dict().items(), back.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    g = torch.Generator().manual_seed(0)
    out = back(["a red circle"], num_inference_steps=2, generator=g, num_frames=4, output_type="pt")
    shape = (1, 4, 3, 16, 16) if kind == "shapes-video" else (1, 3, 24, 24)
    assert (out.frames if kind == "shapes-video" else out.images).shape == shape
    result = ice_lightning.erase(back, erase=["red"], preserve=["green", "blue", "yellow"], templates=["a {} circle"])
    assert all(n.startswith("unet.") and n.endswith(("attn2.to_k", "attn2.to_v")) for n in result.layers)
    # shipping keeps only the UNet (fp16) and the scheduler; the encoder comes from the MiniLM wheel
    from ice_lightning.demos.shapes import load_shapes_pipeline, save_shapes_model

    folder = save_shapes_model(pipe, kind, root=tmp_path / "models")
    assert sorted(p.name for p in folder.iterdir()) == ["scheduler", "unet"]
    shipped = load_shapes_pipeline(kind, root=tmp_path / "models")
    for (n, a), b in zip(pipe.unet.state_dict().items(), shipped.unet.state_dict().values(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), n
    with pytest.raises(FileNotFoundError, match="no shipped"):
        load_shapes_pipeline(kind, root=tmp_path / "nothing")


@pytest.mark.slow
def test_shapes_model_trains_through_the_cli_and_reloads(tmp_path):
    from ice_lightning.cli import main
    from ice_lightning.core.pipelines import load_pipeline_folder

    out = tmp_path / "pipeline"
    rc = main(["fit", "--config", "configs/shapes_t2i.yaml", "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "2", "--data.batch_size", "8", "--data.train_size", "16",
               "--trainer.default_root_dir", str(tmp_path),
               "--trainer.callbacks.dirpath", str(out)])  # fmt: skip
    assert rc == 0
    pipe = load_pipeline_folder(str(out))
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.config.in_channels == 3
    assert pipe(["a blue square"], num_inference_steps=2).images.shape == (1, 24, 24, 3)
