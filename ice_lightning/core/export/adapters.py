"""PEFT LoRA adapters in an export: merged into the plain weights, or shipped beside the erased base model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..layers import is_lora
from ..parts import denoisers

__all__ = ["ADAPTERS_DIR", "Adapters", "without_adapters"]


#: Where ``adapters="separate"`` puts each denoiser's LoRA weights: ``ice_adapters/<component>/``.
ADAPTERS_DIR = "ice_adapters"


Adapters = Literal["merge", "separate"]


def _lora_wrappers(pipeline) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified name, parent, attribute, wrapper)`` of every PEFT LoRA wrapper in the denoisers."""
    out = []
    for comp, model in denoisers(pipeline).items():
        for name, mod in model.named_modules():
            if is_lora(mod):
                parent, _, attr = name.rpartition(".")
                out.append((f"{comp}.{name}", model.get_submodule(parent) if parent else model, attr, mod))
    return out


def _merged_linear(wrapper: nn.Module) -> nn.Linear:
    """A plain linear layer holding ``W + sum of the active adapters' B A s`` (float64 sum, cast once)."""
    base = wrapper.base_layer
    w = base.weight.detach().to(torch.float64)
    for adapter in wrapper.active_adapters:
        if adapter in wrapper.lora_A:
            w = w + wrapper.get_delta_weight(adapter).detach().to(torch.float64)
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device,
                    dtype=base.weight.dtype)  # fmt: skip
    lin.weight = nn.Parameter(w.to(base.weight.dtype), requires_grad=False)
    if base.bias is not None:
        lin.bias = base.bias
    return lin


@contextmanager
def without_adapters(pipeline, adapters: Adapters = "merge") -> Iterator[dict[str, str | None]]:
    """Within the block, every PEFT LoRA wrapper of the denoisers is replaced by a plain linear layer, so that
    ``save_pretrained`` writes a plain model: ``"merge"``, the base weight with the adapters merged in (what
    an erased LoRA fine-tune ships: erased whatever adapter a user adds later); ``"separate"``, the base layer
    alone (the adapters then ship beside it). The wrappers are put back afterwards, untouched.

    Yields ``{name of an edited layer inside a wrapper: the name it has in the plain model, or None}``:
    ``x.base_layer`` becomes ``x``; ``x.lora_A.<adapter>`` is merged into ``x`` (``None``); empty when there
    is no adapter."""
    wrappers = _lora_wrappers(pipeline)
    renamed: dict[str, str | None] = {}
    for name, _, _, wrapper in wrappers:
        renamed[f"{name}.base_layer"] = name
        renamed.update({f"{name}.lora_A.{a}": None for a in wrapper.lora_A})
    swapped = []
    try:
        for _, parent, attr, wrapper in wrappers:
            plain = _merged_linear(wrapper) if adapters == "merge" else wrapper.base_layer
            setattr(parent, attr, plain)
            swapped.append((parent, attr, wrapper))
        yield renamed
    finally:
        for parent, attr, wrapper in swapped:
            setattr(parent, attr, wrapper)


def _adapter_files(pipeline, folder: Path) -> None:
    """Each denoiser's LoRA adapters in diffusers' format, ``ADAPTERS_DIR/<component>/`` (loadable with the
    denoiser's ``load_lora_adapter``); one file per adapter name."""
    wrappers = _lora_wrappers(pipeline)
    for comp, model in denoisers(pipeline).items():
        names = {a for n, _p, _a, w in wrappers if n.startswith(f"{comp}.") for a in w.lora_A}
        for adapter in sorted(names):
            out = folder / ADAPTERS_DIR / comp
            weight_name = "pytorch_lora_weights.safetensors" if adapter == "default" else f"{adapter}.safetensors"
            if hasattr(model, "save_lora_adapter"):
                model.save_lora_adapter(str(out), adapter_name=adapter, weight_name=weight_name)
            else:  # a denoiser class without diffusers' adapter mixin: PEFT's state dict, same file
                from peft.utils import get_peft_model_state_dict
                from safetensors.torch import save_file

                out.mkdir(parents=True, exist_ok=True)
                state = get_peft_model_state_dict(model, adapter_name=adapter)
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / weight_name))
