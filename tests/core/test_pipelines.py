"""Erase, check, undo, export and reload on tiny T2I and T2V pipelines of every supported architecture."""

import json
import re

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import changed, snapshot

import ice_lightning
from ice_lightning.core.concepts import FAMILY_TEMPLATES
from ice_lightning.core.editing import tensor_sha256
from ice_lightning.core.export import MANIFEST_NAME, verify_export
from ice_lightning.evaluation.metrics import relative_change

# What ICE_METHOD.md section 4 says each model reads, written independently of the library's rule table:
# spatial cross-attention lives in `attentions.N` (never in `temp_attentions` or `motion_modules`).
_SPATIAL_ATTN2 = re.compile(r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.attn2\.to_[kv]$")
EXPECTED = {
    "sd": ("unet", _SPATIAL_ATTN2),
    "sdxl": ("unet", _SPATIAL_ATTN2),
    "text2video": ("unet", _SPATIAL_ATTN2),
    "animatediff": ("unet", _SPATIAL_ATTN2),
    "sd3": ("transformer", {"context_embedder", "time_text_embed.text_embedder.linear_1"}),
    "flux": ("transformer", {"context_embedder", "time_text_embed.text_embedder.linear_1"}),
    "pixart": ("transformer", {"caption_projection.linear_1"}),
    "cogvideox": ("transformer", {"patch_embed.text_proj"}),
    "wan": ("transformer", {"condition_embedder.text_embedder.linear_1"}),
    "wan22": (("transformer", "transformer_2"), {"condition_embedder.text_embedder.linear_1"}),  # both experts
    "ltx": ("transformer", {"caption_projection.linear_1"}),
}
PIPELINE_CLASS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "text2video": "TextToVideoSDPipeline",
    "animatediff": "AnimateDiffPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "pixart": "PixArtAlphaPipeline",
    "cogvideox": "CogVideoXPipeline",
    "wan": "WanPipeline",
    "wan22": "WanPipeline",
    "ltx": "LTXPipeline",
}


def _expected_layers(pipe, kind):
    comp, rule = EXPECTED[kind]
    if isinstance(comp, tuple):
        return {f"{c}.{n}" for c in comp for n in rule}
    model = getattr(pipe, comp)
    if isinstance(rule, set):
        return {f"{comp}.{n}" for n in rule}
    return {f"{comp}.{n}" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rule.search(n)}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_erase_undo_export_roundtrip(kind, load_pipeline, tmp_path):
    pipe = load_pipeline(kind)
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    expected = _expected_layers(pipe, kind)
    assert expected, "the tiny model must have text-conditioning layers"
    found = ice_lightning.find_text_conditioning(pipe)
    assert {f"{c}.{n}" for c, f in found.items() for n in f.layers} == expected
    if kind in ("text2video", "animatediff"):  # temporal attention also has modules named attn2: not text
        temporal = [
            n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k") and not _SPATIAL_ATTN2.search(n)
        ]
        assert temporal, "the video UNet has temporal attn2 layers, which read frames, not text"
        assert not set(temporal) & set(found["unet"].layers)

    before = snapshot(pipe)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    assert set(result.layers) == expected
    edited = {f"{n}.weight" for n in expected}
    assert changed(before, pipe) == edited  # every target changed; nothing else moved, bit for bit
    assert set(result.operators) == {"text", "pooled"} if kind in ("sd3", "flux") else {"text"}
    assert result.timings["total_s"] > 0

    # the concept's own tokens move far more than the preserve prompts' tokens
    erase_change = relative_change(result, result.spec.erase_prompts())
    preserve_change = relative_change(result, result.spec.preserve_prompts())
    assert erase_change > 2.0 * preserve_change, (erase_change, preserve_change)

    # export and reload through from_pretrained: the edited weights bit for bit, hashes as in the manifest
    out = ice_lightning.save_erased(pipe, tmp_path / "erased")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["edited_tensors"]) == edited
    assert manifest["erased_concepts"] == ["Van Gogh"]
    assert "## Concept erasure (ICE)" in (out / "README.md").read_text()
    reloaded = DiffusionPipeline.from_pretrained(out)
    after = snapshot(pipe)
    for key in edited:
        comp, name = key.split(".", 1)
        w = getattr(reloaded, comp).get_parameter(name)
        assert torch.equal(w, after[key])
        assert tensor_sha256(w) == manifest["edited_tensors"][key]
    assert all(verify_export(out, reloaded).values())

    result.undo()
    assert changed(before, pipe) == set()  # exact original weights
    with pytest.raises(RuntimeError, match="already undone"):
        result.undo()


def test_undo_refuses_after_training_moved_the_weights(load_pipeline):
    pipe = load_pipeline("sd")
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    last = list(result.modules().values())[-1]  # the last layer: the other layers are checked before any revert
    as_edited = last.weight.detach().clone()
    with torch.no_grad():
        last.weight.add_(1e-3)
    edited = snapshot(pipe)
    with pytest.raises(RuntimeError, match=r"changed since they were edited .* so nothing was reverted"):
        result.undo()
    assert changed(edited, pipe) == set()  # all or none: no layer was reverted
    with torch.no_grad():
        last.weight.copy_(as_edited)
        w = last.weight.view(-1)
        w[[0, 1]] = w[[1, 0]].clone()  # a swap keeps sum and norm; the exact hash still sees it
    with pytest.raises(RuntimeError, match="changed since they were edited"):
        result.undo()
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]].clone()
    result.undo()  # exactly as the edit left it again: the undo goes through


