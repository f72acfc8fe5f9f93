"""Latents and text conditioning cached on disk per sample (``ICEModule(disk_cache=True)``): a later epoch calls
neither the VAE nor a text encoder, a cached run trains bit for bit as an uncached one, and a changed weight is
never served a stale entry."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ice_lightning import ICEModule
from ice_lightning.core.architectures import architecture_of
from ice_lightning.core.parts import denoisers
from ice_lightning.core.training_cache import CachedVAE, TextConditioningCache, text_cache_key
from ice_lightning.demos.tiny import build_tiny_pipeline
from ice_lightning.lightning.data import CaptionFolderDataModule

DATA = Path(__file__).parents[2] / "examples" / "data"


@pytest.fixture
def disk(tmp_path, monkeypatch):
    monkeypatch.setenv("ICE_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class _Calls(Callback):
    """Forward calls of the VAE's encoder and of the text encoder, per training epoch."""

    def on_fit_start(self, trainer, pl_module):
        self.per_epoch, self.now = [], {"vae": 0, "text": 0}
        pl_module.vae.encoder.register_forward_pre_hook(lambda *_: self._count("vae"))
        pl_module.pipeline.text_encoder.register_forward_pre_hook(lambda *_: self._count("text"))

    def _count(self, what):
        self.now[what] += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(dict(self.now))
        self.now = {"vae": 0, "text": 0}


def _fit(tmp_path, disk_cache, epochs=2):
    calls = _Calls()
    # No caption dropout and no random flip: every caption and every view of epoch 2 was seen in epoch 1 (a dropped
    # caption or a new flip is a new entry, encoded once).
    module = ICEModule("tiny:sd", disk_cache=disk_cache, text_cache_size=0, cfg_dropout=0.0)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=epochs, limit_val_batches=0, callbacks=[calls],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=CaptionFolderDataModule(str(DATA / "tiny_images"), resolution=16, batch_size=2))
    return calls.per_epoch, module.pipeline.unet.state_dict()


def test_a_second_epoch_calls_neither_encoder_and_trains_bit_for_bit_as_without_the_cache(disk, tmp_path):
    initial = {k: v.clone() for k, v in build_tiny_pipeline("sd").unet.state_dict().items()}
    torch.manual_seed(0)
    plain_calls, plain = _fit(tmp_path / "plain", disk_cache=False)
    torch.manual_seed(0)
    cached_calls, cached = _fit(tmp_path / "cached", disk_cache=True)
    assert plain_calls[1]["vae"] > 0 and plain_calls[1]["text"] > 0  # without it, every epoch encodes
    assert cached_calls[0]["vae"] > 0 and cached_calls[0]["text"] > 0
    assert cached_calls[1] == {"vae": 0, "text": 0}
    # The same latents drawn from the same distributions, the same conditioning: equal up to the last bits a
    # batched GEMM may round differently for another batch composition (an uncached run re-encodes in new batches).
    moved = max(float((plain[k] - initial[k]).abs().max()) for k in plain)
    apart = max(float((plain[k] - cached[k]).abs().max()) for k in plain)
    assert moved > 1e-4 and apart <= 1e-3 * moved, (moved, apart)
    assert list((disk / "latents").glob("*.safetensors")) and list((disk / "text").glob("*.safetensors"))


def test_a_changed_vae_weight_is_never_served_a_stale_latent(disk):
    vae = build_tiny_pipeline("sd").vae
    cached = CachedVAE(vae)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    first = cached.encode(x).latent_dist.parameters
    assert cached.encoded == 3 and torch.equal(first, vae.encode(x).latent_dist.parameters)
    again = cached.encode(x[[2, 0]]).latent_dist.parameters  # per sample: any batch of seen samples
    assert cached.encoded == 3 and torch.equal(again, first[[2, 0]])
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    changed = cached.encode(x).latent_dist.parameters
    assert cached.encoded == 6 and not torch.equal(changed, first)
    assert torch.equal(changed, vae.encode(x).latent_dist.parameters)


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_text_conditioning_from_disk_equals_the_encoders_and_shares_what_does_not_grow(kind, disk):
    """SDXL's nested ``added_cond_kwargs`` and Flux's ``txt_ids`` (one for the batch) come back as the pipeline's
    own ``encode_prompt`` gives them, from a fresh cache (a new run) that only probes the batch layout."""
    pipe = build_tiny_pipeline(kind)
    den = next(iter(denoisers(pipe).values()))
    arch = architecture_of(den)

    def encode(captions):
        return arch.conditioning(pipe, captions, torch.device("cpu"), den)

    captions = ["a cat", "a dog", "a cat", ""]
    first = TextConditioningCache(encode, 0, text_cache_key(pipe, arch.name))
    first(captions)
    fresh = TextConditioningCache(encode, 0, text_cache_key(pipe, arch.name))
    got = fresh(captions)
    assert fresh.calls == 2  # the layout probe ("" and "", ""); every caption came from disk

    def flat(d, p=""):
        return {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, f"{p}{k}/") if isinstance(v, dict)
                                                           else {f"{p}{k}": v}).items()}  # fmt: skip

    want = flat(encode(captions))
    assert set(flat(got)) == set(want)
    for k, v in flat(got).items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-5)  # batched GEMMs may round otherwise
