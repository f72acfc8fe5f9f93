"""The table of denoiser architectures: everything this package knows about each denoiser class, in one entry.

A :class:`Architecture` says, for one denoiser class:

- ``rules``: which linear layers read the text-encoder states, and from which embedding space
  (``"text"``: per-token states; ``"pooled"``: one vector per prompt);
- ``check_pass``: one small forward pass with given text states, so a forward hook can confirm that each
  found layer really receives them (:mod:`ice_lightning.core.layers`);
- ``embedding_spaces``: how the pipeline's own tokenizers and encoders produce those spaces
  (:mod:`ice_lightning.core.encoders`);
- ``denoise``: the model call used for training and sampling, in the architecture's latent layout
  (``None``: erasable, not trainable by ``ICEModule``);
- ``conditioning``: the keyword arguments of ``denoise`` from the pipeline's own ``encode_prompt``;
- ``latents``: pixels to the architecture's normalised latents (image or video VAE); ``tokens``: the length of
  the latent sequence that a dynamically shifted flow-matching schedule depends on (Flux, LTX);
- ``follows``: the training script the architecture's objective and call follow;
- ``video``: whether it denoises clips.

The functions live in :mod:`ice_lightning.core.denoising`, which documents the layouts.

:func:`architecture_of` finds the entry of a model by its class, or by the nearest base class in the table (a
user's subclass of ``UNet2DConditionModel`` is a UNet2D). Adding an architecture is one
:func:`register_architecture` call; ``docs/architecture.md`` shows one.

Example:
    >>> from ice_lightning.core.architectures import architecture_of, ARCHITECTURES
    >>> sorted(ARCHITECTURES)[:3]
    ['CogVideoXTransformer3DModel', 'FluxTransformer2DModel', 'LTXVideoTransformer3DModel']
    >>> ARCHITECTURES["UNet2DConditionModel"].trainable, ARCHITECTURES["FluxTransformer2DModel"].follows
    (True, 'diffusers train_dreambooth_flux.py')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import denoising as dn
from .denoising import unet_denoise
from .encoders import (
    EmbeddingSpace,
    FeatureConcatSource,
    PooledSource,
    SequenceSource,
    call_default,
    model_max_length,
    require_components,
)

__all__ = [
    "LayerRule",
    "Architecture",
    "ARCHITECTURES",
    "register_architecture",
    "architecture_of",
    "lookup_architecture",
    "denoise",
    "unet_denoise",
    "default_embedding_spaces",
    "NoTextConditioningLayerError",
]


class NoTextConditioningLayerError(ValueError):
    """Raised when a model has no linear layer known to read the text-encoder states (no table entry, no
    matching layer, or none confirmed by the check pass)."""


@dataclass(frozen=True)
class LayerRule:
    """Layers whose qualified name matches ``pattern`` (and not ``exclude``) read space ``space``."""

    space: str
    pattern: str
    exclude: str | None = None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None and not (self.exclude and re.search(self.exclude, name))


SpacesBuilder = Callable[[object, nn.Module], dict[str, EmbeddingSpace]]


@dataclass(frozen=True)
class Architecture:
    """One entry of the architecture table (see the module docstring for each field)."""

    name: str
    rules: tuple[LayerRule, ...]
    check_pass: Callable[[nn.Module, dict[str, Tensor]], object]
    embedding_spaces: SpacesBuilder
    denoise: Callable[..., Tensor] | None = None
    video: bool = False
    text_length: int = 7
    conditioning: Callable[..., dict] | None = None
    latents: Callable[..., Tensor] | None = None
    tokens: Callable[[Tensor], int] | None = None
    follows: str = ""

    @property
    def trainable(self) -> bool:
        """Whether ``ICEModule`` can fine-tune this architecture (it has a training call)."""
        return self.denoise is not None

    def text_length_of(self, model: nn.Module) -> int:
        """Length of the text sequence of the check pass (CogVideoX needs its configured length)."""
        return int(getattr(getattr(model, "config", None), "max_text_seq_length", None) or self.text_length)


#: The table, keyed by denoiser class name. Use :func:`register_architecture` to add to it.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(architecture: Architecture, replace: bool = False) -> Architecture:
    """Add ``architecture`` to the table (``replace=True`` to override an entry of the same class name)."""
    if architecture.name in ARCHITECTURES and not replace:
        raise ValueError(f"a denoiser architecture for {architecture.name!r} is already registered; pass "
                         "replace=True")  # fmt: skip
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def lookup_architecture(model: nn.Module) -> Architecture | None:
    """The table entry of ``model``: its class, else the nearest base class with an entry; ``None`` if none."""
    return next((ARCHITECTURES[c.__name__] for c in type(model).__mro__ if c.__name__ in ARCHITECTURES), None)


def architecture_of(model: nn.Module) -> Architecture:
    """:func:`lookup_architecture`, refusing a class outside the table."""
    architecture = lookup_architecture(model)
    if architecture is not None:
        return architecture
    raise NoTextConditioningLayerError(
        f"no text-conditioning layer found: {type(model).__name__} is not a supported denoiser "
        f"({', '.join(sorted(ARCHITECTURES))}); pass layers=[...] with the names of the linear layers that read "
        "the text-encoder states, or add its architecture with ice_lightning.core.architectures.register_architecture"
    )


def denoise(model: nn.Module, sample: Tensor, timestep: Tensor | int, encoder_hidden_states: Tensor,
            **kwargs) -> Tensor:  # fmt: skip
    """The prediction of a trainable denoiser through its architecture's training call."""
    fam = architecture_of(model)
    if fam.denoise is None:
        raise NotImplementedError(f"{type(model).__name__} has no training call in the architecture table")
    return fam.denoise(model, sample, timestep, encoder_hidden_states, **kwargs)