def test_two_erasures_undo_in_reverse_order(load_pipeline):
    pipe = load_pipeline("sd")
    before = snapshot(pipe)
    first = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    second = ice_lightning.erase(pipe, erase=["dog"], family="object")
    with pytest.raises(RuntimeError, match="reverse order"):
        first.undo()
    second.undo()
    first.undo()
    assert changed(before, pipe) == set()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_keep_dtype_and_undo_exactly(load_pipeline, dtype):
    pipe = load_pipeline("sd")
    pipe.unet.to(dtype)
    before = snapshot(pipe)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    for module in result.modules().values():
        assert module.weight.dtype == dtype
    assert changed(before, pipe) == {f"{n}.weight" for n in result.layers}
    result.undo()
    assert changed(before, pipe) == set()


def test_methods_share_the_interface(load_pipeline):
    pipe = load_pipeline("sd")
    before = snapshot(pipe)
    for method in ("cure", "uce", "projection"):
        result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", method=method)
        assert result.method == method and result.operators["text"].method == method
        result.undo()
    assert changed(before, pipe) == set()


def test_anchor_and_eot_options(load_pipeline):
    pipe = load_pipeline("sd")
    own = list(FAMILY_TEMPLATES["style"])  # with every family's the operator fills the tiny encoder's 96 dimensions
    plain = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", templates=own)
    rank = plain.operators["text"].rank
    plain.undo()
    with_eot = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", include_eot=True, templates=own)
    assert with_eot.operators["text"].rank > rank  # the end-of-text states add directions
    with_eot.undo()
    anchored = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", anchor="family")
    assert anchored.operators["text"].hparams["anchor"] is True
    assert anchored.to_manifest()["concepts"]["anchor"] == "art"  # the family's guide concept, by name


def test_anchor_context_pairs_each_context_token_with_the_anchor_prompts_same_token(load_pipeline):
    from ice_lightning.core.concepts import ConceptSpec
    from ice_lightning.core.context import context_parts
    from ice_lightning.core.plan import ErasurePlan

    pipe = load_pipeline("sd")
    spec = ConceptSpec(erase=["Van Gogh"], family="style", anchor="family",
                       templates=["a painting by {}", "{} style, a landscape"])  # fmt: skip
    plain = ErasurePlan(pipe, spec).states()["text"].anchor
    plan = ErasurePlan(pipe, spec, hparams={"anchor_context": True})
    src, dst = plan.states()["text"].anchor
    n = plain[0].shape[0]
    assert n == 2 and torch.equal(src[:n], plain[0]) and torch.equal(dst[:n], plain[1])  # the concept's own pairs first
    space = plan.spaces["text"]
    (a1, b1), (a2, b2) = spec.anchor_prompts()
    # "a painting by " before the name, "style, a landscape" after it: the same words in both prompts, token by token
    expected = [space.per_prompt([context_parts(q)[side]])[0] for side, pair in ((0, (a1, b1)), (1, (a2, b2)))
                for q in pair]  # fmt: skip
    assert expected[0].shape[0] == 3 and expected[2].shape[0] >= 3
    assert torch.equal(src[n:], torch.cat([expected[0], expected[2]]))
    assert torch.equal(dst[n:], torch.cat([expected[1], expected[3]]))
    assert not torch.equal(src[n:], dst[n:])  # the name moves its context: that is what the map aims at
    result = ice_lightning.erase(pipe, spec=spec, anchor_context=True)
    assert result.to_manifest()["hparams"]["anchor_context"] is True
    result.undo()
    with pytest.raises(ValueError, match="anchor_context must be True or False, got 'yes'"):
        ice_lightning.erase(pipe, spec=spec, anchor_context="yes")


def test_lora_adapted_layers_are_edited_exactly(load_pipeline):
    from peft import LoraConfig

    pipe = load_pipeline("sd")
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_k", "to_v"], init_lora_weights="gaussian"))
    pipe.unet.eval()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = pipe.unet.get_submodule(name)
    x = torch.randn(5, layer.base_layer.in_features)
    with torch.no_grad():
        before = layer(x)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    assert f"unet.{name}.base_layer" in result.layers and f"unet.{name}.lora_A.default" in result.layers
    D = result.operators["text"].dense().float()
    with torch.no_grad():
        after = layer(x)
    result.undo()
    with torch.no_grad():
        assert torch.equal(layer(x), before)  # exact undo of base layer and adapters
        expected = layer(x - x @ D.T)  # the original adapted layer W + s B A, applied to (I - D) x
    # so the edited adapted layer is (W + s B A)(I - D), with the adapters left unmerged
    assert torch.allclose(after, expected, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_svd_unet_is_called_in_its_own_layout_and_its_temporal_text_layers_are_found():
    from diffusers import UNetSpatioTemporalConditionModel

    from ice_lightning.core.architectures import denoise
    from ice_lightning.core.layers import TextConditioningLayers

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"), cross_attention_dim=12,
        num_attention_heads=(2, 2), addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, num_frames=3,
    ).eval()  # fmt: skip
    x, ehs, t = torch.randn(2, 3, 3, 8, 8), torch.randn(2, 5, 12), torch.tensor([10, 500])  # x: (B, C, F, H, W)
    with torch.no_grad():
        out = denoise(unet, x, t, ehs)
        ref = unet(x.transpose(1, 2), t, ehs, added_time_ids=torch.zeros(2, 3)).sample.transpose(1, 2)
        swapped = denoise(unet, x.flip(2), t, ehs).flip(2)
    assert out.shape == x.shape and torch.equal(out, ref)
    assert not torch.allclose(out, swapped, atol=1e-4)  # it knows the frame order (its temporal position embedding)
    found = TextConditioningLayers.find(unet)  # the check pass runs it through denoise
    assert found.spaces == {"text": 12} and len(found.layers) == 16
    assert sum("temporal_transformer_blocks" in n for n in found.layers) == 8  # they cross-attend to the text too
