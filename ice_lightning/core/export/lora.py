"""The erasure alone as the LoRA it exactly is: diffusers/PEFT keys (``format="lora"``), or kohya's
(``format="lora-kohya"``: ``lora_unet_..._lora_down/up`` plus ``alpha``, the LoRA file Automatic1111, Forge, ComfyUI
and InvokeAI load), converted with diffusers' own ``convert_state_dict_to_kohya``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..editing import tensor_sha256
from ..layers import is_lora
from ..parts import denoisers, resolve_layer
from ..record import ErasureRecord
from .manifest import _FORMAT, OPERATORS_NAME, _check_results_belong, _to_export, _versions, record_of

if TYPE_CHECKING:
    from ..result import ErasureResult

__all__ = ["LORA_NAME", "LORA_FORMATS", "erasure_lora", "kohya_lora", "kohya_prefixes"]


#: The LoRA file of both LoRA formats (the name ``pipe.load_lora_weights(folder)`` looks for; kohya's keys are
#: recognised by their names).
LORA_NAME = "pytorch_lora_weights.safetensors"
#: The export formats that ship the erasure alone, as a LoRA.
LORA_FORMATS = ("lora", "lora-kohya")


def kohya_lora(lora: dict[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA of :func:`erasure_lora` with kohya's keys (``lora_unet_<path with _>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha`` = rank, so the scale is 1), by diffusers' ``convert_state_dict_to_kohya``."""
    from diffusers.utils import convert_state_dict_to_kohya

    return {k: v.contiguous() for k, v in convert_state_dict_to_kohya(lora).items()}


def kohya_prefixes(layers) -> dict[str, str]:
    """``{layer name: its kohya key prefix}`` (``unet.down_blocks.0...to_k`` -> ``lora_unet_down_blocks_0..._to_k``),
    by the same conversion as :func:`kohya_lora`."""
    one = torch.zeros(1, 1)
    out = {}
    for n in layers:  # one layer at a time: the name does not depend on the order the converter keeps
        (key,) = (k for k in kohya_lora({f"{n}.lora_A.weight": one}) if k.endswith(".lora_down.weight"))
        out[n] = key.removesuffix(".lora_down.weight")
    return out


def _check_kohya(pipeline, results) -> None:
    """Refuse ``format="lora-kohya"`` for an erasure outside a UNet: kohya's LoRA keys name UNet layers (SD 1.x/2.x,
    SDXL); the transformers' LoRAs ship in diffusers' format."""
    outside = sorted({n.split(".", 1)[0] for r in results for n in r.layers} - {"unet"})
    if outside:
        raise ValueError(
            f"format='lora-kohya' is the kohya/A1111 LoRA of a UNet (SD 1.x/2.x, SDXL); this erasure of "
            f"{type(pipeline).__name__} edits its {', '.join(outside)}: export format='lora' (diffusers, "
            "pipe.load_lora_weights) or the merged model (format='merged')"
        )


def _check_lora_loadable(pipeline, results: Sequence[ErasureResult]) -> None:
    """Refuse ``format="lora"`` where diffusers cannot load the LoRA back exactly, before anything is written."""
    edited = {n.split(".", 1)[0] for r in results for n in r.layers}
    if "transformer_2" in edited:
        raise ValueError(
            f"format='lora' cannot ship this erasure of {type(pipeline).__name__}: it edits both experts "
            "(transformer and transformer_2), and diffusers' load_lora_weights loads one LoRA into transformer only "
            "(with load_into_transformer_2=True, the same weights into both, which are not the same edit). Export "
            "the merged model (format='merged')"
        )
    if not callable(getattr(pipeline, "load_lora_weights", None)):
        raise ValueError(
            f"format='lora': {type(pipeline).__name__} has no load_lora_weights, so no diffusers LoRA loads onto it; "
            "export the merged model (format='merged')"
        )
    for comp in sorted(edited):
        model = getattr(pipeline, comp)
        if not callable(getattr(model, "load_lora_adapter", None)):
            raise ValueError(
                f"format='lora': the {comp} of {type(pipeline).__name__} ({type(model).__name__}) has no "
                "load_lora_adapter, so diffusers cannot load a LoRA into it; export the merged model "
                "(format='merged')"
            )


