"""``save_erased(format="lora")``: the edit alone, as the diffusers LoRA it exactly is."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

import ice_lightning
from ice_lightning.cli import main as cli
from ice_lightning.core.concepts import FAMILY_TEMPLATES
from ice_lightning.core.export import LORA_NAME, MANIFEST_NAME, ExportVerificationError
from ice_lightning.core.parts import resolve_layer


def _load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_lora_export_loaded_and_fused_equals_the_merged_export(kind, saved_pipeline, tmp_path):
    """Two successive erasures ship as one LoRA; loaded with ``load_lora_weights`` onto the original model and
    fused, it reproduces the merged export's edited weights (max relative difference <= 1e-5, float32)."""
    original = saved_pipeline(kind)
    pipe = _load(original)
    first = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    ice_lightning.erase(pipe, erase=["Monet"], family="style")
    ice_lightning.save_erased(pipe, tmp_path / "merged")
    ice_lightning.save_erased(pipe, tmp_path / "lora", format="lora")

    assert ice_lightning.verify_export(tmp_path / "lora")  # its files against its manifest
    manifest = json.loads((tmp_path / "lora" / MANIFEST_NAME).read_text())
    assert manifest["export_format"] == "lora" and len(manifest["erasures"]) == 2
    assert set(manifest["lora_ranks"]) == set(first.layers)

    fresh, merged = _load(original), _load(tmp_path / "merged")
    fresh.load_lora_weights(tmp_path / "lora")
    fresh.fuse_lora()
    changed = 0
    for name in first.layers:
        got = resolve_layer(fresh, name).weight.detach()
        want = resolve_layer(merged, name).weight.detach()
        assert got.dtype == torch.float32
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5, name
        changed += not torch.equal(want, resolve_layer(_load(original), name).weight.detach())
    assert changed == len(first.layers)  # the comparison is against weights the erasure did change
    lora_bytes = (tmp_path / "lora" / LORA_NAME).stat().st_size
    merged_bytes = sum(p.stat().st_size for p in (tmp_path / "merged").rglob("*.safetensors"))
    assert lora_bytes < merged_bytes


def test_lora_export_is_refused_when_it_cannot_be_exact(saved_pipeline, tmp_path):
    pipe = _load(saved_pipeline("sd"))
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    layer = resolve_layer(pipe, result.layers[0])
    with torch.no_grad():
        layer.weight.add_(1e-3)  # "training" after the erasure: the change is no longer the erasure alone
    with pytest.raises(ValueError, match="changed since it was erased"):
        ice_lightning.save_erased(pipe, tmp_path / "lora", format="lora")
    assert not (tmp_path / "lora").exists()
    pipe = _load(saved_pipeline("sd"))
    ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", keep_undo=False)
    with pytest.raises(ValueError, match="keep_undo=False"):
        ice_lightning.save_erased(pipe, tmp_path / "lora", format="lora")
    with pytest.raises(ValueError, match="format must be 'merged' or 'lora'"):
        ice_lightning.save_erased(pipe, tmp_path / "x", format="peft")


def test_cli_writes_a_lora_export_that_verifies(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "erased-lora"
    rc = cli(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--family", "style",
              "--out", str(out), "--format", "lora", "--quiet"])  # fmt: skip
    assert rc == 0 and (out / LORA_NAME).is_file()
    assert "LoRA" in capsys.readouterr().out
    assert cli(["verify", str(out)]) == 0
    (out / LORA_NAME).write_bytes((out / LORA_NAME).read_bytes()[:-1] + b"\0")
    with pytest.raises(ExportVerificationError, match="do not match the manifest"):
        ice_lightning.verify_export(out)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_lora_has_kohya_keys_loads_fuses_to_the_erased_weights_and_verifies(kind, saved_pipeline, tmp_path):
    """``format="lora-kohya"``: kohya's keys (``lora_unet_..._lora_down/up``, ``alpha`` = rank), converted by
    diffusers; ``load_lora_weights`` + ``fuse_lora`` onto the original model give the erased weights (<= 1e-6);
    ``verify`` checks it and fails on a tampered tensor; a transformer's erasure is refused by name."""
    from safetensors.torch import load_file, save_file

    original = saved_pipeline(kind)
    pipe = _load(original)
    # the style family's own templates: with every family's, the operator's row space fills the tiny encoder's width,
    # and a tampered LoRA can no longer leave it (the check below needs room outside the span)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", templates=list(FAMILY_TEMPLATES["style"]))
    out = ice_lightning.save_erased(pipe, tmp_path / "kohya", format="lora-kohya")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["export_format"] == "lora-kohya" and all(ice_lightning.verify_export(out).values())
    tensors = load_file(str(out / LORA_NAME))
    assert len(tensors) == 3 * len(result.layers) and all(k.startswith("lora_unet_") for k in tensors)
    down = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert all(float(tensors[k.replace(".lora_down.weight", ".alpha")]) == tensors[k].shape[0] for k in down)
    fresh = _load(original)
    fresh.load_lora_weights(out)
    fresh.fuse_lora()
    for name in result.layers:
        got = resolve_layer(fresh, name)
        got = getattr(got, "base_layer", got).weight.detach()
        assert float((got - resolve_layer(pipe, name).weight.detach()).abs().max()) <= 1e-6, name
    key = down[0]
    tensors[key] = tensors[key] + 1e-3  # tamper with the LoRA, and re-hash it so only the content check can see it
    save_file(tensors, str(out / LORA_NAME))
    manifest["files"][LORA_NAME] = __import__("hashlib").sha256((out / LORA_NAME).read_bytes()).hexdigest()
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportVerificationError, match="is not the recorded operators' change"):
        ice_lightning.verify_export(out)
    if kind == "sd":
        flux = _load(saved_pipeline("flux"))
        ice_lightning.erase(flux, erase=["Van Gogh"], family="style")
        with pytest.raises(ValueError, match="lora-kohya' is the kohya/A1111 LoRA of a UNet .* edits its transformer"):
            ice_lightning.save_erased(flux, tmp_path / "flux", format="lora-kohya")
        assert not (tmp_path / "flux").exists()
