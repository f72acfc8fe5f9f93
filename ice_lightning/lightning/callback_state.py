"""What :class:`~ice_lightning.lightning.callback.ICECallback` carries and is told, as typed objects: its
checkpointed state (:class:`ICEState`), the option groups of its constructor (:class:`ExportOptions`,
:class:`LayerTargets`, :class:`LogOptions`), and the edited weights as the last application left them
(:func:`remember_weights`, :func:`weight_at_last_application`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, get_args

import torch

from ..core.editing import tensor_sha256
from ..core.export import Adapters, ExportFormat
from ..core.sharding import local_shard, reshard
from ..core.solver import DissociationOperator

__all__ = ["ICEState", "ExportOptions", "LayerTargets"]


@dataclass
class ICEState:
    """Everything an ``ICECallback`` must carry through a checkpoint.

    Attributes:
        applications: one record per application (reason, epoch, step, weights hash, metrics).
        last_epoch_applied: the last epoch whose scheduled application ran (``-1``: none yet).
        operators: the operator per embedding space, computed once (``None`` before the first application).
        layer_spaces: ``{edited layer: embedding space}``.
        probe: the metric references (the model's outputs before the first edit).
        spec_fingerprint: sha256 of the concept spec, method and hyperparameters the operators were made from.
        resumed: set when loaded from a checkpoint that holds an erasure: its weights are already erased, so
            nothing is applied again; cleared once the fit has caught up. Not saved.
    """

    applications: list[dict[str, Any]] = field(default_factory=list)
    last_epoch_applied: int = -1
    operators: dict[str, DissociationOperator] | None = None
    layer_spaces: dict[str, str] = field(default_factory=dict)
    probe: dict | None = None
    spec_fingerprint: str = ""
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        ops = None
        if self.operators is not None:
            ops = {s: {"U": o.U.cpu(), "M": o.M.cpu(), "method": o.method, "hparams": o.hparams,
                       **({} if o.V is None else {"V": o.V.cpu()})} for s, o in self.operators.items()}  # fmt: skip
        return {"applications": self.applications, "last_epoch_applied": self.last_epoch_applied,
                "operators": ops, "layer_spaces": self.layer_spaces, "probe": self.probe,
                "spec_fingerprint": self.spec_fingerprint}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ICEState:
        ops = d["operators"]
        operators = None if ops is None else {s: DissociationOperator(**o) for s, o in ops.items()}
        return cls(list(d["applications"]), d["last_epoch_applied"], operators, dict(d["layer_spaces"]), d["probe"],
                   d.get("spec_fingerprint", ""), resumed=operators is not None)  # fmt: skip


@dataclass(frozen=True)
class ExportOptions:
    """Where and how :class:`ICECallback` ships the erased model (``ICECallback(export="dir")`` is
    ``ExportOptions("dir")``).

    Attributes:
        dir: the folder to save the erased pipeline to (diffusers folder + ``ice_manifest.json``).
        overwrite: let the export replace a non-empty ``dir`` that is not an earlier export (refused before
            training otherwise).
        adapters: for a LoRA fine-tune (``ICEModule(lora_rank=...)``): ``"merge"`` ships one model with the
            adapters merged in, erased whatever adapter a user adds later; ``"separate"`` ships the erased base
            model and the erased adapters beside it (``ice_adapters/<component>/``).
    """

    dir: str
    overwrite: bool = False
    adapters: Adapters = "merge"
    format: ExportFormat = "merged"

    def __post_init__(self) -> None:
        if self.adapters not in ("merge", "separate"):
            raise ValueError(f"export adapters must be 'merge' or 'separate', got {self.adapters!r}")
        if self.format not in get_args(ExportFormat):
            raise ValueError(f"export format must be one of {', '.join(get_args(ExportFormat))}, got {self.format!r}")


@dataclass(frozen=True)
class LogOptions:
    """What :class:`ICECallback` logs at each application (``ICECallback(log=False)`` logs nothing).

    Attributes:
        metrics: the text-space metrics (erasure, leakage, collateral, drift) to every logger.
        preview: sample this many held-out prompts of the erased concepts (and half as many preserved ones) with
            fixed seeds when fitting starts (before the first application) and after each application, and log the
            before/after grid to every logger of the trainer (TensorBoard, W&B, MLflow, CSV, ...) as
            ``ice/preview``; the export ships the last one as ``before_after.png``, shown in its model card. 0 (the
            default): none. Not after a resume (the checkpoint holds no model from before the erasure).
        seed: the seed of the preview's samples.
        steps: the preview's sampling steps.
    """

    metrics: bool = True
    preview: int = 0
    seed: int = 0
    steps: int = 10

    def __post_init__(self) -> None:
        if not (isinstance(self.preview, int) and not isinstance(self.preview, bool) and self.preview >= 0):
            raise ValueError(f"preview must be a whole number of prompts >= 0 (0: none), got {self.preview!r}")


@dataclass(frozen=True)
class LayerTargets:
    """Which layers :class:`ICECallback` edits, as ``erase()``'s ``layers`` and ``verify``.

    Attributes:
        layers: explicit qualified layer names instead of the architecture table.
        verify: confirm the layers with the architecture's check pass (a forward hook).
    """

    layers: list[str] | None = None
    verify: bool = True


# The weight of each edited layer right after the last application of any ICECallback in this process. A
# re-application edits what changed since then, so with several callbacks on shared layers one never re-edits
# another's edit (only training's change), and with no training in between every re-application is a no-op.
# The base weight of a PEFT LoRA layer does not train (the adapter freezes it): instead of a copy, the fingerprint
# of what was written is kept (sha256, and the tensor's in-place version), and a re-application checks it is
# unchanged. Any other weight is copied, frozen or not: a frozen layer may be unfrozen later (Lightning's
# BaseFinetuning, progressive unfreezing), and its change since the last application is then needed.
_AFTER_LAST_APPLICATION: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor | tuple[str, int]] = (
    weakref.WeakKeyDictionary()
)


def remember_weights(denoisers, modules: dict[str, torch.nn.Module], hashes: dict[str, str] | None = None) -> None:
    """Keep each edited weight of ``denoisers`` as written (of a sharded weight, this rank's rows, once resharded):
    a copy, or for a LoRA's frozen base its fingerprint (``hashes``: those the edit computed; else hashed here)."""
    reshard(denoisers)
    for name, m in modules.items():
        w = local_shard(m.weight).detach()
        if m.weight.requires_grad or not name.endswith(".base_layer"):
            _AFTER_LAST_APPLICATION[m] = w.clone()
        else:
            _AFTER_LAST_APPLICATION[m] = ((hashes or {}).get(name) or tensor_sha256(w), w._version)


def weight_at_last_application(name: str, module: torch.nn.Module) -> torch.Tensor:
    """The weight of ``module`` after the last application: its copy, or for a LoRA's frozen base the weight itself
    once it is confirmed unchanged (its change since is then exactly zero)."""
    kept, w = _AFTER_LAST_APPLICATION[module], local_shard(module.weight).detach()
    if isinstance(kept, torch.Tensor):
        return kept
    sha, version = kept
    if w._version != version and tensor_sha256(w) != sha:
        raise RuntimeError(
            f"ICECallback: the frozen weight of layer {name!r} changed since the last application, which keeps no "
            "copy of a LoRA's frozen base (it does not train): train the base as a full fine-tune if it is meant to "
            "change between applications, or erase that model again with a new ICECallback"
        )
    return w
