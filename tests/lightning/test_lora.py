"""LoRA fine-tunes with ICECallback: only the adapters train, the erasure holds through them without ever
compounding, and the export is merged (erased whatever adapter comes later) or base + adapter, both erased."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from ice_lightning import ICECallback, ICEModule, erase
from ice_lightning.core.export import ADAPTERS_DIR, verify_export, without_adapters

STYLE = {"erase": ["Van Gogh"], "family": "style"}


def _data(side: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    rows = [{"pixel_values": pixels[i % 2], "captions": ["a painting by Van Gogh", "a photo of a dog"][i % 2]}
            for i in range(4)]  # fmt: skip
    return DataLoader(rows, batch_size=2)


def _fit(module, callbacks, epochs: int = 2) -> Trainer:
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, _data())
    return trainer


def _lora_module(kind: str, lr: float, **kw) -> ICEModule:
    torch.manual_seed(0)  # PEFT draws the adapters' initial weights from the global generator
    return ICEModule(f"tiny:{kind}", learning_rate=lr, cfg_dropout=0.0, weight_decay=0.0, lora_rank=4, **kw)


@pytest.mark.parametrize("kind, targets", [("sd", None), ("flux", ["to_q", "to_k", "to_v", "context_embedder"])])
def test_lora_fit_trains_only_adapters_and_reapplication_never_compounds(kind, targets, tmp_path):
    module = _lora_module(kind, 1e-2, lora_target_modules=targets)
    den = module.denoiser
    before = {n: p.detach().clone() for n, p in den.named_parameters()}
    assert {n for n, p in den.named_parameters() if p.requires_grad} == {n for n in before if ".lora_" in n}
    ice = ICECallback(**STYLE, every_n_epochs=1, export=str(tmp_path / "out"))
    _fit(module, [ice], epochs=3)
    moved = {n for n, p in den.named_parameters() if not torch.equal(p, before[n])}
    edited = set(ice.edited_modules())
    component = "unet" if kind == "sd" else "transformer"
    # the adapters trained; the base moved only where the erasure edited it
    assert any(".lora_B." in n for n in moved)
    base_edits = {n.removeprefix(f"{component}.") for n in edited if ".lora_A." not in n}
    assert {n for n in moved if ".lora_" not in n} == {f"{n}.weight" for n in base_edits}
    # the erasure covers the adapters where they read the text states
    assert any(".lora_A." in n for n in edited) and any(n.endswith(".base_layer") for n in edited)
    # five applications (setup, 3 epochs, fit end): the frozen base holds exactly one erasure, not five
    fresh = ICEModule(f"tiny:{kind}").pipeline
    erase(fresh, **STYLE)
    for n in base_edits:
        torch.testing.assert_close(den.get_submodule(n).weight,
                                   getattr(fresh, component).get_submodule(n.removesuffix(".base_layer")).weight,
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
    assert all(verify_export(tmp_path / "out").values())


def test_merged_export_equals_the_fused_adapter_erased_and_the_separate_export_fuses_to_it(tmp_path):
    from diffusers import StableDiffusionPipeline

    # lr 0 and random adapters (B != 0), so the adapter changes the model and training does not move it
    module = _lora_module("sd", 0.0, lora_init=False)
    ice = ICECallback(**STYLE, every_n_epochs=1, export=str(tmp_path / "merged"))
    _fit(module, [ice], epochs=2)
    expected_module = _lora_module("sd", 0.0, lora_init=False)  # the same base and adapters, never erased
    with without_adapters(expected_module.pipeline, "merge"):  # fused: W + B A s, as plain layers
        erase(expected_module.pipeline, **STYLE)
        expected = {n: m.weight.detach().clone() for n, m in expected_module.unet.named_modules()
                    if n.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q"))}  # fmt: skip
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    for n, w in expected.items():
        torch.testing.assert_close(merged.unet.get_submodule(n).weight, w, rtol=1e-5, atol=1e-6)
    assert all(verify_export(tmp_path / "merged").values())

    # base + adapter, both erased: the base alone is the erased base; fused with the adapter, the merged model
    from ice_lightning.core.export import save_erased

    save_erased(module.pipeline, tmp_path / "separate", adapters="separate")
    base = StableDiffusionPipeline.from_pretrained(tmp_path / "separate")
    assert all(verify_export(tmp_path / "separate", pipeline=base).values())
    base.unet.load_lora_adapter(str(tmp_path / "separate" / ADAPTERS_DIR / "unet"), prefix=None,
                                weight_name="pytorch_lora_weights.safetensors")
    base.unet.fuse_lora()
    for n in expected:
        torch.testing.assert_close(base.unet.get_submodule(n).base_layer.weight, merged.unet.get_submodule(n).weight,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_the_layers_gram_sees_an_adapted_layer_as_its_fused_weight():
    """The output metric and hardening read the layers' Gram matrix: an adapted layer ``W + s B A`` counts as that
    one weight (not as ``W`` and ``A`` apart), so erasing the adapted model equals erasing the fused one."""
    from ice_lightning.core.layers import adapted_weight

    module = _lora_module("sd", 0.0, lora_init=False)
    fused = _lora_module("sd", 0.0, lora_init=False)  # the same base and adapters
    robust = {"metric": "output", "harden_rounds": 1, "erase_expansion": 5.0}
    erase(module.pipeline, **STYLE, **robust)
    with without_adapters(fused.pipeline, "merge"):
        erase(fused.pipeline, **STYLE, **robust)
        expected = {n: m.weight.detach().clone() for n, m in fused.unet.named_modules() if n.endswith("attn2.to_k")}
    assert expected
    for n, w in expected.items():
        torch.testing.assert_close(adapted_weight(module.unet.get_submodule(n)).float(), w, rtol=1e-5, atol=1e-6)
