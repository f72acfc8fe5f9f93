"""The denoiser family table: a new family is one entry; lookups follow the class hierarchy; the pipeline
registry resolves names, folders and run-time registrations."""

import types

import pytest
import torch
from torch import nn

import ice_lightning
import ice_lightning.core.pipelines as pipelines
from ice_lightning.core.architectures import (
    ARCHITECTURES,
    Architecture,
    LayerRule,
    architecture_of,
    register_architecture,
)
from ice_lightning.core.encoders import EmbeddingSpace, SequenceSource
from ice_lightning.core.layers import NoTextConditioningLayerError
from ice_lightning.core.parts import edit_history
from ice_lightning.core.pipelines import load_pipeline, register_pipeline, registered_pipelines
from ice_lightning.demos.tiny_parts import TEXT_DIM, tiny_clip, word_tokenizer


class TinyTextDenoiser(nn.Module):
    """A denoiser no library knows: the text is projected by ``text_proj``; ``decoy_proj`` has a name the rule
    also matches but reads the image features, so only the check pass can tell them apart."""

    def __init__(self, text_dim: int = TEXT_DIM, width: int = 16) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_dim, width)
        self.decoy_proj = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.out(self.decoy_proj(x) + self.text_proj(text).mean(1))


def _check_pass(model: TinyTextDenoiser, states: dict) -> torch.Tensor:
    return model(torch.randn(1, model.out.in_features), states["text"])


def _spaces(pipeline, denoiser) -> dict:
    return {"text": EmbeddingSpace("text", [SequenceSource(pipeline.tokenizer, pipeline.text_encoder, 16)])}


@pytest.fixture
def tiny_family():
    family = register_architecture(
        Architecture("TinyTextDenoiser", (LayerRule("text", r"_proj$"),), _check_pass, _spaces)
    )
    yield family
    ARCHITECTURES.pop("TinyTextDenoiser")


def test_a_new_denoiser_family_is_one_table_entry(tiny_family):
    tok = word_tokenizer()
    pipe = types.SimpleNamespace(transformer=TinyTextDenoiser(), tokenizer=tok, text_encoder=tiny_clip(tok))
    w0 = pipe.transformer.text_proj.weight.detach().clone()
    decoy0 = pipe.transformer.decoy_proj.weight.detach().clone()

    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")

    assert result.layers == ["transformer.text_proj"]  # the decoy matched the rule but failed the check pass
    assert result.layer_map["transformer.text_proj"] == (pipe.transformer.text_proj, "text")
    D = result.operators["text"].dense().to(torch.float64)
    expected = w0.double() @ (torch.eye(D.shape[0], dtype=torch.float64) - D)
    torch.testing.assert_close(pipe.transformer.text_proj.weight.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(pipe.transformer.decoy_proj.weight, decoy0)
    assert result.operators["text"].rank > 0 and edit_history(pipe) == [result]
    result.undo()
    assert torch.equal(pipe.transformer.text_proj.weight, w0) and edit_history(pipe) == []


def test_family_lookup_follows_the_class_hierarchy_and_refuses_unknown_classes(tiny_family):
    class MyDenoiser(TinyTextDenoiser):
        pass

    assert architecture_of(MyDenoiser()) is tiny_family
    with pytest.raises(NoTextConditioningLayerError, match="register_architecture"):
        architecture_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(tiny_family)
    assert register_architecture(tiny_family, replace=True) is tiny_family


def test_every_family_entry_is_complete():
    for name, fam in ARCHITECTURES.items():
        assert fam.name == name and fam.rules and callable(fam.check_pass) and callable(fam.embedding_spaces)
    # every built-in family trains: a model call, a text conditioning, latents and the script it follows
    for fam in ARCHITECTURES.values():
        assert fam.trainable and callable(fam.conditioning) and callable(fam.latents) and fam.follows
    assert {n for n, f in ARCHITECTURES.items() if f.video} >= {"WanTransformer3DModel", "UNet3DConditionModel"}


def test_pipeline_registry_names_folders_and_run_time_registrations(tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines, "_REGISTERED", {})  # run-time registrations end with the test
    assert {"shapes-image", "shapes-video", "new", "tiny"} <= set(registered_pipelines())
    pipe = load_pipeline("tiny:sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"

    calls = []
    register_pipeline("mine", lambda arg=None: calls.append(arg) or load_pipeline("tiny:sd"))
    load_pipeline("mine"), load_pipeline("mine:small")
    assert calls == [None, "small"] and "mine" in registered_pipelines()
    with pytest.raises(ValueError, match="without ':'"):
        register_pipeline("a:b", lambda: None)

    # a local folder wins over a registered name spelled the same way
    pipe.save_pretrained(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    assert load_pipeline("mine") is not None and calls == [None, "small"]
