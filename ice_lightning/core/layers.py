"""The linear layers of a denoiser that read raw text-encoder states, found by rule and confirmed by a hook.

The rules come from the denoiser's entry in the architecture table (:mod:`ice_lightning.core.architectures`): name
patterns of the layers and the embedding space (``"text"`` or ``"pooled"``) they read.
:meth:`TextConditioningLayers.find` applies them, then runs the architecture's check pass (one small forward pass
with distinctive random text states) and keeps only layers whose input rows are exactly those states
(UNet3D repeats the text per frame; the rows still match). A model where nothing is found is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import cache
from .architectures import Architecture, LayerRule, NoTextConditioningLayerError, architecture_of, lookup_architecture

__all__ = ["TextConditioningLayers", "NoTextConditioningLayerError", "is_lora"]


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
        dims: dict[str, int] | None = None,
    ) -> TextConditioningLayers:
        """Find (and by default verify) the text-conditioning layers of ``model``.

        Args:
            verify: confirm with a forward hook that each layer receives the text states.
            names: explicit qualified module names reading the ``text`` space, or ``{name: space}``, for
                models outside the table (skips the rules; ``verify`` still applies when the class is known).
            rules: override the table's rules for this model.
            dims: ``{space: width}`` of the text states the pipeline feeds; the check pass uses them, so a
                candidate of another width is not confirmed (default: the candidates' own widths).
        """
        kind = type(model).__name__
        arch = lookup_architecture(model)
        if names is not None:
            modules = dict(model.named_modules())
            missing = [n for n in names if n not in modules]
            if missing:
                raise NoTextConditioningLayerError(f"{kind} has no module(s) named {missing}")
            layers = {n: (modules[n], names[n] if isinstance(names, Mapping) else "text") for n in names}
        else:
            if rules is None:
                rules = (arch or architecture_of(model)).rules  # architecture_of raises for a class outside the table
            layers = {}
            for n, m in model.named_modules():
                for r in rules:
                    if r.matches(n) and (isinstance(m, nn.Linear) or is_lora(m)):
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
        if verify and arch is not None:
            found = found._verified(arch, dims or found.spaces)
        return found

    def _verified(self, arch: Architecture, dims: dict[str, int]) -> TextConditioningLayers:
        """The found layers that receive the text states (of widths ``dims``) in the architecture's check pass."""
        fit = {n: (lin, s) for n, (lin, s) in self.layers.items() if lin.in_features == dims.get(s)}
        if not fit:
            widths = sorted({lin.in_features for lin, _ in self.layers.values()})
            raise NoTextConditioningLayerError(
                f"dimension mismatch: the text-conditioning layers of {type(self.model).__name__} read {widths}-d "
                f"states but the text states are {dims}-d; the denoiser and the text encoder do not belong together"
            )
        check_key = _check_key(self.model, arch, fit, dims)
        known = _CHECKED.get(check_key) if check_key else None
        if check_key and known is None:
            known = cache.load_json("layers", check_key)
        if isinstance(known, list) and known and set(known) <= set(fit):  # this architecture was checked before
            _CHECKED[check_key] = known
            return TextConditioningLayers(self.model, {n: fit[n] for n in known})
        p = next(self.model.parameters())
        g = torch.Generator().manual_seed(0)
        length = {"text": arch.text_length_of(self.model), "pooled": 1}
        states = {s: torch.randn(1, length[s], dims[s], generator=g).to(p.device, p.dtype) for s in self.spaces}
        if "pooled" in states:
            states["pooled"] = states["pooled"][:, 0]
        seen: dict[str, list[Tensor]] = {n: [] for n in fit}
        hooks = [lin.register_forward_pre_hook(_recorder(seen[n])) for n, (lin, _) in fit.items()]
        was_training = self.model.training
        self.model.eval()  # dropout (LoRA's included) would hide that a layer reads the states
        try:
            with torch.no_grad():
                arch.check_pass(self.model, states)
        except (NotImplementedError, RuntimeError, TypeError, KeyError) as err:
            raise NoTextConditioningLayerError(
                f"cannot run the check forward pass of {type(self.model).__name__} ({err}); pass verify=False "
                "if you are sure the found layers read the text states"
            ) from err
        finally:
            self.model.train(was_training)
            for h in hooks:
                h.remove()
        ok = {n: v for n, v in fit.items() if seen[n] and all(_reads(x, states[v[1]]) for x in seen[n])}
        if not ok:
            raise NoTextConditioningLayerError(
                f"no text-conditioning layer found in {type(self.model).__name__}: none of the candidate "
                f"layers {list(self.layers)[:4]}... receives the text-encoder states in a forward pass"
            )
        if check_key:
            _CHECKED[check_key] = list(ok)
            cache.save_json("layers", check_key, list(ok))
        return TextConditioningLayers(self.model, ok)


# What the check pass confirmed, per architecture (see _check_key); also kept on disk by ice_lightning.core.cache.
_CHECKED: dict[str, list[str]] = {}


def _check_key(model: nn.Module, arch: Architecture, fit: dict, dims: dict[str, int]) -> str | None:
    """What the check pass's answer depends on: the denoiser's class and config (diffusers models carry one), the
    diffusers version (its forward code), the architecture's rules and the candidate layers with their shapes. ``None``
    for a model without a config (checked every time)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "items"):
        return None
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = None
    cls = type(model)
    shapes = [(n, s, type(lin).__name__, lin.in_features, lin.out_features) for n, (lin, s) in fit.items()]
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # "_use_default_values": set order
    return cache.key("layer-check", 1, f"{cls.__module__}.{cls.__qualname__}", config, version,
                     arch.name, [(r.space, r.pattern, r.exclude) for r in arch.rules], shapes, dims)  # fmt: skip


def is_lora(module: nn.Module) -> bool:
    """A PEFT LoRA wrapper (``base_layer`` + ``lora_A``) around a linear layer."""
    return isinstance(getattr(module, "base_layer", None), nn.Linear) and hasattr(module, "lora_A")


def _expand_lora(name: str, module: nn.Module, space: str) -> dict[str, tuple[nn.Linear, str]]:
    """A plain linear layer maps to itself. A LoRA-wrapped one ``W x + B A x`` maps to its base layer and
    every ``lora_A`` (both read the text states): editing ``W <- W (I - D)`` and ``A <- A (I - D)`` edits
    the adapted layer ``W + B A`` exactly, with the adapters left unmerged."""
    if not is_lora(module):
        return {name: (module, space)}
    out = {f"{name}.base_layer": (module.base_layer, space)}
    for adapter, lin in module.lora_A.items():
        if isinstance(lin, nn.Linear):
            out[f"{name}.lora_A.{adapter}"] = (lin, space)
    return out


def lora_wrappers(models: Iterable[nn.Module]) -> dict[int, nn.Module]:
    """``{id(linear): wrapper}`` for the base layer and every ``lora_A`` of each PEFT LoRA wrapper in ``models``."""
    out = {}
    for model in models:
        for m in model.modules():
            if is_lora(m):
                out[id(m.base_layer)] = m
                out.update({id(lin): m for lin in m.lora_A.values()})
    return out


@torch.no_grad()
def adapted_weight(wrapper: nn.Module) -> Tensor:
    """The weight a PEFT LoRA wrapper applies to its input, ``W + sum_a s_a B_a A_a`` over its active, unmerged
    adapters (float64): the layer as it reads the text states, for the output metric's Gram matrix."""
    W = wrapper.base_layer.weight.detach().to(torch.float64)
    if getattr(wrapper, "merged", False) or getattr(wrapper, "disable_adapters", False):
        return W
    for a in wrapper.active_adapters:
        if a in wrapper.lora_A and isinstance(wrapper.lora_A[a], nn.Linear):
            B, A = wrapper.lora_B[a].weight.detach(), wrapper.lora_A[a].weight.detach()
            W = W + wrapper.scaling[a] * (B.to(torch.float64) @ A.to(torch.float64))
    return W


def _recorder(store: list[Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        if args:
            store.append(args[0])

    return hook