# -- helpers shared by the entries ----------------------------------------------------------------------
def _rnd(model: nn.Module, *shape: int) -> Tensor:
    p = next(model.parameters())
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(p.device, p.dtype)


def _t(model: nn.Module, value: float = 1, dtype: torch.dtype | None = None) -> Tensor:
    return torch.tensor([value], device=next(model.parameters()).device, dtype=dtype)


def default_embedding_spaces(pipeline, denoiser) -> dict[str, EmbeddingSpace]:
    """One ``text`` space from the pipeline's ``tokenizer`` and ``text_encoder``: SD 1.x/2.x, TextToVideoSD,
    AnimateDiff and any encoder they are built around (BERT, T5...); also the spaces of a denoiser outside the
    table whose layers are named explicitly."""
    tok, enc = require_components(pipeline, "tokenizer", "text_encoder")
    mask = bool(getattr(enc.config, "use_attention_mask", False))
    return {"text": EmbeddingSpace("text", [SequenceSource(tok, enc, model_max_length(tok, enc), pass_mask=mask)])}


def _t5_text(default_length: int, pass_mask: bool, reads_padding: bool) -> SpacesBuilder:
    """PixArt, Wan (the mask goes to T5) and CogVideoX, LTX (T5 without a mask); ``reads_padding``: CogVideoX's
    transformer reads the padding positions, PixArt's and LTX's mask them, Wan's pipeline zeroes them."""

    def build(pipeline, denoiser) -> dict[str, EmbeddingSpace]:
        tok, enc = require_components(pipeline, "tokenizer", "text_encoder")
        length = call_default(pipeline, "max_sequence_length", default_length)
        source = SequenceSource(tok, enc, length, pass_mask=pass_mask, reads_padding=reads_padding)
        return {"text": EmbeddingSpace("text", [source])}

    return build


# -- UNets --------------------------------------------------------------------------------------------
def _unet_check(video: bool) -> Callable[[nn.Module, dict[str, Tensor]], object]:
    def run(model: nn.Module, states: dict[str, Tensor]) -> object:
        cfg = model.config
        s = max(4, 2 ** (len(cfg.block_out_channels) - 1))
        shape = (1, cfg.in_channels, 2, s, s) if video else (1, cfg.in_channels, s, s)
        kw = {}
        if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL
            n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": _rnd(model, 1, n_text), "time_ids": _rnd(model, 1, 6)}
        elif getattr(cfg, "addition_embed_type", None) is not None or getattr(cfg, "class_embed_type", None):
            raise NotImplementedError(f"{type(model).__name__} with addition_embed_type={cfg.addition_embed_type!r}")
        return architecture_of(model).denoise(model, _rnd(model, *shape), _t(model), states["text"], **kw)

    return run


def _unet_spaces(pipeline, denoiser) -> dict[str, EmbeddingSpace]:
    """SD 1.x/2.x; SDXL (a second encoder): both CLIPs' penultimate states, concatenated per token."""
    if getattr(pipeline, "text_encoder_2", None) is None:
        return default_embedding_spaces(pipeline, denoiser)
    tok, enc, tok2, enc2 = require_components(pipeline, "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    parts = [
        SequenceSource(tok, enc, model_max_length(tok, enc), -2),
        SequenceSource(tok2, enc2, model_max_length(tok2, enc2), -2),
    ]
    return {"text": EmbeddingSpace("text", [FeatureConcatSource(parts)])}


