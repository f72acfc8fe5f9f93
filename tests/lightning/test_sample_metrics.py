"""Image-level validation metrics: CLIP zero-shot presence against transformers' own preprocessing, the module's
validation loop on a tiny pipeline (mechanics), and the shapes detector on the shipped model (meaning)."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

import ice_lightning
from ice_lightning import ICEModule
from ice_lightning.demos.shapes import ShapesConceptPresence
from ice_lightning.demos.shapes.evaluation import concept_spec
from ice_lightning.demos.tiny import build_tiny_pipeline
from ice_lightning.lightning.data import CaptionFolderDataModule
from ice_lightning.lightning.sample_metrics import CLIPConceptPresence, ConceptPresence, NudeNetPresence

DATA = Path(__file__).parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP checkpoint built from a config and saved to a folder, as a user's local checkpoint would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_tiny_pipeline("sd").tokenizer
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(path)  # fmt: skip
    return path


def test_clip_presence_matches_transformers_preprocessing_and_model(tiny_clip):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    g = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (5, 32, 32, 3), generator=g, dtype=torch.uint8)
    metric = CLIPConceptPresence(model=str(tiny_clip), concept="a cat", neutral="a dog", threshold=0.5)
    ours = metric.probability(uint8.permute(0, 3, 1, 2).float() / 255)
    # the reference: transformers' own processor (no resize or crop needed at the model's size) and model
    processor = CLIPImageProcessor.from_pretrained(tiny_clip)
    pixels = processor(images=list(uint8.numpy()), return_tensors="pt", do_resize=False, do_center_crop=False)
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    text = tok(["a picture of a cat", "a picture of a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = CLIPModel.from_pretrained(tiny_clip)(**text, pixel_values=pixels["pixel_values"]).logits_per_image
    ref = logits.softmax(-1)[:, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    metric.update(uint8.permute(0, 3, 1, 2).float() / 255)
    assert float(metric.compute()) == pytest.approx(float((ref >= 0.5).double().mean()))
    clips = (uint8.permute(0, 3, 1, 2).float() / 255)[:4].reshape(2, 2, 3, 32, 32)
    expected = ref[:4].reshape(2, 2).mean(1) >= 0.5  # a clip: its frames' mean probability
    assert metric.detect_samples(clips).tolist() == expected.tolist()


def test_presence_metric_errors_and_nudenet_with_a_given_detector():
    class Never(ConceptPresence):
        def detect(self, images):
            return torch.zeros(len(images), dtype=torch.bool)

    with pytest.raises(ValueError, match="no concept set"):
        Never().update(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) images or \(N, F, 3, H, W\) clips"):
        Never(concept="x").update(torch.zeros(3, 4, 4))

    class Fake:
        def detect(self, image):
            return [{"class": "BUTTOCKS_EXPOSED", "score": float(image[..., 2].mean()) / 255}]  # BGR: red is index 2

    m = NudeNetPresence(detector=Fake(), concept="nudity")
    red, blue = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    red[0], blue[2] = 1.0, 1.0
    m.update(torch.stack([red, blue, red]))
    assert float(m.compute()) == pytest.approx(2 / 3)


class _Half(ConceptPresence):
    """Detects the concept in the first half of the samples it is given (a known answer per update)."""

    name = "half"

    def detect(self, images):
        return torch.arange(len(images)) < len(images) // 2


def test_module_logs_presence_per_concept_at_validation(tmp_path, tiny_clip):
    concepts = {"erase": ["Van Gogh"], "family": "style", "preserve": ["Claude Monet"],
                "eval_templates": ["a painting by {}"]}  # fmt: skip
    with pytest.raises(ValueError, match="sample_metrics needs validation_concepts"):
        ICEModule("tiny:sd", sample_metrics=[_Half()])
    clip = CLIPConceptPresence(model=str(tiny_clip))
    module = ICEModule("tiny:sd", validation_concepts=concepts, sample_metrics=[clip, _Half()], metric_samples=4,
                       sample_steps=2)  # fmt: skip
    assert module.concept_prompts() == {"Van Gogh": ["a painting by Van Gogh"],
                                        "Claude Monet": ["a painting by Claude Monet"]}  # fmt: skip
    data = CaptionFolderDataModule(str(DATA / "tiny_images"), resolution=16, batch_size=2)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=data)
    logged = trainer.logged_metrics
    assert float(logged["val/half/Van Gogh"]) == 0.5 and float(logged["val/half/Claude Monet"]) == 0.5
    for concept in ("Van Gogh", "Claude Monet"):
        assert 0.0 <= float(logged[f"val/clip_presence/{concept}"]) <= 1.0
    assert clip.concept is None and clip.neutral is None  # the metric is left as given
    assert not any("clip" in k for k in module.state_dict())  # metric models stay out of checkpoints


@pytest.mark.slow
def test_shapes_presence_falls_for_the_erased_colour_and_stays_for_the_others():
    """Meaning: on the shipped image model, the module's presence metric sees red before ICE erases it, barely
    after, and green throughout."""
    spec = concept_spec("red")
    module = ICEModule("shapes-image", validation_concepts={"erase": ["red"], "preserve": ["green"],
                       "eval_templates": ["a {} circle", "one {} triangle"]},
                       sample_metrics=[ShapesConceptPresence()], metric_samples=4, sample_steps=20,
                       guidance_scale=1.5)  # fmt: skip
    before = module.score_samples()
    result = ice_lightning.erase(module.pipeline, spec=spec)
    after = module.score_samples()
    result.undo()
    assert before["val/shapes_presence/red"] >= 0.9 and before["val/shapes_presence/green"] >= 0.9
    assert after["val/shapes_presence/red"] <= 0.05
    assert after["val/shapes_presence/green"] >= 0.9


def test_the_export_records_each_metrics_and_filters_settings(tmp_path, tiny_clip):
    """The CLIP checkpoint and threshold, NudeNet's detector and threshold, and each sample filter's settings go into
    the manifest (``evaluation``, ``sample_filtering.filter_settings``): numbers compare across teams."""
    from ice_lightning import ICECallback, SampleFilterCallback
    from ice_lightning.core.export import load_manifest
    from ice_lightning.lightning.filters import NudeNetFilter

    class Fake:
        def detect(self, image):
            return []

    concepts = {"erase": ["Van Gogh"], "family": "style"}
    module = ICEModule("tiny:sd", validation_concepts=concepts, sample_metrics=[
        CLIPConceptPresence(model=str(tiny_clip), threshold=0.7), NudeNetPresence(detector=Fake(), threshold=0.4)])
    ice = ICECallback(**concepts, export=str(tmp_path / "export"), log=False)
    guard = SampleFilterCallback(NudeNetFilter(detector=Fake(), threshold=0.3), drop_concepts=ice.spec)
    data = CaptionFolderDataModule(str(DATA / "tiny_images"), resolution=16, batch_size=2)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", callbacks=[guard, ice])  # fmt: skip
    trainer.fit(module, datamodule=data)
    manifest = load_manifest(tmp_path / "export")
    clip, nudenet = manifest["evaluation"]["clip_presence"], manifest["evaluation"]["nudenet_presence"]
    assert clip["model"] == str(tiny_clip) and clip["threshold"] == 0.7 and clip["template"] == "a picture of {}"
    assert nudenet["threshold"] == 0.4 and nudenet["detector"].endswith("Fake")
    assert "BUTTOCKS_EXPOSED" in nudenet["classes"]
    filters = manifest["sample_filtering"]["filter_settings"]
    assert filters["caption"]["names"] == ["Van Gogh"] and filters["nudenet"]["threshold"] == 0.3
    assert filters["nudenet"]["value_range"] == [-1.0, 1.0] and filters["nudenet"]["nudenet"]  # the version, or absent
