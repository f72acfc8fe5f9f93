"""ICEModule trains every family of the table: its prediction equals the pipeline's own step input, and a
fit of the tiny pipeline (saved and reloaded) with ICECallback every epoch trains, applies and exports."""

from __future__ import annotations

import functools

import pytest
import torch

from ice_lightning import ICEModule
from ice_lightning.core import denoising as dn

# {kind: (pipeline call keywords, clip frames or None for images)}
SIZES = {
    "sd": ({"height": 8, "width": 8}, None),
    "sdxl": ({"height": 8, "width": 8}, None),
    "sd3": ({"height": 8, "width": 8}, None),
    "flux": ({"height": 8, "width": 8}, None),
    "pixart": ({"height": 8, "width": 8, "use_resolution_binning": False}, None),
    "text2video": ({"height": 8, "width": 8, "num_frames": 2}, 2),
    "animatediff": ({"height": 8, "width": 8, "num_frames": 2}, 2),
    "cogvideox": ({"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}, 5),
    "wan": ({"height": 16, "width": 16, "num_frames": 5}, 5),
    "wan22": ({"height": 16, "width": 16, "num_frames": 5}, 5),
    "ltx": ({"height": 32, "width": 32, "num_frames": 5}, 5),
}


def _first_step(pipe, prompt: str, steps: int, **size) -> tuple:
    """(model_output, timestep, sample) of the pipeline's scheduler step ``steps - 1`` (its last)."""
    seen = []
    step = pipe.scheduler.step

    def spy(model_output, timestep, sample, *a, **k):
        seen.append((model_output.detach().clone(), timestep, sample.detach().clone()))
        return step(model_output, timestep, sample, *a, **k)

    pipe.scheduler.step = spy
    try:
        pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", **size)
    finally:
        del pipe.scheduler.step
    return seen[-1]


def _to_module_layout(kind: str, x: torch.Tensor, pipe, size: dict) -> torch.Tensor:
    """The pipeline's latents (packed for Flux and LTX) in the module's layout."""
    if kind == "flux":
        return dn.unpack_flux(x, size["height"] // pipe.vae_scale_factor, size["width"] // pipe.vae_scale_factor)
    if kind == "ltx":
        r, rt = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
        f = (size["num_frames"] - 1) // rt + 1
        return dn.unpack_ltx(x, f, size["height"] // r, size["width"] // r)
    if kind == "text2video":  # TextToVideoSDPipeline steps frame by frame: (B F, C, H, W)
        return x.unflatten(0, (-1, size["num_frames"])).permute(0, 2, 1, 3, 4)
    return x


@pytest.mark.parametrize("kind", list(SIZES))
def test_module_prediction_equals_the_pipeline_step_input(kind):
    module = ICEModule(pipeline=f"tiny:{kind}", cfg_dropout=0.0).eval()
    pipe, (size, _) = module.pipeline, SIZES[kind]
    # Wan 2.2: two steps, so the last one (low noise) goes to transformer_2; every other family: one step.
    out, t, sample = _first_step(pipe, "a painting of a dog", 2 if kind == "wan22" else 1, **size)
    x = _to_module_layout(kind, sample, pipe, size)
    t = torch.as_tensor(t).reshape(1).expand(x.shape[0])
    with torch.no_grad():
        pred = module.predict(x, t, module.encode_text(["a painting of a dog"]))
    expected = _to_module_layout(kind, out, pipe, size)
    assert pred.shape == expected.shape
    torch.testing.assert_close(pred.float(), expected.float(), rtol=1e-4, atol=1e-5)
    if kind == "wan22":  # the step really was the low-noise expert's
        assert float(t[0]) < pipe.config.boundary_ratio * 1000


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux", "pixart", "cogvideox", "wan", "ltx"])
def test_training_target_is_what_the_pipeline_scheduler_inverts(kind):
    """The module's (noisy input, timestep, target) is the scheduler's own convention: the pipeline's scheduler,
    given the target as the model output, recovers the clean latents (epsilon and v through DDIM's
    ``pred_original_sample``; flow matching through an Euler step to sigma 0)."""
    module = ICEModule(pipeline=f"tiny:{kind}", cfg_dropout=0.0)
    pipe = module.pipeline
    g = torch.Generator().manual_seed(3)
    shape = {"cogvideox": (2, 2, 4, 2, 2), "wan": (2, 16, 2, 2, 2), "ltx": (2, 8, 2, 4, 4)}.get(kind, (2, 4, 8, 8))
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    noisy, t, target, _ = module.noisy_input(x0, noise, g)
    if module.objective == "flow_matching":
        sched = type(pipe.scheduler).from_config({**pipe.scheduler.config, "use_dynamic_shifting": False, "shift": 1.0})
        for i in range(2):  # one sample at a time: the scheduler steps one timestep
            sched.set_timesteps(sigmas=[float(t[i]) / 1000], device="cpu")
            out = sched.step(target[i : i + 1], sched.timesteps[0], noisy[i : i + 1]).prev_sample
            torch.testing.assert_close(out, x0[i : i + 1], rtol=1e-4, atol=1e-4)
        assert 0 < float(t.min()) and float(t.max()) < 1000
    else:
        # the pipeline's scheduler class and schedule, without clipping the x0 estimate to [-1, 1]
        config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        sched = type(pipe.scheduler).from_config({**config, "clip_sample": False})
        sched.set_timesteps(10)
        for i in range(2):
            out = sched.step(target[i : i + 1], int(t[i]), noisy[i : i + 1]).pred_original_sample
            torch.testing.assert_close(out, x0[i : i + 1], rtol=1e-3, atol=1e-3)


class _Repeat(torch.utils.data.Dataset):
    """The same two captioned samples ``n`` times (pixels in [-1, 1]; clips ``(F, 3, H, W)``)."""

    def __init__(self, kind: str, n: int = 4) -> None:
        size, frames = SIZES[kind]
        g = torch.Generator().manual_seed(0)
        shape = (3, size["height"], size["width"]) if frames is None else (frames, 3, size["height"], size["width"])
        self.pixels = torch.rand((2, *shape), generator=g) * 2 - 1
        self.captions = ["a painting of a dog", "a photo of a house"]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i % 2], "captions": self.captions[i % 2]}


def _fixed_loss(module: ICEModule, batch: dict) -> float:
    was = module.training
    module.eval()
    with torch.no_grad():
        loss = float(module.diffusion_loss(batch, generator=torch.Generator().manual_seed(7)))
    module.train(was)
    return loss


@pytest.mark.parametrize("kind", ["animatediff", "sd3", "flux", "pixart", "cogvideox", "wan", "wan22", "ltx"])
def test_family_fits_with_the_callback_and_exports(kind, tmp_path):
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from ice_lightning import ICECallback
    from ice_lightning.core.export import verify_export
    from ice_lightning.demos.tiny import build_tiny_pipeline

    build_tiny_pipeline(kind).save_pretrained(tmp_path / "model")  # the real loading path: from_pretrained
    module = ICEModule(pipeline=str(tmp_path / "model"), learning_rate=3e-4, cfg_dropout=0.0, weight_decay=0.0)
    data = _Repeat(kind)
    batch = {"pixel_values": data.pixels, "captions": data.captions}
    losses = []

    class Measure(Callback):  # the fixed-noise loss after the setup erasure and after training
        def on_train_start(self, trainer, pl_module):
            losses.append(_fixed_loss(pl_module, batch))

        def on_train_end(self, trainer, pl_module):
            losses.append(_fixed_loss(pl_module, batch))

    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1, export=str(tmp_path / "out"))
    trainer = Trainer(max_epochs=3, callbacks=[Measure(), ice], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses
    reasons = [a["reason"] for a in ice.applications]
    assert reasons == ["setup", "epoch_end", "epoch_end", "epoch_end", "fit_end"]
    first, last = ice.applications[0]["metrics"]["erasure"], ice.applications[-1]["metrics"]["erasure"]
    assert first > 0.3 and abs(last - first) <= 0.02, (first, last)
    assert all(verify_export(tmp_path / "out").values())
    if kind == "wan22":  # both experts are trained and erased
        names = ice.edited_modules()
        assert any(n.startswith("transformer_2.") for n in names) and any(n.startswith("transformer.") for n in names)


@pytest.mark.parametrize("kind", list(SIZES))
def test_every_family_trains_a_lora_with_the_callback(kind):
    """One LoRA step per family with ICECallback: only adapter weights train, and the erasure reaches every
    adapter that reads the text states (for the transformers, adapt their text projection too)."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from ice_lightning import ICECallback

    extra = {"sd3": ["context_embedder"], "flux": ["context_embedder"], "pixart": ["caption_projection.linear_1"],
             "cogvideox": ["text_proj"], "wan": ["condition_embedder.text_embedder.linear_1"],
             "wan22": ["condition_embedder.text_embedder.linear_1"],
             "ltx": ["caption_projection.linear_1"]}.get(kind, [])  # fmt: skip
    module = ICEModule(pipeline=f"tiny:{kind}", learning_rate=1e-2, cfg_dropout=0.0, lora_rank=2,
                       lora_target_modules=["to_q", "to_k", "to_v", *extra])  # fmt: skip
    before = {f"{c}.{n}": p.detach().clone() for c, m in module.denoisers.items() for n, p in m.named_parameters()}
    ice = ICECallback(erase=["Van Gogh"], family="style", log=False)
    trainer = Trainer(max_steps=1, callbacks=[ice], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, DataLoader(_Repeat(kind, 2), batch_size=2))
    now = {f"{c}.{n}": p for c, m in module.denoisers.items() for n, p in m.named_parameters()}
    moved = {n for n in now if not torch.equal(now[n], before[n])}
    edited = set(ice.edited_modules())
    assert any(".lora_B." in n for n in moved)  # the adapters trained
    # nothing else moved but what the erasure edited (the frozen bases of the text layers)
    assert {n for n in moved if ".lora_" not in n} == {f"{n}.weight" for n in edited if ".lora_A." not in n}
    assert any(".lora_A." in n for n in edited)  # an adapter that reads the text states is erased too


def test_text_conditioning_is_cached_per_caption_set_and_latents_may_be_precomputed():
    module = ICEModule(pipeline="tiny:wan", cfg_dropout=0.0, text_cache_size=2).eval()
    calls = []
    encode = module.pipeline.encode_prompt

    @functools.wraps(encode)  # the same signature: the module passes what encode_prompt accepts
    def counting(*a, **k):
        calls.append(k["prompt"])
        return encode(*a, **k)

    module.pipeline.encode_prompt = counting
    data = _Repeat("wan", 2)
    batch = {"pixel_values": data.pixels, "captions": data.captions}
    first = module.encode_text(data.captions)
    assert module.encode_text(list(data.captions)) is first and len(calls) == 1  # the same set: encoded once
    module.encode_text(["a"]), module.encode_text(["b"])  # two more sets: the oldest is dropped (size 2)
    module.encode_text(data.captions)
    assert len(calls) == 4
    # precomputed latents: the same loss as the pixels through the VAE, with the generator in the same state
    g = torch.Generator().manual_seed(5)
    from_pixels = module.diffusion_loss(batch, generator=g)
    g = torch.Generator().manual_seed(5)
    latents = module.encode_pixels(data.pixels, g)
    assert latents.shape[1] == 16 and latents.dim() == 5  # Wan's 16 latent channels, (B, C, F, h, w)
    assert torch.equal(module.diffusion_loss({"latents": latents, "captions": data.captions}, generator=g), from_pixels)


def test_a_lora_fine_tune_keeps_no_copy_of_the_frozen_bases():
    """Re-applications edit what trained since the last one: the trainable ``lora_A`` is kept as a copy, a LoRA's
    frozen base only as its fingerprint (the SDXL-size LoRA run held 1.7 GB of such copies). The bases stay exactly
    as the first application left them; a base changed behind the callback's back is refused by name, a rewrite
    with the same values (a weight-averaging swap) is not."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from ice_lightning import ICECallback
    from ice_lightning.lightning.callback_state import _AFTER_LAST_APPLICATION

    module = ICEModule(pipeline="tiny:sd", learning_rate=1e-2, cfg_dropout=0.0, lora_rank=2)
    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1, log=False)
    trainer = Trainer(max_epochs=2, callbacks=[ice], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    firsts = {}
    apply = ice.apply

    def recording(trainer, pl_module, reason, epoch=None):
        apply(trainer, pl_module, reason, epoch=epoch)
        if reason == "setup":
            firsts.update({n: m.weight.detach().clone() for n, m in ice.edited_modules().items()})

    ice.apply = recording
    trainer.fit(module, DataLoader(_Repeat("sd", 2), batch_size=2))
    assert [a["reason"] for a in ice.state.applications] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    frozen = {n: m for n, m in ice.edited_modules().items() if not m.weight.requires_grad}
    trained = {n: m for n, m in ice.edited_modules().items() if m.weight.requires_grad}
    assert frozen and trained and all(".lora_A." in n for n in trained)
    assert all(n.endswith(".base_layer") for n in frozen)
    assert all(isinstance(_AFTER_LAST_APPLICATION[m], tuple) for m in frozen.values())
    assert all(isinstance(_AFTER_LAST_APPLICATION[m], torch.Tensor) for m in trained.values())
    assert all(torch.equal(m.weight, firsts[n]) for n, m in frozen.items())  # re-applications: exact no-ops there
    assert not all(torch.equal(m.weight, firsts[n]) for n, m in trained.items())  # the adapters trained
    name, base = next(iter(frozen.items()))
    with torch.no_grad():
        base.weight.copy_(base.weight.clone())  # same values, new version: accepted
    ice.apply(trainer, module, "manual")
    with torch.no_grad():
        base.weight[0, 0] += 1.0
    with pytest.raises(RuntimeError, match=f"frozen weight of layer '{name}' changed since the last application"):
        ice.apply(trainer, module, "manual")


def test_a_frozen_layer_unfrozen_later_is_still_re_erased():
    """Outside a LoRA, a frozen text layer is copied like a trainable one: unfrozen later (progressive unfreezing)
    and trained, its change since the last application is edited exactly, ``W_last + (W - W_last)(I - D)``."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from ice_lightning import ICECallback

    module = ICEModule(pipeline="tiny:sd", learning_rate=1e-2, cfg_dropout=0.0)
    ice = ICECallback(erase=["Van Gogh"], family="style", at_fit_end=False, log=False)
    for n, p in module.pipeline.unet.named_parameters():
        if ".attn2.to_k." in n:
            p.requires_grad_(False)
    trainer = Trainer(max_steps=1, callbacks=[ice], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, DataLoader(_Repeat("sd", 2), batch_size=2))
    name, layer = next((n, m) for n, m in ice.edited_modules().items() if n.endswith("attn2.to_k"))
    last = layer.weight.detach().clone().double()
    layer.weight.requires_grad_(True)
    with torch.no_grad():
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))  # what a later, unfrozen epoch trains
    now = layer.weight.detach().clone().double()
    ice.apply(trainer, module, "manual")
    D = ice.state.operators[ice.state.layer_spaces[name]].dense()
    expected = last + (now - last) @ (torch.eye(D.shape[0], dtype=D.dtype) - D)
    torch.testing.assert_close(layer.weight.detach().double(), expected, rtol=0, atol=1e-6)