_ATTN2_KV = r"(^|\.)attn2\.to_[kv]$"

_UNET = {"conditioning": dn.unet_conditioning, "follows": "diffusers train_text_to_image.py"}
register_architecture(Architecture(
    "UNet2DConditionModel", rules=(LayerRule("text", _ATTN2_KV),), check_pass=_unet_check(False),
    embedding_spaces=_unet_spaces, denoise=unet_denoise, latents=dn.image_latents, **_UNET,
))  # fmt: skip
# Temporal transformers reuse the name attn2 for self-attention over frames: not text.
register_architecture(Architecture(
    "UNet3DConditionModel", rules=(LayerRule("text", _ATTN2_KV, exclude=r"temp_attentions|transformer_in"),),
    check_pass=_unet_check(True), embedding_spaces=default_embedding_spaces, denoise=unet_denoise, video=True,
    latents=dn.frame_latents, **_UNET,
))  # fmt: skip
register_architecture(Architecture(
    "UNetMotionModel", rules=(LayerRule("text", _ATTN2_KV, exclude=r"motion_modules"),),
    check_pass=_unet_check(True), embedding_spaces=default_embedding_spaces, denoise=dn.motion_denoise, video=True,
    latents=dn.frame_latents, **_UNET,
))  # fmt: skip
# SVD's temporal blocks cross-attend to the text too (their attn2 reads the text states).
register_architecture(Architecture(
    "UNetSpatioTemporalConditionModel", rules=(LayerRule("text", _ATTN2_KV),), check_pass=_unet_check(True),
    embedding_spaces=default_embedding_spaces, denoise=dn.svd_denoise, video=True, latents=dn.frame_latents, **_UNET,
))  # fmt: skip


# -- transformers -------------------------------------------------------------------------------------
_POOLED = LayerRule("pooled", r"^time_text_embed\.text_embedder\.linear_1$")


def _sd3_check(model: nn.Module, states: dict[str, Tensor]) -> object:
    s = 2 * model.config.patch_size
    return model(hidden_states=_rnd(model, 1, model.config.in_channels, s, s), encoder_hidden_states=states["text"],
                 pooled_projections=states["pooled"], timestep=_t(model))  # fmt: skip


def _sd3_spaces(pipeline, denoiser) -> dict[str, EmbeddingSpace]:
    """CLIP-L+G penultimate states padded to the T5 width, then the T5 states (one sequence); pooled CLIP-L+G."""
    names = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
    tok, enc, tok2, enc2, tok3, enc3 = require_components(pipeline, *names)
    clip_len = model_max_length(tok, enc)
    clip_parts = [SequenceSource(tok, enc, clip_len, -2), SequenceSource(tok2, enc2, clip_len, -2)]
    clips = FeatureConcatSource(clip_parts, width=int(enc3.config.d_model))
    t5 = SequenceSource(tok3, enc3, call_default(pipeline, "max_sequence_length", 256))
    return {
        "text": EmbeddingSpace("text", [clips, t5]),
        "pooled": EmbeddingSpace("pooled", [PooledSource([(tok, enc, clip_len), (tok2, enc2, clip_len)])]),
    }


def _flux_check(model: nn.Module, states: dict[str, Tensor]) -> object:
    ehs, dev, dt = states["text"], next(model.parameters()).device, next(model.parameters()).dtype
    kw = {"hidden_states": _rnd(model, 1, 4, model.config.in_channels), "encoder_hidden_states": ehs,
          "pooled_projections": states["pooled"], "timestep": _t(model, 0.5, dt),
          "img_ids": torch.zeros(4, 3, device=dev), "txt_ids": torch.zeros(ehs.shape[1], 3, device=dev)}  # fmt: skip
    if model.config.guidance_embeds:
        kw["guidance"] = _t(model, 3.5, dt)
    return model(**kw)


