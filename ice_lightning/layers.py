"""The linear layers of a denoiser that read raw text-encoder states, found by class and confirmed by a hook.

``TEXT_CONDITIONING_RULES`` is the table of ``../shared/ICE_METHOD.md`` section 4 as code: for each
denoiser class, name patterns of the layers and the embedding space (``"text"`` or ``"pooled"``) they
read. :meth:`TextConditioningLayers.find` applies the rules, then runs one small forward pass with
distinctive random text states and keeps only layers whose input rows are exactly those states
(UNet3D repeats the text per frame; the rows still match). A model where nothing is found is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LayerRule",
    "TEXT_CONDITIONING_RULES",
    "TextConditioningLayers",
    "NoTextConditioningLayerError",
    "VIDEO_UNETS",
    "denoise",
]

#: UNets that denoise clips. This package lays clips out (batch, channels, frames, height, width) everywhere and
#: calls every UNet through :func:`denoise`, which adapts to each class's own layout and inputs.
VIDEO_UNETS = ("UNet3DConditionModel", "UNetMotionModel", "UNetSpatioTemporalConditionModel")


def denoise(denoiser: nn.Module, sample: Tensor, timestep: Tensor | int, encoder_hidden_states: Tensor,
            **kwargs) -> Tensor:  # fmt: skip
    """The prediction of a text-conditioned UNet for ``sample``, (B, C, H, W) images or (B, C, F, H, W) clips,
    with the text states of the B prompts: ``UNetMotionModel`` (AnimateDiff) takes them repeated per frame, as
    its pipeline does; ``UNetSpatioTemporalConditionModel`` (SVD's UNet) takes (B, F, C, H, W) clips and
    ``added_time_ids`` (fps, motion bucket, noise augmentation), which a text-to-video model leaves at zero.
    ``kwargs`` (SDXL's ``added_cond_kwargs``) go to the UNet as they are."""
    kind = type(denoiser).__name__
    if kind == "UNetMotionModel":
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
    elif kind == "UNetSpatioTemporalConditionModel":
        cfg = denoiser.config
        n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
        ids = sample.new_zeros(sample.shape[0], n_ids)
        out = denoiser(sample.transpose(1, 2), timestep, encoder_hidden_states, added_time_ids=ids, **kwargs).sample
        return out.transpose(1, 2)
    return denoiser(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample


class NoTextConditioningLayerError(ValueError):
    """Raised when a model has no linear layer that reads the text-encoder states."""


@dataclass(frozen=True)
class LayerRule:
    """Layers whose qualified name matches ``pattern`` (and not ``exclude``) read space ``space``."""

    space: str
    pattern: str
    exclude: str | None = None

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None and not (self.exclude and re.search(self.exclude, name))


_ATTN2_KV = r"(^|\.)attn2\.to_[kv]$"
_POOLED = LayerRule("pooled", r"^time_text_embed\.text_embedder\.linear_1$")

TEXT_CONDITIONING_RULES: dict[str, tuple[LayerRule, ...]] = {
    "UNet2DConditionModel": (LayerRule("text", _ATTN2_KV),),
    # Temporal transformers reuse the name attn2 for self-attention over frames: not text.
    "UNet3DConditionModel": (LayerRule("text", _ATTN2_KV, exclude=r"temp_attentions|transformer_in"),),
    "UNetMotionModel": (LayerRule("text", _ATTN2_KV, exclude=r"motion_modules"),),
    # SVD's temporal blocks cross-attend to the text too (their attn2 reads the first frame's text states).
    "UNetSpatioTemporalConditionModel": (LayerRule("text", _ATTN2_KV),),
    "SD3Transformer2DModel": (LayerRule("text", r"^context_embedder$"), _POOLED),
    "FluxTransformer2DModel": (LayerRule("text", r"^context_embedder$"), _POOLED),
    # caption_projection's output feeds attn2: edit its first layer only.
    "PixArtTransformer2DModel": (LayerRule("text", r"^caption_projection\.linear_1$"),),
    "LTXVideoTransformer3DModel": (LayerRule("text", r"^caption_projection\.linear_1$"),),
    "WanTransformer3DModel": (LayerRule("text", r"^condition_embedder\.text_embedder\.linear_1$"),),
    "CogVideoXTransformer3DModel": (LayerRule("text", r"^patch_embed\.text_proj$"),),
}


def _param(model: nn.Module) -> Tensor:
    return next(model.parameters())


def _example_inputs(model: nn.Module, states: dict[str, Tensor]) -> dict:
    """Smallest valid forward kwargs for each supported denoiser, with the given text states."""
    cfg, kind = model.config, type(model).__name__
    p = _param(model)
    dev, dt = p.device, p.dtype

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dev, dt)

    ehs, t = states.get("text"), torch.tensor([1], device=dev)
    if kind in ("UNet2DConditionModel", *VIDEO_UNETS):  # called through denoise, which knows each layout
        s = max(4, 2 ** (len(cfg.block_out_channels) - 1))
        shape = (1, cfg.in_channels, s, s) if kind == "UNet2DConditionModel" else (1, cfg.in_channels, 2, s, s)
        kw = {"sample": rnd(*shape), "timestep": t, "encoder_hidden_states": ehs}
        if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL
            n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": rnd(1, n_text), "time_ids": rnd(1, 6)}
        elif getattr(cfg, "addition_embed_type", None) is not None or getattr(cfg, "class_embed_type", None):
            raise NotImplementedError(f"{kind} with addition_embed_type={cfg.addition_embed_type!r}")
        return kw
    if kind == "SD3Transformer2DModel":
        s = 2 * cfg.patch_size
        return {
            "hidden_states": rnd(1, cfg.in_channels, s, s),
            "encoder_hidden_states": ehs,
            "pooled_projections": states["pooled"],
            "timestep": t,
        }
    if kind == "FluxTransformer2DModel":
        kw = {
            "hidden_states": rnd(1, 4, cfg.in_channels),
            "encoder_hidden_states": ehs,
            "pooled_projections": states["pooled"],
            "timestep": torch.tensor([0.5], device=dev, dtype=dt),
            "img_ids": torch.zeros(4, 3, device=dev),
            "txt_ids": torch.zeros(ehs.shape[1], 3, device=dev),
        }
        if cfg.guidance_embeds:
            kw["guidance"] = torch.tensor([3.5], device=dev, dtype=dt)
        return kw
    if kind == "PixArtTransformer2DModel":
        s = 2 * cfg.patch_size
        extra = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):
            extra = {"resolution": torch.tensor([[s, s]], device=dev, dtype=dt), "aspect_ratio": rnd(1, 1)}
        return {
            "hidden_states": rnd(1, cfg.in_channels, s, s),
            "encoder_hidden_states": ehs,
            "timestep": t,
            "added_cond_kwargs": extra,
        }
    if kind == "CogVideoXTransformer3DModel":
        s, f = 2 * cfg.patch_size, cfg.patch_size_t or 1
        kw = {"hidden_states": rnd(1, f, cfg.in_channels, s, s), "encoder_hidden_states": ehs, "timestep": t}
        if getattr(cfg, "ofs_embed_dim", None):
            kw["ofs"] = torch.tensor([2.0], device=dev, dtype=dt)
        return kw
    if kind == "WanTransformer3DModel":
        pt, ph, pw = cfg.patch_size
        return {
            "hidden_states": rnd(1, cfg.in_channels, pt, 2 * ph, 2 * pw),
            "timestep": t,
            "encoder_hidden_states": ehs,
        }
    if kind == "LTXVideoTransformer3DModel":
        return {
            "hidden_states": rnd(1, 4, cfg.in_channels),
            "encoder_hidden_states": ehs,
            "timestep": t,
            "encoder_attention_mask": torch.ones(1, ehs.shape[1], device=dev),
            "num_frames": 1,
            "height": 2,
            "width": 2,
        }
    raise NotImplementedError(kind)


def _text_length(model: nn.Module) -> int:
    # CogVideoX adds a positional table of exactly max_text_seq_length text tokens.
    return int(getattr(model.config, "max_text_seq_length", None) or 7)


def _reads(inp: Tensor, ref: Tensor) -> bool:
    """True if every row of ``inp`` equals some row of ``ref`` (up to the model dtype's rounding)."""
    x = inp.detach().reshape(-1, inp.shape[-1]).double()
    r = ref.detach().reshape(-1, ref.shape[-1]).double()
    if x.shape[-1] != r.shape[-1] or x.shape[0] == 0:
        return False
    tol = 1e-3 * float(r.norm(dim=1).max())
    dist = torch.cdist(x, r, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not |a|^2+|b|^2-2ab
    return bool((dist.min(dim=1).values <= tol).all())


@dataclass
class TextConditioningLayers:
    """The text-conditioning linear layers of one denoiser: ``{name: (module, space)}``.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4)
        >>> found = TextConditioningLayers.find(unet)
        >>> sorted(found.layers)[0]
        'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'
        >>> len(found.layers), found.spaces
        (8, {'text': 12})
    """

    model: nn.Module
    layers: dict[str, tuple[nn.Linear, str]]

    @property
    def spaces(self) -> dict[str, int]:
        """``{space: in_features}`` of the found layers."""
        return {space: lin.in_features for lin, space in self.layers.values()}

    def names(self, space: str | None = None) -> list[str]:
        return [n for n, (_, s) in self.layers.items() if space is None or s == space]

    @classmethod
    def find(
        cls,
        model: nn.Module,
        verify: bool = True,
        names: Iterable[str] | None = None,
        rules: tuple[LayerRule, ...] | None = None,
    ) -> TextConditioningLayers:
        """Find (and by default verify) the text-conditioning layers of ``model``.

        Args:
            verify: confirm with a forward hook that each layer receives the text states.
            names: explicit ``{qualified module names}`` reading the ``text`` space, for models
                outside the table (skips the rules; ``verify`` still applies when the class is known).
            rules: override the table's rules for this model.
        """
        kind = type(model).__name__
        if names is not None:
            modules = dict(model.named_modules())
            missing = [n for n in names if n not in modules]
            if missing:
                raise NoTextConditioningLayerError(f"{kind} has no module(s) named {missing}")
            layers = {n: (modules[n], "text") for n in names}
        else:
            rules = rules if rules is not None else TEXT_CONDITIONING_RULES.get(kind)
            if rules is None:
                raise NoTextConditioningLayerError(
                    f"no text-conditioning layer found: {kind} is not a supported denoiser "
                    f"({', '.join(sorted(TEXT_CONDITIONING_RULES))}); pass layers=[...] with the names of the "
                    "linear layers that read the text-encoder states"
                )
            layers = {}
            for n, m in model.named_modules():
                for r in rules:
                    if r.matches(n) and (isinstance(m, nn.Linear) or _is_lora(m)):
                        layers.update(_expand_lora(n, m, r.space))
        bad = [n for n, (m, _) in layers.items() if not isinstance(m, nn.Linear)]
        if bad:
            raise NoTextConditioningLayerError(f"modules {bad} are not torch.nn.Linear; ICE edits linear layers")
        if not layers:
            raise NoTextConditioningLayerError(
                f"no text-conditioning layer found in {kind}: no linear layer matches the rules "
                f"{[r.pattern for r in rules or ()]}; is this a text-conditioned model?"
            )
        found = cls(model, layers)
        if verify and kind in TEXT_CONDITIONING_RULES:
            found = found._verified()
        return found

    def _verified(self) -> TextConditioningLayers:
        spaces = self.spaces
        p = _param(self.model)
        g = torch.Generator().manual_seed(0)
        states = {
            s: torch.randn(1, _text_length(self.model) if s == "text" else 1, d, generator=g).to(p.device, p.dtype)
            for s, d in spaces.items()
        }
        if "pooled" in states:
            states["pooled"] = states["pooled"][:, 0]
        seen: dict[str, list[Tensor]] = {n: [] for n in self.layers}
        hooks = [lin.register_forward_pre_hook(_recorder(seen[n])) for n, (lin, _) in self.layers.items()]
        was_training = self.model.training
        self.model.eval()  # dropout (LoRA's included) would hide that a layer reads the states
        try:
            with torch.no_grad():
                kw = _example_inputs(self.model, states)
                if type(self.model).__name__ in ("UNet2DConditionModel", *VIDEO_UNETS):
                    denoise(self.model, **kw)  # it knows each UNet's layout and extra inputs
                else:
                    self.model(**kw)
        except (NotImplementedError, RuntimeError, TypeError) as err:
            raise NoTextConditioningLayerError(
                f"cannot run the check forward pass of {type(self.model).__name__} ({err}); pass verify=False "
                "if you are sure the found layers read the text states"
            ) from err
        finally:
            self.model.train(was_training)
            for h in hooks:
                h.remove()
        ok = {n: v for n, v in self.layers.items() if seen[n] and all(_reads(x, states[v[1]]) for x in seen[n])}
        if not ok:
            raise NoTextConditioningLayerError(
                f"no text-conditioning layer found in {type(self.model).__name__}: none of the candidate "
                f"layers {list(self.layers)[:4]}... receives the text-encoder states in a forward pass"
            )
        return TextConditioningLayers(self.model, ok)


def _is_lora(module: nn.Module) -> bool:
    """A PEFT LoRA wrapper (``base_layer`` + ``lora_A``) around a linear layer."""
    return isinstance(getattr(module, "base_layer", None), nn.Linear) and hasattr(module, "lora_A")


def _expand_lora(name: str, module: nn.Module, space: str) -> dict[str, tuple[nn.Linear, str]]:
    """A plain linear layer maps to itself. A LoRA-wrapped one ``W x + B A x`` maps to its base layer and
    every ``lora_A`` (both read the text states): editing ``W <- W (I - D)`` and ``A <- A (I - D)`` edits
    the adapted layer ``W + B A`` exactly, with the adapters left unmerged."""
    if not _is_lora(module):
        return {name: (module, space)}
    out = {f"{name}.base_layer": (module.base_layer, space)}
    for adapter, lin in module.lora_A.items():
        if isinstance(lin, nn.Linear):
            out[f"{name}.lora_A.{adapter}"] = (lin, space)
    return out


def _recorder(store: list[Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        if args:
            store.append(args[0])

    return hook
