"""How each denoiser architecture is trained: its latents, its text conditioning and its model call.

The architecture table (:mod:`ice_lightning.core.architectures`) puts these functions into each entry; this
module holds them, with the flow-matching sigma schedule that SD3, Flux, Wan and LTX-Video share. Each
architecture follows a published training script, named in its function's docstring:

======================  ============================================================================
architecture            follows
======================  ============================================================================
UNet2D (SD, SDXL)       diffusers ``train_text_to_image.py`` / ``train_text_to_image_sdxl.py``
SD3                     diffusers ``train_dreambooth_sd3.py`` (flow matching, ``--weighting_scheme``)
Flux                    diffusers ``train_dreambooth_flux.py`` (packed latents, image/text ids, guidance)
PixArt                  PixArt-alpha ``train_scripts/train_pixart_lora_hf.py`` (learned-sigma split)
CogVideoX               diffusers ``examples/cogvideo/train_cogvideox_lora.py`` (v-prediction, rotary)
Wan 2.1 / 2.2           finetrainers ``models/wan`` (flow matching; 2.2's experts by timestep boundary)
LTX-Video               finetrainers ``models/ltx_video`` (flow matching, packed latents, rope scale)
======================  ============================================================================

Layouts: an architecture's ``latents`` returns what its pipeline's denoising loop holds before packing, images
``(B, C, H, W)``; clips ``(B, C, F, H, W)``, except CogVideoX ``(B, F, C, H, W)``. Its ``denoise`` takes and
returns that layout (packing and unpacking inside), with timesteps on the schedulers' ``[0, 1000]`` scale.
Its ``conditioning`` calls the pipeline's own ``encode_prompt`` and returns the keyword arguments of
``denoise``: ``encoder_hidden_states`` and whatever else the architecture's model reads (pooled projections,
attention masks, text ids, rope scale).
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Literal

import torch
from torch import Tensor, nn

from .encoders import call_default

__all__ = [
    "WeightingScheme",
    "encode_prompt",
    "sample_flow_sigmas",
    "flow_loss_weights",
    "shift_sigmas",
    "experts",
    "image_latents",
    "frame_latents",
    "unet_denoise",
    "unet_conditioning",
]

WeightingScheme = Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"]


# -- text conditioning --------------------------------------------------------------------------------
def encode_prompt(pipeline, captions: list[str], device, model: nn.Module | None = None) -> tuple:
    """``pipeline.encode_prompt`` for ``captions`` without classifier-free guidance, one sample per prompt, at
    the sequence length the pipeline's own call uses (CogVideoX: the transformer's ``max_text_seq_length``)."""
    params = inspect.signature(pipeline.encode_prompt).parameters
    length = getattr(getattr(model, "config", None), "max_text_seq_length", None)
    wanted = {
        "prompt": list(captions),
        "prompt_2": None,  # SD3 and Flux: the second (and third) encoders read the same prompt
        "prompt_3": None,
        "device": device,
        "num_images_per_prompt": 1,
        "num_videos_per_prompt": 1,
        "do_classifier_free_guidance": False,
        "clean_caption": False,  # PixArt: its cleaner needs bs4 and ftfy, and the captions are the user's own
        "max_sequence_length": length or call_default(pipeline, "max_sequence_length", None),
    }
    optional = {"prompt_2", "prompt_3"}
    given = {k: v for k, v in wanted.items() if k in params and (v is not None or k in optional)}
    return pipeline.encode_prompt(**given)


# -- latents ---------------------------------------------------------------------------------------
def _sample(dist, generator: torch.Generator | None) -> Tensor:
    return dist.sample(generator) if generator is not None else dist.sample()


def image_latents(vae, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``(B, 3, H, W)`` images through an image VAE: ``(latent - shift_factor) * scaling_factor`` (SD, SDXL,
    SD3, Flux, PixArt)."""
    lat = _sample(vae.encode(pixels.to(vae.dtype)).latent_dist, generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


def frame_latents(vae, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``(B, F, 3, H, W)`` clips through an image VAE frame by frame (UNet3D, AnimateDiff, SVD):
    ``(B, C, F, h, w)``."""
    b = clips.shape[0]
    lat = image_latents(vae, clips.flatten(0, 1), generator)
    return lat.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)


def _video_dist(vae, clips: Tensor, generator):
    """A video VAE's latent sample of ``(B, F, 3, H, W)`` clips (encoded as ``(B, 3, F, H, W)``)."""
    return _sample(vae.encode(clips.permute(0, 2, 1, 3, 4).to(vae.dtype)).latent_dist, generator)


def cogvideox_latents(vae, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """CogVideoX (``train_cogvideox_lora.py``): ``latent * scaling_factor``, laid out ``(B, F, C, h, w)``."""
    return (_video_dist(vae, clips, generator) * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)


def wan_latents(vae, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Wan: ``(latent - latents_mean) / latents_std`` per channel (the inverse of ``WanPipeline``'s decode)."""
    lat = _video_dist(vae, clips, generator)
    mean = torch.tensor(vae.config.latents_mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
    return (lat - mean) / std


def ltx_latents(vae, clips: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """LTX-Video: ``(latent - mean) * scaling_factor / std`` (``LTXPipeline._normalize_latents``)."""
    lat = _video_dist(vae, clips, generator)
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(lat.device, lat.dtype)
    std = vae.latents_std.view(1, -1, 1, 1, 1).to(lat.device, lat.dtype)
    return (lat - mean) * vae.config.scaling_factor / std


# -- flow matching -----------------------------------------------------------------------------------
def sample_flow_sigmas(scheme: WeightingScheme, n: int, generator: torch.Generator | None = None,
                       device=None, logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29) -> Tensor:  # fmt: skip
    """``n`` training noise levels in (0, 1) drawn by ``scheme`` (diffusers'
    ``compute_density_for_timestep_sampling``: logit-normal, "mode" with ``mode_scale``, else uniform)."""
    if generator is not None:
        device = generator.device
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    u = torch.rand(n, generator=generator, device=device)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_loss_weights(scheme: WeightingScheme, sigmas: Tensor) -> Tensor:
    """Per-sample loss weights (diffusers' ``compute_loss_weighting_for_sd3``): ``1/sigma^2`` for
    ``sigma_sqrt``, the cosmap density for ``cosmap``, else ones."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def shift_sigmas(scheduler_config, sigmas: Tensor, tokens: int) -> Tensor:
    """Shift noise levels as the pipeline's flow-matching scheduler does at sampling time, so training sees
    the noise levels inference uses: ``shift * s / (1 + (shift - 1) s)`` (SD3, Wan), or with dynamic shifting
    (Flux, LTX) the exponential shift by ``mu``, which grows with the ``tokens`` of the latent sequence from
    ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``."""
    cfg = scheduler_config
    if cfg.get("use_dynamic_shifting", False):
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        b0, b1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = b0 + (b1 - b0) * (tokens - lo) / (hi - lo)
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / sigmas - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    shift = float(cfg.get("shift", None) or cfg.get("flow_shift", None) or 1.0)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def expert_rows(cond, mask: Tensor, n: int):
    """The rows ``mask`` of every per-sample tensor of a conditioning dict (shared tensors kept): the conditioning
    of the samples one expert of :func:`experts` denoises."""
    if isinstance(cond, dict):
        return {k: v if k == "txt_ids" else expert_rows(v, mask, n) for k, v in cond.items()}
    if isinstance(cond, Tensor) and cond.dim() > 0 and cond.shape[0] == n:
        return cond[mask]
    return cond


def experts(pipeline, denoiser_names: dict[str, nn.Module], timesteps: Tensor) -> list[tuple[nn.Module, Tensor]]:
    """``[(denoiser, mask of the batch it denoises)]``: Wan 2.2's ``transformer`` takes the timesteps at or
    above ``boundary_ratio * num_train_timesteps`` (high noise) and ``transformer_2`` the rest, as
    ``WanPipeline`` does at sampling time; any other pipeline has one denoiser for every timestep."""
    first = next(iter(denoiser_names.values()))
    ratio = getattr(getattr(pipeline, "config", None), "get", lambda *_: None)("boundary_ratio")
    second = denoiser_names.get("transformer_2")
    if ratio is None or second is None:
        return [(first, torch.ones_like(timesteps, dtype=torch.bool))]
    boundary = ratio * pipeline.scheduler.config.num_train_timesteps
    high = timesteps >= boundary
    return [(first, high), (second, ~high)]


# -- model calls --------------------------------------------------------------------------------------
def unet_denoise(unet: nn.Module, sample: Tensor, timestep, encoder_hidden_states: Tensor, **kwargs) -> Tensor:
    """UNet2D and UNet3D (diffusers ``train_text_to_image.py``, ``_sdxl.py``): ``(B, C, H, W)`` images or
    ``(B, C, F, H, W)`` clips as they are; ``kwargs`` (SDXL's ``added_cond_kwargs``) go to the UNet."""
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample


def motion_denoise(unet: nn.Module, sample: Tensor, timestep, encoder_hidden_states: Tensor, **kwargs) -> Tensor:
    """AnimateDiff's ``UNetMotionModel`` takes the text states repeated per frame, as its pipeline does."""
    states = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
    return unet(sample, timestep, encoder_hidden_states=states, **kwargs).sample


def svd_denoise(unet: nn.Module, sample: Tensor, timestep, encoder_hidden_states: Tensor, **kwargs) -> Tensor:
    """SVD's ``UNetSpatioTemporalConditionModel`` takes (B, F, C, H, W) clips and ``added_time_ids`` (fps, motion
    bucket, noise augmentation), which a text-to-video model leaves at zero."""
    cfg = unet.config
    ids = sample.new_zeros(sample.shape[0], cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim)
    out = unet(sample.transpose(1, 2), timestep, encoder_hidden_states, added_time_ids=ids, **kwargs).sample
    return out.transpose(1, 2)


def unet_conditioning(pipeline, captions: list[str], device, model: nn.Module) -> dict:
    """SD 1.x/2.x and the video UNets: the prompt embeddings; SDXL: also the pooled embedding and the
    ``time_ids`` of an uncropped square image at the UNet's sample size (``train_text_to_image_sdxl.py``)."""
    out = encode_prompt(pipeline, captions, device)
    cond = {"encoder_hidden_states": out[0]}
    if getattr(model.config, "addition_embed_type", None) == "text_time":
        size = model.config.sample_size * pipeline.vae_scale_factor
        ids = torch.tensor([[size, size, 0, 0, size, size]], device=out[0].device, dtype=out[0].dtype)
        cond["added_cond_kwargs"] = {"text_embeds": out[2], "time_ids": ids.repeat(len(captions), 1)}
    return cond


def sd3_denoise(model: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                pooled_projections: Tensor, **kw) -> Tensor:  # fmt: skip
    """SD3 (``train_dreambooth_sd3.py``): the latents as they are, timesteps in [0, 1000]."""
    return model(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                 pooled_projections=pooled_projections, **kw).sample  # fmt: skip


def sd3_conditioning(pipeline, captions: list[str], device, model: nn.Module) -> dict[str, Tensor]:
    out = encode_prompt(pipeline, captions, device)  # (embeds, negative, pooled, negative pooled)
    return {"encoder_hidden_states": out[0], "pooled_projections": out[2]}


def pack_flux(latents: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, H/2 * W/2, 4C)``: 2x2 patches as tokens (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_flux`."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def flux_image_ids(h: int, w: int, device, dtype) -> Tensor:
    """(row, column) position of each packed token (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_denoise(model: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                 pooled_projections: Tensor, txt_ids: Tensor | None = None, guidance: float = 3.5,
                 **kw) -> Tensor:  # fmt: skip
    """Flux (``train_dreambooth_flux.py``): latents packed into 2x2 tokens with their image ids, text ids,
    timesteps divided by 1000, and for guidance-distilled models (Flux-dev) the guidance embedding at
    ``guidance`` (the script's ``--guidance_scale``, 3.5). Returns the unpacked prediction."""
    _, _, h, w = sample.shape
    dt = sample.dtype
    if txt_ids is None:
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=dt)
    g = None
    if model.config.guidance_embeds:
        g = torch.full((sample.shape[0],), float(guidance), device=sample.device, dtype=torch.float32)
    out = model(hidden_states=pack_flux(sample), timestep=timestep / 1000, guidance=g,
                pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                txt_ids=txt_ids, img_ids=flux_image_ids(h, w, sample.device, dt), **kw).sample  # fmt: skip
    return unpack_flux(out, h, w)


def flux_conditioning(pipeline, captions: list[str], device, model: nn.Module) -> dict[str, Tensor]:
    embeds, pooled, text_ids = encode_prompt(pipeline, captions, device)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}


def flux_tokens(latents: Tensor) -> int:
    return latents.shape[-2] * latents.shape[-1] // 4


def pixart_denoise(model: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                   encoder_attention_mask: Tensor | None = None, **kw) -> Tensor:  # fmt: skip
    """PixArt (PixArt-alpha ``train_pixart_lora_hf.py``): the resolution/aspect-ratio micro-conditions only for
    the 1024px model (``sample_size == 128``), as ``PixArtAlphaPipeline``; with a learned sigma (twice the
    latent channels out) the first half is the noise prediction, trained alone."""
    extra = {"resolution": None, "aspect_ratio": None}
    if model.config.sample_size == 128:
        b, _, h, w = sample.shape
        res = torch.tensor([[8 * h, 8 * w]], device=sample.device, dtype=sample.dtype).repeat(b, 1)
        extra = {"resolution": res, "aspect_ratio": torch.full((b, 1), h / w, device=sample.device, dtype=sample.dtype)}
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    out = model(sample, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                timestep=timestep, added_cond_kwargs=extra, **kw).sample  # fmt: skip
    if model.config.out_channels // 2 == sample.shape[1]:
        out = out.chunk(2, dim=1)[0]
    return out


def masked_conditioning(pipeline, captions: list[str], device, model: nn.Module) -> dict[str, Tensor]:
    """PixArt and LTX: ``(embeds, mask, negative, negative mask)``."""
    out = encode_prompt(pipeline, captions, device)
    return {"encoder_hidden_states": out[0], "encoder_attention_mask": out[1]}


def text_only_conditioning(pipeline, captions: list[str], device, model: nn.Module) -> dict[str, Tensor]:
    """CogVideoX and Wan: ``(embeds, negative)``."""
    return {"encoder_hidden_states": encode_prompt(pipeline, captions, device, model)[0]}


def cogvideox_rotary(model: nn.Module, frames: int, h: int, w: int, device) -> tuple[Tensor, Tensor] | None:
    """The 3D rotary embeddings of ``CogVideoXPipeline`` for a ``frames x h x w`` latent (``None`` for models
    without them), computed by the pipeline's own method at a VAE scale of 1."""
    if not model.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline

    host = SimpleNamespace(vae_scale_factor_spatial=1, transformer=model)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(host, h, w, frames, device)


def cogvideox_denoise(model: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                      **kw) -> Tensor:  # fmt: skip
    """CogVideoX (``train_cogvideox_lora.py``): ``(B, F, C, h, w)`` latents, integer timesteps, the rotary
    embeddings of the latent's size. The script's loss, ``(1 - alpha_bar)^-1 |x0_hat - x0|^2`` with
    ``x0_hat = get_velocity(output, noisy, t)``, equals the plain v-prediction loss ``|v_hat - v|^2``
    exactly (``x0_hat - x0 = -sqrt(1 - alpha_bar) (v_hat - v)``), which is what ``ICEModule`` computes."""
    _, f, _, h, w = sample.shape
    rotary = cogvideox_rotary(model, f, h, w, sample.device)
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    return model(hidden_states=sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                 image_rotary_emb=rotary, **kw).sample  # fmt: skip


def wan_denoise(model: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, **kw) -> Tensor:
    """Wan 2.x (finetrainers ``models/wan``): ``(B, C, F, h, w)`` latents, timesteps in [0, 1000]."""
    return model(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **kw).sample


def pack_ltx(latents: Tensor, p: int = 1, pt: int = 1) -> Tensor:
    """``(B, C, F, H, W) -> (B, F/pt * H/p * W/p, C pt p p)`` (``LTXPipeline._pack_latents``)."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_ltx(tokens: Tensor, f: int, h: int, w: int, p: int = 1, pt: int = 1) -> Tensor:
    """The inverse of :func:`pack_ltx` (``LTXPipeline._unpack_latents``)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, f // pt, h // p, w // p, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def ltx_denoise(model: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor | None = None,
                rope_interpolation_scale: tuple[float, float, float] | None = None, **kw) -> Tensor:  # fmt: skip
    """LTX-Video (finetrainers ``models/ltx_video``): latents packed into tokens, the latent grid size and the
    rope interpolation scale of ``LTXPipeline`` (VAE compression over the frame rate); returns unpacked."""
    _, _, f, h, w = sample.shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    if timestep.dim() == 0:
        timestep = timestep.expand(sample.shape[0])
    out = model(hidden_states=pack_ltx(sample, p, pt), encoder_hidden_states=encoder_hidden_states,
                timestep=timestep, encoder_attention_mask=encoder_attention_mask, num_frames=f // pt,
                height=h // p, width=w // p, rope_interpolation_scale=rope_interpolation_scale,
                **kw).sample  # fmt: skip
    return unpack_ltx(out, f, h, w, p, pt)


#: ``LTXPipeline.__call__``'s default frame rate, which sets the temporal rope scale.
LTX_FRAME_RATE = 25


def ltx_conditioning(pipeline, captions: list[str], device, model: nn.Module) -> dict:
    cond = masked_conditioning(pipeline, captions, device, model)
    spatial = pipeline.vae_spatial_compression_ratio
    cond["rope_interpolation_scale"] = (pipeline.vae_temporal_compression_ratio / LTX_FRAME_RATE, spatial, spatial)
    return cond


def ltx_tokens(latents: Tensor) -> int:
    return latents.shape[2:].numel()


def timestep_bias_weights(n: int, bias: str = "none", portion: float = 0.25, multiplier: float = 1.0) -> Tensor:
    """Sampling weights of the ``n`` training timesteps under diffusers' ``--timestep_bias_strategy`` (``"later"``
    or ``"earlier"``: the last or first ``portion`` of them weighted by ``multiplier``)."""
    w = torch.ones(n)
    if bias != "none":
        k = max(1, int(n * portion))
        w[slice(n - k, n) if bias == "later" else slice(0, k)] *= multiplier
    return w / w.sum()


def ddpm_training_input(scheduler, objective: str, x0: Tensor, noise: Tensor, timesteps_of, generator=None,
                        noise_offset: float = 0.0, input_perturbation: float = 0.0,
                        snr_gamma: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """``(noisy latents, timesteps, target, per-sample loss weights or None)`` of a DDPM objective (``epsilon``,
    ``v_prediction``, ``sample``), exactly as diffusers' ``train_text_to_image.py`` builds them, in its order of
    random draws: ``noise_offset`` adds ``offset * randn(B, C, 1, 1)`` to the noise (``--noise_offset``);
    ``input_perturbation`` noises the input with ``noise + p * randn_like(noise)`` while the target keeps ``noise``
    (``--input_perturbation``); then ``timesteps_of(batch_size)`` draws the timesteps; ``snr_gamma`` weighs each
    sample by Min-SNR, ``min(SNR, gamma) / SNR`` (epsilon) or ``/ (SNR + 1)`` (v-prediction), with diffusers'
    ``compute_snr`` (``--snr_gamma``)."""
    b = x0.shape[0]
    if noise_offset:
        shape = (b, x0.shape[1], *([1] * (x0.dim() - 2)))
        noise = noise + noise_offset * torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noised = noise
    if input_perturbation:
        noised = noise + input_perturbation * torch.randn(noise.shape, generator=generator, device=noise.device,
                                                          dtype=noise.dtype)  # fmt: skip
    t = timesteps_of(b)
    noisy = scheduler.add_noise(x0, noised, t)
    target = {"epsilon": noise, "sample": x0}.get(objective)
    if target is None:
        target = scheduler.get_velocity(x0, noise, t)
    weights = None
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        if objective == "epsilon":
            weights = weights / snr
        elif objective == "v_prediction":
            weights = weights / (snr + 1)
    return noisy, t, target, weights
