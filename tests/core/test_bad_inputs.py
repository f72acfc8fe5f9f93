"""Bad input gets a clear error and never a half-edited model."""

import pytest
import torch
from helpers import changed, snapshot

import ice_lightning
from ice_lightning.core.concepts import ConceptSpec
from ice_lightning.core.editing import apply_edits
from ice_lightning.core.layers import NoTextConditioningLayerError
from ice_lightning.core.solver import DissociationOperator


@pytest.fixture
def sd(load_pipeline):
    pipe = load_pipeline("sd")
    return pipe, snapshot(pipe)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"erase": []}, ValueError, "nothing to erase"),
        ({"erase": ["   "]}, ValueError, "empty string"),
        ({"erase": ["\x00\x01"]}, ValueError, "tokenize to nothing"),
        ({"erase": ["Van Gogh"], "preserve": ["Van Gogh"]}, ValueError, "identical to the preserve set"),
        ({"erase": ["Van Gogh", "Monet"], "preserve": ["Monet", "Rembrandt"]}, ValueError, "both erased and preserved"),
        ({"erase": ["Van Gogh"], "family": "sculpture"}, ValueError, "unknown family"),
        ({"erase": ["Van Gogh"], "method": "magic"}, ValueError, "unknown method"),
        ({"erase": ["Van Gogh"], "lam": -2.0}, ValueError, r"lam \(the overlap weight\) must lie in \[0, 1e\+06\]"),
        ({"erase": ["Van Gogh"], "lam": 1e308}, ValueError, r"lam .* must lie in \[0, 1e\+06\], got 1e\+308"),
        ({"erase": ["Van Gogh"], "lam": float("nan")}, ValueError, "lam .* got nan"),
        ({"erase": ["Van Gogh"], "lam": float("inf")}, ValueError, "lam .* got inf"),
        ({"erase": ["Van Gogh"], "mu": 1e308}, ValueError, r"mu \(the ridge weight.* must lie in \(0, 1e\+06\]"),
        ({"erase": ["Van Gogh"], "mu": 0.0}, ValueError, "mu .* must lie in"),
        ({"erase": ["Van Gogh"], "rank_tol": float("nan")}, ValueError, r"rank_tol .* must lie in \(0, 1\)"),
        ({"erase": ["Van Gogh"], "rank_tol": 2.0}, ValueError, r"rank_tol .* must lie in \(0, 1\), got 2.0"),
        ({"erase": ["Van Gogh"], "gamma": 1.0}, ValueError, "unknown ICE hyperparameter.*choose from"),
        ({"erase": ["Van Gogh"], "method": "uce", "preserve_scale": -1e6}, ValueError, "preserve_scale .* must lie"),
        ({"erase": ["Van Gogh"], "method": "uce", "lam": 0.0}, ValueError, r"lam \(UCE's ridge weight\)"),
        ({"erase": ["Van Gogh"], "method": "cure", "mu": 1.0}, ValueError, "unknown cure hyperparameter"),
        ({"erase": ["zzzunknownword"]}, ValueError, "maps to the unknown token '<unk>'.*words the tokenizer knows"),
        ({"erase": ["\U0001f3a8"]}, ValueError, "unknown token"),
        ({"erase": [" ".join(["cat"] * 100)]}, ValueError, "cut off by the maximum length .*77 tokens"),
        ({"erase": ["Van Gogh"], "templates": ["no placeholder"]}, ValueError, "placeholder"),
        ({"erase": ["Van Gogh"], "synonyms": {"Monet": ["Claude"]}}, ValueError, "not erase concepts"),
        ({"erase": ["zebra"], "anchor": "family"}, ValueError, "the 'custom' family has none: name the anchor"),
        ({"spec": ConceptSpec(erase=["Van Gogh"], family="style"), "anchor": "family"}, ValueError,
         r"got a spec and anchor: the spec holds those; set them in it \(dataclasses.replace"),
        ({"spec": ConceptSpec(erase=["Van Gogh"]), "erase": ["Monet"], "family": "style"}, ValueError,
         "got a spec and erase, family"),
        # the defaults' own values count as given: a spec of another family or with EOT is not silently kept
        ({"spec": ConceptSpec(erase=["Van Gogh"], family="style"), "family": "custom"}, ValueError,
         "got a spec and family"),
        ({"spec": ConceptSpec(erase=["Van Gogh"], include_eot=True), "include_eot": False}, ValueError,
         "got a spec and include_eot"),
    ],
)
def test_bad_concept_specs(sd, kwargs, error, message):
    pipe, before = sd
    with pytest.raises(error, match=message):
        ice_lightning.erase(pipe, **kwargs)
    assert changed(before, pipe) == set()


