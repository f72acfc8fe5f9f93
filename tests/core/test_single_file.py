"""``format="single-file"``: the erased model as one original-layout (LDM/SGM) checkpoint, written whole or patched
into a copy of the user's own file, loaded back with diffusers' ``from_single_file`` and verified."""

import hashlib
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

import ice_lightning
from ice_lightning.cli import main as cli
from ice_lightning.core.export import MANIFEST_NAME, ExportVerificationError
from ice_lightning.core.export.single_file import SingleFileError, single_file_state_dict
from ice_lightning.demos.tiny import build_tiny_pipeline

CLASSES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _pipeline(kind: str):
    """Tiny SD, or tiny SDXL whose two text encoders differ in width as SDXL's do (768 and 1280): diffusers tells
    its two encoders apart in a single file by that width."""
    if kind == "sd":
        return build_tiny_pipeline("sd")
    from diffusers import EulerDiscreteScheduler

    from ice_lightning.demos.tiny_parts import TEXT_DIM, tiny_clip, tiny_unet, tiny_vae, word_tokenizer

    tok, width_2 = word_tokenizer(), 48
    unet = tiny_unet(TEXT_DIM + width_2, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + width_2, transformer_layers_per_block=(1, 2),
                     use_linear_projection=True)  # fmt: skip
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_clip(tok, seed=0),
                                     text_encoder_2=tiny_clip(tok, hidden=width_2, projection=True, seed=1),
                                     tokenizer=tok, tokenizer_2=word_tokenizer(), unet=unet,
                                     scheduler=EulerDiscreteScheduler())  # fmt: skip


