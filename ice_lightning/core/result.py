"""The live part of an erasure: what one application wrote (the plan it came from, the operators, each layer's edit
record) and ``undo()``. Its plain part, what an export reads, is :attr:`ErasureResult.record`
(:class:`~ice_lightning.core.record.ErasureRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

from .concepts import ConceptSpec
from .editing import LayerEdit, undo_edits
from .encoders import EmbeddingSpace
from .parts import history_of
from .record import ErasureRecord
from .sharding import like_weight
from .solver import DissociationOperator

__all__ = ["ErasureResult", "TargetLayer"]


class TargetLayer(NamedTuple):
    """A text-conditioning layer to edit and the embedding space it reads."""

    module: nn.Linear
    space: str



@dataclass
class ErasureResult:
    """What one application wrote: the plan, the operators, the edits, timings; ``undo()`` reverts."""

    plan: Any = field(repr=False)  # the ErasurePlan that made it
    operators: dict[str, DissociationOperator]
    edits: list[LayerEdit] = field(repr=False)
    timings: dict[str, float]
    undone: bool = False
    restored: bool = False
    source: str = "edit"
    #: with ``keep_undo=False``: the per-row :func:`~ice_lightning.core.editing.concept_responses` of the weights
    #: before the edit, for the export's pre-edit concept residual (the weights themselves are not kept)
    pre_edit_responses: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def spec(self) -> ConceptSpec:
        return self.plan.spec

    @property
    def method(self) -> str:
        return self.plan.method

    @property
    def hparams(self) -> dict:
        """The hyperparameters the solver used (defaults filled in)."""
        return next(iter(self.operators.values())).hparams

    @property
    def triggers(self) -> dict[str, list[str]]:
        """``{space: prompts}`` the trigger search found and erased (``trigger_rounds > 0``; else empty)."""
        return self.plan.triggers

    @property
    def layers(self) -> list[str]:
        """Qualified names of the edited layers."""
        return list(self.plan.targets)

    @property
    def layer_map(self) -> dict[str, TargetLayer]:
        """``{qualified name: TargetLayer(module, space)}``: what metrics, attacks and the callback measure."""
        return dict(self.plan.targets)

    @property
    def layer_spaces(self) -> dict[str, str]:
        return self.plan.layer_spaces

    @property
    def spaces(self) -> dict[str, EmbeddingSpace]:
        return self.plan.spaces

    def modules(self) -> dict[str, nn.Linear]:
        return self.plan.modules()

    def undo(self) -> None:
        """Restore the exact original weights of every edited layer (undo later erasures first)."""
        if self.undone:
            raise RuntimeError("this erasure was already undone")
        if self.restored:
            raise RuntimeError(
                "this erasure was restored from a checkpoint whose weights already held it; its original weights "
                "are not known, so it cannot be undone: reload the original model instead"
            )
        if not all(e.undoable for e in self.edits):
            raise RuntimeError(
                "this erasure was applied with keep_undo=False and kept no record of the original weights; reload "
                "the original model instead"
            )
        history = history_of(self.plan._history_key)
        if history and history[-1] is not self and self in history:
            raise RuntimeError("undo the later erasures of this pipeline first (undo in reverse order)")
        undo_edits(self.edits)
        self.undone = True
        if self in history:
            history.remove(self)

    @property
    def undoable(self) -> bool:
        """Whether :meth:`undo` can restore the original weights (not after ``keep_undo=False``, nor for an
        erasure restored from a checkpoint)."""
        return not self.restored and not self.undone and all(e.undoable for e in self.edits)

    def reference_weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """``{name: (weight, bias)}`` of every edited layer as it was before this erasure (float64, from the undo
        record: ``W + L R`` or the kept copy)."""
        out = {}
        for e in self.edits:  # a sharded weight: this rank's rows, laid out as the weight again
            out[e.name] = (like_weight(e.before(), e.module.weight), e.module.bias)
        return out

    @property
    def record(self) -> ErasureRecord:
        """This erasure as plain data (what the export, the manifest, the LoRA and ``verify`` read)."""
        return ErasureRecord(self.spec, self.method, self.hparams, dict(self.layer_spaces), dict(self.operators),
                             {k: list(v) for k, v in self.triggers.items()}, self.timings,
                             {e.name: e.fingerprint for e in self.edits}, self.source)  # fmt: skip

    def to_manifest(self) -> dict:
        """JSON-ready record of this erasure (export manifest)."""
        return self.record.to_manifest()