def test_model_without_text_conditioning_layers(load_pipeline):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(NoTextConditioningLayerError, match="no text-conditioning layer found.*UNet2DModel"):
        ice_lightning.erase(pipe, erase=["Van Gogh"])

    # a text-conditioned class whose instance has no cross-attention block at all
    from ice_lightning.demos.tiny_parts import tiny_unet

    sd = load_pipeline("sd")
    sd.unet = tiny_unet(
        96,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
    )
    before = snapshot(sd)
    with pytest.raises(NoTextConditioningLayerError, match="no text-conditioning layer found"):
        ice_lightning.erase(sd, erase=["Van Gogh"])
    assert changed(before, sd) == set()


def test_embedding_width_that_does_not_match_the_layers(load_pipeline):
    from ice_lightning.demos.tiny_parts import tiny_clip

    pipe = load_pipeline("sd")
    pipe.text_encoder = tiny_clip(pipe.tokenizer, hidden=64)  # the UNet reads 96-d states
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="dimension mismatch.*96.*64"):
        ice_lightning.erase(pipe, erase=["Van Gogh"], verify=False)
    assert changed(before, pipe) == set()


def test_nan_embeddings(sd):
    pipe, before = sd
    with torch.no_grad():
        pipe.text_encoder.get_submodule(
            next(n for n, _ in pipe.text_encoder.named_modules() if n.endswith("final_layer_norm"))
        ).weight.fill_(float("nan"))
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="NaN"):
        ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    assert changed(before, pipe) == set()


def test_layer_override_with_unknown_name(sd):
    pipe, before = sd
    with pytest.raises(NoTextConditioningLayerError, match="no module"):
        ice_lightning.erase(pipe, erase=["Van Gogh"], layers=["unet.not.a.layer"])
    with pytest.raises(NoTextConditioningLayerError, match="not torch.nn.Linear"):
        ice_lightning.erase(pipe, erase=["Van Gogh"], layers=["unet.conv_in"])
    assert changed(before, pipe) == set()


def test_explicit_layer_list_edits_only_those(sd):
    pipe, before = sd
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", layers=[name])
    assert result.layers == [name]
    assert changed(before, pipe) == {f"{name}.weight"}


def _layer(dtype, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4).to(dtype)


def _operator(scale: float) -> DissociationOperator:
    U = torch.linalg.qr(torch.randn(8, 2, dtype=torch.float64))[0]
    return DissociationOperator(U=U, M=scale * torch.eye(2, dtype=torch.float64))


def test_edit_is_all_or_nothing_when_a_late_layer_overflows_fp16():
    ok, late = _layer(torch.float32, 0), _layer(torch.float16, 1)
    with torch.no_grad():
        late.weight.fill_(60000.0)  # near the float16 maximum: the edit pushes it over
    before = [ok.weight.clone(), late.weight.clone()]
    with pytest.raises(ValueError, match="overflow.*float32 or bfloat16"):
        apply_edits([("ok", ok, _operator(0.5)), ("late", late, _operator(-5.0))])
    assert torch.equal(ok.weight, before[0]) and torch.equal(late.weight, before[1])


def test_edit_refuses_layers_that_already_hold_nan():
    bad = _layer(torch.float32, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="already holds NaN"):
        apply_edits([("bad", bad, _operator(0.5))])


def test_edit_rolls_back_if_a_write_fails(monkeypatch):
    first, second = _layer(torch.float32, 3), _layer(torch.float32, 4)
    before = first.weight.clone()
    calls = {"n": 0}
    original_copy = torch.Tensor.copy_

    def flaky_copy(self, src, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second write fails (say, a device error)
            raise RuntimeError("device lost")
        return original_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(RuntimeError, match="device lost"):
        apply_edits([("first", first, _operator(0.5)), ("second", second, _operator(0.5))])
    monkeypatch.undo()
    assert torch.equal(first.weight, before)