def _encoders(kind):
    return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ())


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _tamper(out, key):
    """Change one tensor of the checkpoint and re-hash the file in the manifest: only the content checks can see it."""
    tensors = load_file(str(out / "model.safetensors"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(out / "model.safetensors"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"]["model.safetensors"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_whole_single_file_loads_with_from_single_file_equal_to_the_erased_pipeline(kind, tmp_path):
    """Written from a diffusers pipeline: ``from_single_file(path, config=out/config)`` gives its UNet, VAE and text
    encoders bit for bit (float32); ``verify`` passes, and fails on a tampered edited tensor."""
    pipe = _pipeline(kind)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    out = ice_lightning.save_erased(pipe, tmp_path / "x", format="single-file")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["export_format"] == "single-file" and set(manifest["single_file_keys"]) == set(result.layers)
    assert all(k.startswith("model.diffusion_model.") for k in manifest["single_file_keys"].values())
    loaded = CLASSES[kind].from_single_file(str(out / "model.safetensors"), config=str(out / "config"),
                                            local_files_only=True)  # fmt: skip
    for comp in _encoders(kind):
        ours, theirs = getattr(pipe, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert set(ours) == set(theirs), comp
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), comp
    assert all(ice_lightning.verify_export(out).values())
    _tamper(out, next(iter(manifest["single_file_keys"].values())))
    with pytest.raises(ExportVerificationError, match="does not match the manifest"):
        ice_lightning.verify_export(out)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_patched_single_file_differs_from_the_users_file_in_exactly_the_edited_tensors(kind, tmp_path):
    """Loaded from the user's own (half-precision) file: the export is that file with the edited tensors replaced
    (in its dtype), every other tensor's sha256 and the file's metadata unchanged; the user's file is untouched; it
    verifies (at half precision), and fails on a tampered edited tensor."""
    original = _pipeline(kind)
    original.save_pretrained(tmp_path / "base")
    user = tmp_path / "user.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in single_file_state_dict(original).items()}, str(user),
              metadata={"made_by": "the user"})  # fmt: skip
    user_bytes = user.read_bytes()
    pipe = CLASSES[kind].from_single_file(str(user), config=str(tmp_path / "base"), local_files_only=True)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    out = ice_lightning.save_erased(pipe, tmp_path / "x", format="single-file", source_file=user)
    assert user.read_bytes() == user_bytes
    before, after = load_file(str(user)), load_file(str(out / "model.safetensors"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    edited = set(manifest["single_file_keys"].values())
    assert set(after) == set(before) and len(edited) == len(result.layers)
    assert {k for k in before if _sha(before[k]) != _sha(after[k])} == edited
    assert all(after[k].dtype == torch.float16 for k in edited)
    for layer, key in manifest["single_file_keys"].items():
        erased = ice_lightning.core.parts.resolve_layer(pipe, layer).weight.detach()
        assert torch.equal(after[key], erased.half())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"made_by": "the user"}
    assert all(ice_lightning.verify_export(out).values())
    layer, key = next(iter(manifest["single_file_keys"].items()))
    _tamper(out, key)  # the edited tensor itself: its recorded hash no longer matches
    with pytest.raises(ExportVerificationError, match="does not match the manifest"):
        ice_lightning.verify_export(out)


def test_single_file_refusals_leave_nothing_behind(tmp_path):
    """A pipeline without an original layout, a source that is not the pipeline's file, and a source with another
    format are refused by name before anything is written."""
    flux = build_tiny_pipeline("flux")
    ice_lightning.erase(flux, erase=["Van Gogh"], family="style")
    with pytest.raises(SingleFileError, match="FluxPipeline has none this package writes"):
        ice_lightning.save_erased(flux, tmp_path / "flux", format="single-file")
    sd = build_tiny_pipeline("sd")
    ice_lightning.erase(sd, erase=["Van Gogh"], family="style")
    other = tmp_path / "other.safetensors"
    save_file({"first_stage_model.x": torch.zeros(1)}, str(other))
    with pytest.raises(SingleFileError, match="holds no UNet tensors"):
        ice_lightning.save_erased(sd, tmp_path / "sd", format="single-file", source_file=other)
    with pytest.raises(ValueError, match="with format='merged' nothing reads it"):
        ice_lightning.save_erased(sd, tmp_path / "sd", source_file=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_cli_patches_the_single_file_it_loaded(tmp_path, capsys):
    """``ice-lightning erase --pipeline user.safetensors --pipeline-config base --format single-file``: the export
    is the user's file with the edited tensors replaced, and it verifies."""
    original = _pipeline("sd")
    original.save_pretrained(tmp_path / "base")
    user = tmp_path / "user.safetensors"
    save_file({k: v.detach().contiguous() for k, v in single_file_state_dict(original).items()}, str(user))
    code = cli(["erase", "--pipeline", str(user), "--pipeline-config", str(tmp_path / "base"), "--erase", "Van Gogh",
                "--family", "style", "--format", "single-file", "--out", str(tmp_path / "x"), "--quiet"])  # fmt: skip
    assert code == 0 and "saved the erased checkpoint to" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "x" / MANIFEST_NAME).read_text())
    assert manifest["single_file_source"] == "user.safetensors"
    before, after = load_file(str(user)), load_file(str(tmp_path / "x" / "model.safetensors"))
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(manifest["single_file_keys"].values())
    assert all(ice_lightning.verify_export(tmp_path / "x").values())
    with pytest.raises(ValueError, match="pass the diffusers folder with its configs"):
        cli(["erase", "--pipeline", str(user), "--erase", "Van Gogh", "--out", str(tmp_path / "y"), "--quiet"])


def test_sd2_keeps_its_text_encoder_in_openclip_layout_and_round_trips():
    """A 1024-wide text encoder (SD 2.x's OpenCLIP ViT-H) is written in OpenCLIP's layout under
    ``cond_stage_model.model.`` (q, k, v joined), which diffusers' conversion reads back bit for bit."""
    from ice_lightning.demos.tiny_parts import tiny_clip, tiny_unet, word_tokenizer

    pipe = build_tiny_pipeline("sd")
    pipe.text_encoder, pipe.unet = tiny_clip(word_tokenizer(), hidden=1024), tiny_unet(1024)
    sd = single_file_state_dict(pipe)  # checked by diffusers' own conversion before it returns
    text = [k for k in sd if k.startswith("cond_stage_model.")]
    assert text and all(k.startswith("cond_stage_model.model.") for k in text)
    joined = sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert joined.shape == (3 * 1024, 1024)
    q = pipe.text_encoder.state_dict()
    q = next(v for k, v in q.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(joined[:1024], q)


def test_a_patched_single_file_of_a_lora_adapted_pipeline_ships_the_adapters_merged(tmp_path):
    """A pipeline loaded from the user's file with LoRA adapters on its text layers: checked and written under the
    plain layer names the file has (adapters merged into the erased bases), verified."""
    from peft import LoraConfig

    original = _pipeline("sd")
    original.save_pretrained(tmp_path / "base")
    user = tmp_path / "user.safetensors"
    save_file({k: v.detach().contiguous() for k, v in single_file_state_dict(original).items()}, str(user))
    pipe = StableDiffusionPipeline.from_single_file(str(user), config=str(tmp_path / "base"), local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    out = ice_lightning.save_erased(pipe, tmp_path / "x", format="single-file", source_file=user)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["adapters"] == "merge"
    assert not any("lora" in k or "base_layer" in k for k in manifest["single_file_keys"])
    before, after = load_file(str(user)), load_file(str(out / "model.safetensors"))
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(manifest["single_file_keys"].values())
    assert all(ice_lightning.verify_export(out).values())