def _flux_spaces(pipeline, denoiser) -> dict[str, EmbeddingSpace]:
    """T5 states; CLIP pooled output."""
    tok, enc, tok2, enc2 = require_components(pipeline, "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    t5 = SequenceSource(tok2, enc2, call_default(pipeline, "max_sequence_length", 512))
    return {
        "text": EmbeddingSpace("text", [t5]),
        "pooled": EmbeddingSpace("pooled", [PooledSource([(tok, enc, model_max_length(tok, enc))])]),
    }


def _pixart_check(model: nn.Module, states: dict[str, Tensor]) -> object:
    s, dt = 2 * model.config.patch_size, next(model.parameters()).dtype
    extra = {"resolution": None, "aspect_ratio": None}
    if getattr(model, "use_additional_conditions", False):
        extra = {"resolution": torch.tensor([[s, s]], device=next(model.parameters()).device, dtype=dt),
                 "aspect_ratio": _rnd(model, 1, 1)}  # fmt: skip
    return model(hidden_states=_rnd(model, 1, model.config.in_channels, s, s), encoder_hidden_states=states["text"],
                 timestep=_t(model), added_cond_kwargs=extra)  # fmt: skip


def _cogvideox_check(model: nn.Module, states: dict[str, Tensor]) -> object:
    cfg = model.config
    s, f = 2 * cfg.patch_size, cfg.patch_size_t or 1
    kw = {"hidden_states": _rnd(model, 1, f, cfg.in_channels, s, s), "encoder_hidden_states": states["text"],
          "timestep": _t(model)}  # fmt: skip
    if getattr(cfg, "ofs_embed_dim", None):
        kw["ofs"] = _t(model, 2.0, next(model.parameters()).dtype)
    return model(**kw)


def _wan_check(model: nn.Module, states: dict[str, Tensor]) -> object:
    pt, ph, pw = model.config.patch_size
    return model(hidden_states=_rnd(model, 1, model.config.in_channels, pt, 2 * ph, 2 * pw), timestep=_t(model),
                 encoder_hidden_states=states["text"])  # fmt: skip


def _ltx_check(model: nn.Module, states: dict[str, Tensor]) -> object:
    ehs = states["text"]
    return model(hidden_states=_rnd(model, 1, 4, model.config.in_channels), encoder_hidden_states=ehs,
                 timestep=_t(model), encoder_attention_mask=torch.ones(1, ehs.shape[1], device=ehs.device),
                 num_frames=1, height=2, width=2)  # fmt: skip


register_architecture(Architecture(
    "SD3Transformer2DModel", rules=(LayerRule("text", r"^context_embedder$"), _POOLED), check_pass=_sd3_check,
    embedding_spaces=_sd3_spaces, denoise=dn.sd3_denoise, conditioning=dn.sd3_conditioning, latents=dn.image_latents,
    follows="diffusers train_dreambooth_sd3.py",
))  # fmt: skip
register_architecture(Architecture(
    "FluxTransformer2DModel", rules=(LayerRule("text", r"^context_embedder$"), _POOLED), check_pass=_flux_check,
    embedding_spaces=_flux_spaces, denoise=dn.flux_denoise, conditioning=dn.flux_conditioning,
    latents=dn.image_latents, tokens=dn.flux_tokens, follows="diffusers train_dreambooth_flux.py",
))  # fmt: skip
# caption_projection's output feeds attn2: edit its first layer only.
register_architecture(Architecture(
    "PixArtTransformer2DModel", rules=(LayerRule("text", r"^caption_projection\.linear_1$"),),
    check_pass=_pixart_check, embedding_spaces=_t5_text(120, pass_mask=True, reads_padding=False),
    denoise=dn.pixart_denoise, conditioning=dn.masked_conditioning, latents=dn.image_latents,
    follows="PixArt-alpha train_scripts/train_pixart_lora_hf.py",
))  # fmt: skip
register_architecture(Architecture(
    "LTXVideoTransformer3DModel", rules=(LayerRule("text", r"^caption_projection\.linear_1$"),),
    check_pass=_ltx_check, embedding_spaces=_t5_text(226, pass_mask=False, reads_padding=False), video=True,
    denoise=dn.ltx_denoise, conditioning=dn.ltx_conditioning, latents=dn.ltx_latents, tokens=dn.ltx_tokens,
    follows="finetrainers models/ltx_video",
))  # fmt: skip
register_architecture(Architecture(
    "WanTransformer3DModel", rules=(LayerRule("text", r"^condition_embedder\.text_embedder\.linear_1$"),),
    check_pass=_wan_check, embedding_spaces=_t5_text(120, pass_mask=True, reads_padding=False), video=True,
    denoise=dn.wan_denoise, conditioning=dn.text_only_conditioning, latents=dn.wan_latents,
    follows="finetrainers models/wan",
))  # fmt: skip
register_architecture(Architecture(
    "CogVideoXTransformer3DModel", rules=(LayerRule("text", r"^patch_embed\.text_proj$"),),
    check_pass=_cogvideox_check, embedding_spaces=_t5_text(226, pass_mask=False, reads_padding=True), video=True,
    denoise=dn.cogvideox_denoise, conditioning=dn.text_only_conditioning, latents=dn.cogvideox_latents,
    follows="diffusers examples/cogvideo/train_cogvideox_lora.py",
))  # fmt: skip
