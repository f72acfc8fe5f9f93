"""All-or-nothing, exactly reversible low-rank edits of linear layers: ``W <- W - L R``.

The low-rank factors of every edit are computed and checked before the first weight is written, and a
layer that fails while being written (its new weights overflow the layer's dtype, the write itself fails, or
the user interrupts) rolls back the ones written before it, so a failing edit leaves the model untouched;
should the rollback itself fail, the error names every layer left edited. Each :class:`LayerEdit` keeps the
low-rank delta ``(L, R)`` and the few entries where rounding to the layer's dtype is not invertible, so
:meth:`LayerEdit.undo` restores the original weights bit for bit without storing a copy of them. An undo
first checks every layer against the exact hash of the weight it wrote, then reverts: all or none.

Sharded weights (torch FSDP2's ``DTensor`` parameters, sharded by rows) are edited shard by shard: the edit
``W (I - D)`` mixes a weight's input columns only, so each rank edits the rows it holds with the same
operator (:func:`~ice_lightning.core.sharding.local_shard`),
and no rank ever gathers a full weight. Hashes are then per shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .sharding import gather_columns, is_sharded, local_shard
from .solver import DissociationOperator

__all__ = [
    "LayerEdit",
    "apply_edits",
    "undo_edits",
    "tensor_sha256",
    "RollbackError",
    "dense_is_cheaper",
    "edit_form",
]

_F64 = torch.float64
# Above this share of non-invertible entries a dense copy of the original is cheaper than indices.
_DENSE_FIXUP_SHARE = 0.25
# The low-rank undo record must save this share of a copy's memory to be worth its second pass over the weight and
# its non-invertible entries (Wan's text layer with 100 concepts: L is 0.94 of a copy, the pass 0.15 s).
_LOW_RANK_RECORD_SAVING = 0.125


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's raw bytes in its own dtype (any dtype, bf16 included): the exact fingerprint of a
    weight (faster than a float64 checksum, and it changes when any bit does); of this rank's shard for a
    sharded ``DTensor``."""
    flat = local_shard(t).detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def layer_outputs(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """``x W^T + b`` in float64. A row-sharded ``DTensor`` weight (FSDP2) gives this rank's output columns,
    gathered across ranks: the outputs (a few hundred rows) travel, never the weight."""
    if is_sharded(weight):
        local = layer_outputs(local_shard(weight), None if bias is None else local_shard(bias), x)
        return gather_columns(local, weight)
    out = x @ weight.detach().to(x.device, torch.float64).T
    return out if bias is None else out + bias.detach().to(x.device, torch.float64)


def rms_gain(weight: Tensor) -> Tensor:
    """``||W||_F / sqrt(n)``, the root-mean-square gain of a layer over its ``n`` inputs (float64 scalar): a
    row-sharded ``DTensor`` weight (FSDP2) sums each rank's rows, gathered as one number per row."""
    if is_sharded(weight):
        rows = gather_columns(local_shard(weight).detach().to(torch.float64).square().sum(1)[None], weight)
        return rows.sum().div(weight.shape[1]).sqrt()
    return weight.detach().to(torch.float64).square().sum().div(weight.shape[1]).sqrt()


def concept_responses(weights: dict[str, tuple[Tensor, Tensor | None]], layer_spaces: dict[str, str],
                      states: dict[str, Tensor], operators: dict[str, DissociationOperator]
                      ) -> dict[str, Tensor]:  # fmt: skip
    """Per layer, ``||W D c|| / (||c|| g(W))`` for each concept state ``c`` of its space, with ``g`` the layer's
    :func:`rms_gain` (float64): the gain of the layer along the erased part of the concept, relative to its
    average gain. All that :func:`~ice_lightning.core.probe.concept_residual` reads of the weights."""
    out = {}
    for name, (W, _) in weights.items():
        op, x = operators[layer_spaces[name]], states[layer_spaces[name]]
        if not x.shape[0]:
            continue
        x = x.to(op.U.device, torch.float64)
        along = layer_outputs(W, None, op.rows_times(x)).norm(dim=1)  # rows of (W D x)^T
        out[name] = along / (x.norm(dim=1) * rms_gain(W).to(x.device)).clamp_min(1e-300)
    return out


class RollbackError(RuntimeError):
    """A failed edit whose rollback failed too: the message names every layer left edited."""


@dataclass
class LayerEdit:
    """One applied edit of a layer and what is needed to undo it exactly: a low-rank record ``(L, R)`` with
    ``W_before = W_after + L R`` and the entries where rounding is not invertible, or a copy of the original
    weight (``original``) where that is smaller, or nothing (``keep_undo=False``)."""

    name: str
    module: nn.Linear
    L: Tensor | None
    R: Tensor | None
    fix_index: Tensor | None
    fix_values: Tensor | None
    fingerprint: str
    fused: bool = False
    original: Tensor | None = None

    @property
    def undoable(self) -> bool:
        return self.L is not None or self.original is not None

    def is_current(self) -> bool:
        """Whether the weight is still exactly what this edit wrote (undo is only valid then)."""
        return tensor_sha256(self.module.weight) == self.fingerprint

    def before(self, after: Tensor | None = None) -> Tensor:
        """The weight before this edit, float64 (this rank's rows of a sharded weight): bit for bit while the layer is
        as the edit left it (:meth:`restored`: ``W + L R`` rounded to the layer's dtype misses the original in the
        entries where rounding did not invert), else ``after + L R``; ``after``: the weight this edit wrote, when the
        layer has been edited again since (default: the layer's current weight)."""
        if self.original is not None:
            return self.original.to(torch.float64)
        if self.L is None:
            raise RuntimeError(f"the edit of layer {self.name!r} kept no undo record (keep_undo=False)")
        if after is None and self.is_current():
            return self.restored(checked=True).to(self.L.device, _F64)
        w = local_shard(self.module.weight).detach() if after is None else after
        return w.to(self.L.device, _F64) + self.L @ self.R

    def undo(self, checked: bool = False, written: Tensor | None = None) -> None:
        """Restore the original weight bit for bit (only valid while the weight is as the edit left it;
        ``checked``: the caller has just confirmed that; ``written``: the weight this edit wrote, to restore
        a layer whose write was cut short)."""
        _write(local_shard(self.module.weight), self.restored(checked, written))

    def restored(self, checked: bool = False, written: Tensor | None = None) -> Tensor:
        """The original weight, bit for bit, computed without writing anything (see :meth:`undo`)."""
        if not self.undoable:
            raise RuntimeError(
                f"the edit of layer {self.name!r} was applied with keep_undo=False and kept no record to undo it; "
                "reload the original model"
            )
        if not checked and not self.is_current():
            raise RuntimeError(
                f"layer {self.name!r} changed since it was edited (training?); undo would not restore the "
                "original weights. Undo right after erase, or reload the original model"
            )
        if self.original is not None:
            return self.original
        source = written if written is not None else local_shard(self.module.weight).detach()
        restored = _plus_delta(source, self.L, self.R, self.fused)
        if self.fix_index is not None:  # the entries where rounding did not invert
            restored.view(-1)[self.fix_index.to(restored.device)] = self.fix_values.to(restored.device)
        return restored


def _write(weight: Tensor, value: Tensor) -> None:
    """The one place a weight is written (in place: dtype, device and the Parameter object are kept)."""
    with torch.no_grad():
        weight.copy_(value)


def dense_is_cheaper(rank: int, dim: int, outs: Sequence[int] | None = None, right: int | None = None) -> bool:
    """The cost model of an edit ``W <- W - X D`` of ``out x d`` weights by one operator of rank ``k``: per layer,
    the low-rank form ``(X U)(M U^T)`` costs ``2 out d k`` multiply-adds and the dense ``X D`` costs ``out d^2``,
    so dense wins once ``k`` reaches half the width (many concepts, or states that span the space). With ``outs``
    (the ``out`` of every layer the operator edits), what each form costs once is counted too: ``D = U M U^T``,
    ``d k (k + d)``, against ``M U^T``, ``k^2 d``. A few layers with ``k`` near ``d`` then stay low-rank (Wan's
    single text layer with 100 concepts: 2.0e11 instead of 2.8e11). ``right``: the width ``j`` of ``V`` in a
    two-sided ``D = U M V^T`` (``k`` is ``U``'s): the one-time costs are then ``d k (j + d)`` and ``k j d``."""
    if outs is None:
        return 2 * rank >= dim
    j = rank if right is None else right
    dense = dim * rank * (j + dim) + sum(out * dim * dim for out in outs)
    low_rank = rank * j * dim + sum(2 * out * dim * rank for out in outs)
    return dense < low_rank


@dataclass
class _Update:
    """Phase 1's plan for one layer: low-rank factors ``(L, R)``, or the dense ``D`` (with the base to subtract)."""

    L: Tensor | None = None
    R: Tensor | None = None
    D: Tensor | None = None
    base: Tensor | None = None


#: The forms an edit takes (:func:`edit_form`).
EditForm = Literal["dense", "low-rank", "low-rank, M in L"]


def edit_form(op: DissociationOperator, outs: Sequence[int]) -> EditForm:
    """The cost model's form of an edit by ``op`` of layers with ``outs`` outputs: ``"dense"`` (every layer
    ``W - W D``, :func:`dense_is_cheaper`), ``"low-rank"`` (``W - (W U) R`` with the shared ``R = M V^T``), or, for
    a two-sided operator editing fewer outputs in all than its width (Wan's one text layer), ``"low-rank, M in L"``
    (``W - ((W U) M) V^T``): ``out (k j + j d)`` per layer instead of ``k j d`` once plus ``out k d``."""
    k, j, d = op.U.shape[1], op.right_basis.shape[1], op.dim
    if dense_is_cheaper(k, d, outs, right=j):
        return "dense"
    if op.V is not None and sum(out * (k * j + j * d - k * d) for out in outs) < k * j * d:
        return "low-rank, M in L"
    return "low-rank"


def _shared_factor(op: DissociationOperator, outs: Sequence[int]) -> tuple[bool, Tensor, Tensor | None]:
    """What every layer an edit by ``op`` touches shares, by :func:`edit_form`: ``(dense, common, mix)`` with
    ``common`` the dense ``D``, or ``R`` (``M V^T``, or ``V^T`` with each layer's ``L = (W U) M``: ``mix = M``)."""
    form = edit_form(op, outs)
    if form == "dense":
        return True, op.dense(), None
    if form == "low-rank, M in L":
        return False, op.V.T, op.M
    return False, op.right_factor(), None


def _factors(name: str, module: nn.Linear, op: DissociationOperator, base: Tensor | None,
             shared: dict[int, tuple[bool, Tensor, Tensor | None]]) -> _Update:  # fmt: skip
    """Phase 1 of an edit: the low-rank factors ``(L, R)`` of ``W_new = W - L R`` (or, by the cost model, the
    dense operator), checked; nothing written. ``shared[id(op)]``: the cost model's choice for the operator and
    what every layer it edits shares (:func:`_shared_factor`)."""
    w = local_shard(module.weight)
    if w.ndim != 2 or w.shape[1] != op.dim:
        op.left_factor(w)  # raises the dimension-mismatch error
    is_dense, common, mix = shared[id(op)]
    if is_dense:
        if not _all_finite(w):
            raise ValueError(f"layer {name!r} already holds NaN or inf weights; refusing to edit it")
        return _Update(D=common, base=None if base is None else base.to(w.device, w.dtype))
    # Without a base the whole weight is edited; with one, only what changed since (W - base).
    X = w.detach() if base is None else w.detach() - base.to(w.device, w.dtype)
    if _fused(w):  # the update is applied in float32 anyway: W U (and (W U) M) in float32, no float64 copy of W
        L = X @ op.U.to(X.device, X.dtype)
        L = (L if mix is None else L @ mix.to(L.device, L.dtype)).to(_F64)
    else:
        L = op.left_factor(X)
        L = L if mix is None else L @ mix
    R = common
    if not (torch.isfinite(L).all() and torch.isfinite(R).all()):
        if not _all_finite(w):  # a non-finite weight shows in W U: only then is the whole weight read
            raise ValueError(f"layer {name!r} already holds NaN or inf weights; refusing to edit it")
        raise ValueError(f"the edit of layer {name!r} is not finite; check the operator and the weights")
    return _Update(L=L, R=R)


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite, in one pass without a mask: a float64 sum of float32 or half values cannot
    overflow, so it is finite exactly when every entry is."""
    return bool(torch.isfinite(t.sum(dtype=_F64)))


def _fused(w: Tensor) -> bool:
    """float32 layers take the update in one fused float32 ``addmm`` (a single pass over the weight, where a
    float64 round trip makes several: the edit is memory-bound); half-precision layers keep the float64 path,
    whose single rounding matters at their precision."""
    return w.dtype == torch.float32


def _plus_delta(w: Tensor, L: Tensor, R: Tensor, fused: bool, sign: float = 1.0) -> Tensor:
    """``cast(w + sign * L R)``; the same arithmetic on apply and undo, so undo can be made bit-exact."""
    if fused:
        return torch.addmm(w, L.to(w.device, w.dtype), R.to(w.device, w.dtype), alpha=sign)
    return (w.to(L.device, _F64) + sign * (L @ R)).to(w.device, w.dtype)


def _new_weight(name: str, w: Tensor, up: _Update, fused: bool) -> Tensor:
    if up.D is None:
        new = _plus_delta(w.detach(), up.L, up.R, fused, sign=-1.0)
    else:
        X = w.detach() if up.base is None else w.detach() - up.base
        if fused:
            new = torch.addmm(w.detach(), X, up.D.to(w.device, w.dtype), alpha=-1.0)
        else:
            new = (w.to(up.D.device, _F64) - X.to(up.D.device, _F64) @ up.D).to(w.device, w.dtype)
    if not _all_finite(new):
        raise ValueError(
            f"the edit of layer {name!r} does not fit in {w.dtype} (the new weights overflow); load the model "
            "in float32 or bfloat16 for the edit, then cast it back"
        )
    return new


def _undo_record(w: Tensor, new: Tensor, up: _Update, fused: bool):
    """``(L, R, fix_index, fix_values, original)``: the smaller exact record. The low-rank one stores ``L`` (out x k,
    float64) and the entries where ``cast(new + L R)`` misses the original, which takes a second pass over the
    weight to find; a copy of the original costs ``out x d`` in the layer's dtype and is taken when the low-rank
    record would not save at least :data:`_LOW_RANK_RECORD_SAVING` of that, or when the update was dense."""
    copy_bytes = w.element_size() * w.shape[1]  # per row
    if up.D is not None or 8 * up.L.shape[1] > (1 - _LOW_RANK_RECORD_SAVING) * copy_bytes:
        return None, None, None, None, w.detach().clone()
    wrong = (_plus_delta(new, up.L, up.R, fused) != w.detach()).view(-1)
    n_wrong = int(wrong.sum())
    if n_wrong == 0:
        return up.L, up.R, None, None, None
    if n_wrong > _DENSE_FIXUP_SHARE * wrong.numel():
        return None, None, None, None, w.detach().clone()
    idx = wrong.nonzero().squeeze(1)
    return up.L, up.R, idx, w.detach().reshape(-1)[idx].clone(), None


def apply_edits(
    targets: Sequence[tuple[str, nn.Linear, DissociationOperator]],
    bases: dict[str, Tensor] | None = None,
    into: list[LayerEdit] | None = None,
    keep_undo: bool = True,
) -> list[LayerEdit]:
    """Apply ``W <- W (I - D)`` to every target, or to none if any target fails.

    With ``bases`` (``{name: weight at the last edit}``) only the change since then is edited:
    ``W <- W - (W - base) D``. Re-applying then never compounds: with no change it is an exact no-op,
    and after fine-tuning it removes what the update added along the erased directions.

    Phase 1 plans and checks every edit before anything is written: the low-rank factors (small: ``out x k``
    and ``k x d``, float64), or the dense ``D`` where the cost model (:func:`dense_is_cheaper`) says so; phase 2
    forms each new weight once (see :func:`_fused`), checks it, writes it under ``torch.no_grad()`` with
    ``copy_`` (keeping dtype, device and the Parameter object), and rolls back every layer already written
    should a later one fail (overflow in the layer's dtype, a failing write, an interrupt). Each written layer
    is appended to ``into`` (a list the caller already holds, so an interrupt between the last write and the
    return loses no edit), and the list is returned.

    ``keep_undo=False`` drops the undo records once every layer is written (a failure during the writes is
    still rolled back): no memory is held afterwards, for a model that is reloaded rather than undone.
    """
    bases = bases or {}
    outs: dict[int, list[int]] = {}
    for name, module, op in targets:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name!r} is a {type(module).__name__}, not a torch.nn.Linear")
        outs.setdefault(id(op), []).append(module.out_features)
    shared: dict[int, tuple[bool, Tensor, Tensor | None]] = {}
    for _, _, op in targets:
        if id(op) not in shared:
            shared[id(op)] = _shared_factor(op, outs[id(op)])
    plans = [_factors(name, module, op, bases.get(name), shared) for name, module, op in targets]  # phase 1
    edits: list[LayerEdit] = into if into is not None else []
    inflight: tuple[LayerEdit, Tensor] | None = None  # the layer being written: restored from what it got
    written: list[LayerEdit] = []  # with keep_undo=False, the records kept until every write has succeeded
    try:
        for (name, module, _), up in zip(targets, plans, strict=True):  # phase 2: write
            w = local_shard(module.weight)
            fused = _fused(w)
            new = _new_weight(name, w, up, fused)
            L, R, idx, vals, original = _undo_record(w, new, up, fused)  # keep_undo=False: until the last write
            edit = LayerEdit(name, module, L, R, idx, vals, tensor_sha256(new), fused, original)
            inflight = (edit, new)
            _write(w, new)
            edits.append(edit)
            written.append(edit)
            inflight = None
    except BaseException as err:
        _roll_back(edits, inflight, err)
        raise
    if not keep_undo:
        for edit in written:
            edit.L = edit.R = edit.fix_index = edit.fix_values = edit.original = None
    return edits


def _roll_back(edits: list[LayerEdit], inflight: tuple[LayerEdit, Tensor] | None, cause: BaseException) -> None:
    """Undo the written layers after ``cause``; raise :class:`RollbackError` naming any left edited."""
    todo = [(e, None) for e in reversed(edits)]
    if inflight is not None:  # its write may have been cut short: restore it from the weight it was given
        todo.insert(0, inflight)
    left = []
    for e, written in todo:
        try:
            e.undo(checked=True, written=written)  # written a moment ago by this very call
        except Exception:  # keep rolling back the others, then report every layer left
            left.append(e.name)
    edits.clear()
    if left:
        raise RollbackError(
            f"the edit failed ({type(cause).__name__}: {cause}) and rolling it back failed too: layers {left[::-1]} "
            "still hold the edited weights, every other layer is restored. Reload the model from where it was "
            "loaded (nothing was written to disk) before using it"
        ) from cause


def undo_edits(edits: Sequence[LayerEdit]) -> None:
    """Undo edits, all or none, in two phases like :func:`apply_edits`: every layer is checked and its original
    weight computed before any is written; should a write fail (an error, Ctrl-C), the layers already restored
    get their edited weights back, so the erasure stays whole and a repeated undo finishes the job."""
    stale = [e.name for e in edits if not e.is_current()]
    if stale:
        raise RuntimeError(
            f"layers {stale} changed since they were edited (training?); undo would not restore the original "
            "weights, so nothing was reverted. Undo right after erase, or reload the original model"
        )
    plans = [(e, e.restored(checked=True)) for e in reversed(edits)]  # phase 1: nothing is written
    done: list[tuple[LayerEdit, Tensor]] = []  # (layer, the edited weight it held), to put back on failure
    try:
        for e, original in plans:  # phase 2: write
            w = local_shard(e.module.weight)
            done.append((e, w.detach().clone()))
            _write(w, original)
    except BaseException as err:
        left = []
        for e, edited in reversed(done):
            try:
                _write(local_shard(e.module.weight), edited)
            except Exception:
                left.append(e.name)
        if left:
            raise RollbackError(
                f"undo failed ({type(err).__name__}: {err}) and putting the edit back failed too: layers {left} "
                "hold their original weights, every other layer the edited ones. Reload the model"
            ) from err
        raise
