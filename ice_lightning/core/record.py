"""What one erasure is, as plain data: the record that the export, its manifest, the LoRA and ``verify`` read.

An :class:`ErasureRecord` names the concepts (the spec), the method and its hyperparameters, each edited layer by
its qualified name with the embedding space it reads, and the operator of each space. It holds no module and no
weight: the live part of an erasure (the modules, the edit records that make ``undo()`` exact) stays in
:class:`~ice_lightning.core.result.ErasureResult`, whose :attr:`~ice_lightning.core.result.ErasureResult.record` this
is. So an export of a copy of the pipeline (its adapters merged, its shards gathered) is the same record with its
layer names mapped, :meth:`ErasureRecord.renamed`; nothing is planned again.

Example:
    >>> import torch
    >>> from ice_lightning.core.concepts import ConceptSpec
    >>> from ice_lightning.core.solver import build_operator
    >>> op = build_operator("projection", torch.eye(4)[:2], torch.eye(4)[2:])
    >>> record = ErasureRecord(ConceptSpec(erase=["red"]), "projection", op.hparams,
    ...                        {"unet.up.attn2.to_k.base_layer": "text"}, {"text": op})
    >>> merged = record.renamed({"unet.up.attn2.to_k.base_layer": "unet.up.attn2.to_k"}, "adapters merged")
    >>> merged.layers, merged.to_manifest()["recorded_from"]
    (['unet.up.attn2.to_k'], 'adapters merged')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .concepts import ConceptSpec
from .solver import DissociationOperator

__all__ = ["ErasureRecord"]


@dataclass(frozen=True)
class ErasureRecord:
    """One erasure as data (see the module docstring).

    Attributes:
        spec: the concepts erased and kept.
        method: the method's registry name (``"ice"``, a baseline, or a registered one).
        hparams: the hyperparameters the solver used, defaults filled in.
        layer_spaces: ``{qualified layer name: embedding space}`` of every edited layer.
        operators: ``{embedding space: DissociationOperator}``.
        triggers: ``{space: prompts}`` the trigger search found and erased (empty without one).
        timings: seconds per step of the erasure.
        hashes: ``{layer: sha256}`` of each edited weight as this erasure left it (this rank's shard of a sharded
            one; empty where not known): an export from the record alone checks the layers still hold it.
        source: ``"edit"`` (written in this process), ``"checkpoint"`` (the weights already held it when a run
            resumed), or what made the layers it names (``"adapters merged"``, ``"gathered shards"``).
    """

    spec: ConceptSpec
    method: str
    hparams: dict
    layer_spaces: dict[str, str]
    operators: dict[str, DissociationOperator]
    triggers: dict[str, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    source: str = "edit"

    @property
    def layers(self) -> list[str]:
        """Qualified names of the edited layers."""
        return list(self.layer_spaces)

    @property
    def restored(self) -> bool:
        """Whether the weights this record names held the erasure before this process described it (so the
        weights before the edit are not known here)."""
        return self.source != "edit"

    def renamed(self, names: Mapping[str, str | None], source: str) -> ErasureRecord:
        """The same erasure over the layers of a copy of the pipeline: each layer name mapped through ``names``
        (absent: unchanged; ``None``: the layer is gone, e.g. a ``lora_A`` merged into its base), made by
        ``source``. The hashes describe the layers the erasure wrote, not the copy's: they are left out."""
        spaces = {names.get(n, n): s for n, s in self.layer_spaces.items() if names.get(n, n) is not None}
        return replace(self, layer_spaces=spaces, hashes={}, source=source)

    def weight_before(self, name: str, after: Tensor) -> Tensor:
        """The weight of layer ``name`` before this erasure, from the weight it wrote (``after``), float64:
        ``W (I - D)^-1 = W + (W U) (I - M V^T U)^-1 M V^T`` for ``D = U M V^T`` (Woodbury; ``V = U`` and
        ``V^T U = I`` in the symmetric form). It exists while no direction is erased completely (an
        eigenvalue 1 of ``D``: a hard projector); otherwise a ``ValueError`` says so."""
        op = self.operators[self.layer_spaces[name]]
        U, M = op.U.to(after.device, torch.float64), op.M.to(after.device, torch.float64)
        V = op.right_basis.to(after.device, torch.float64)
        inner = M if op.V is None else M @ (V.T @ U)  # D's action inside span(U)
        eye = torch.eye(inner.shape[0], dtype=M.dtype, device=M.device)
        if inner.numel() and float(torch.linalg.svdvals(eye - inner).min()) < 1e-6:
            raise ValueError(
                f"the erasure of {self.spec.erase} removes some directions of layer {name!r} completely (an "
                "eigenvalue 1 of its operator), so the weights before it cannot be rebuilt from its record alone"
            )
        w = after.to(torch.float64)
        return w + (w @ U) @ torch.linalg.solve(eye - inner, M) @ V.T

    def to_manifest(self) -> dict:
        """JSON-ready record of this erasure (export manifest)."""
        return {
            "concepts": self.spec.to_dict(),
            "method": self.method,
            "hparams": self.hparams,
            "layers": self.layers,
            "layer_spaces": self.layer_spaces,
            "operators": {s: {"dim": op.dim, "rank": op.rank} for s, op in self.operators.items()},
            **({"triggers": self.triggers} if self.triggers else {}),
            "timings": self.timings,
            **({"restored_from_checkpoint": True} if self.source == "checkpoint" else {}),
            **({"recorded_from": self.source} if self.restored and self.source != "checkpoint" else {}),
        }