def erasure_lora(pipeline, results: Sequence[ErasureResult] | None = None) -> dict[str, Tensor]:
    """The erasures ``results`` (default: every live one of ``pipeline``) as one LoRA in diffusers' format,
    ``{"<component>.<layer>.lora_A.weight": U^T, "<component>.<layer>.lora_B.weight": Delta W U}`` (float32).

    Each edit of a layer changes it by ``-(X U) M V^T`` (``V = U`` in the symmetric form): its rows lie in the
    operator's row space (:meth:`~ice_lightning.core.solver.DissociationOperator.row_space`). The
    total change since before the first erasure, ``Delta W`` (rebuilt from the undo records, float64), therefore
    equals ``(Delta W U) U^T`` with ``U`` an orthonormal basis of every erasure's span for that layer, a LoRA of
    that rank with scale 1. Successive erasures (several ``erase()`` calls) give one LoRA."""
    results = _to_export(pipeline, results)
    _check_results_belong(pipeline, results)
    if any(r.restored for r in results):
        raise ValueError(
            "format='lora' needs the weights from before the erasure, which a model restored from a checkpoint (or "
            "a sharded or adapter fine-tune) does not have; export the merged model (format='merged')"
        )
    _check_lora_loadable(pipeline, results)
    if any(is_lora(m) for comp in denoisers(pipeline).values() for m in comp.modules()):
        raise ValueError(
            "format='lora' exports the erasure of plain weights; this pipeline carries LoRA adapters: export the "
            "merged model (format='merged') or the adapters beside it (adapters='separate')"
        )
    if not all(e.undoable for r in results if not isinstance(r, ErasureRecord) for e in r.edits):
        raise ValueError(
            "format='lora' rebuilds each edit from its undo record, and an erasure was applied with keep_undo=False; "
            "erase again with keep_undo=True, or export format='merged'"
        )
    out: dict[str, Tensor] = {}
    layers = list(dict.fromkeys(n for r in results for n in r.layers))
    for name in layers:
        chain = [r for r in results if name in r.layer_spaces]
        weight = resolve_layer(pipeline, name).weight
        if tensor_sha256(weight) != _written(chain[-1], name):
            raise ValueError(
                f"layer {name!r} changed since it was erased (training?): its erasure is no longer the difference "
                "from the original weights; export the merged model (format='merged')"
            )
        now = weight.detach().to(torch.float64)
        w = now
        for r in reversed(chain):  # walk back to the weight before the first erasure
            w = _before(r, name, w)
        spans = [r.operators[r.layer_spaces[name]].row_space().to(torch.float64) for r in chain]
        U = spans[0] if len(spans) == 1 else torch.linalg.svd(torch.cat(spans, 1), full_matrices=False)[0]
        delta = now - w.to(now.device)
        out[f"{name}.lora_A.weight"] = U.T.to(torch.float32).contiguous().cpu()
        out[f"{name}.lora_B.weight"] = (delta @ U.to(now.device)).to(torch.float32).contiguous().cpu()
    return out


def _written(result: ErasureResult | ErasureRecord, name: str) -> str | None:
    """The sha256 of the weight of layer ``name`` as the erasure left it (``None``: not known)."""
    if isinstance(result, ErasureRecord):
        return result.hashes.get(name)
    return next(e for e in result.edits if e.name == name).fingerprint


def _before(result: ErasureResult | ErasureRecord, name: str, after: Tensor) -> Tensor:
    """The weight of layer ``name`` before the erasure, from the weight it wrote (``after``, float64): from the live
    result's undo record, or from a plain record's operator (:meth:`ErasureRecord.weight_before`)."""
    if not isinstance(result, ErasureRecord):
        return next(e for e in result.edits if e.name == name).before(after=after)
    try:
        return result.weight_before(name, after)
    except ValueError as err:
        raise ValueError(f"{err}: pass the live result of erase(), or export the merged model "
                         "(format='merged')") from None  # fmt: skip


def _lora_files(pipeline, results: list[ErasureResult], lora: dict[str, Tensor], folder: Path,
                extra: dict | None, format: str = "lora") -> dict:  # fmt: skip
    """Write the LoRA file of ``format`` (one of :data:`LORA_FORMATS`) into ``folder``; return its manifest (files
    not yet hashed)."""
    from safetensors.torch import save_file

    tensors = kohya_lora(lora) if format == "lora-kohya" else lora
    save_file(tensors, str(folder / LORA_NAME), metadata={"format": "pt", "ice_lightning": _FORMAT})
    return {
        "format": _FORMAT,
        "export_format": format,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline_class": type(pipeline).__name__,
        "erasures": [record_of(r).to_manifest() for r in results],
        "erased_concepts": list(dict.fromkeys(c for r in results for c in r.spec.erase)),
        "versions": _versions(),
        "operators_file": OPERATORS_NAME,
        "lora_file": LORA_NAME,
        "lora_bytes": (folder / LORA_NAME).stat().st_size,
        "lora_ranks": {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in lora.items()
                       if k.endswith(".lora_A.weight")},  # fmt: skip
        **(extra or {}),
    }
