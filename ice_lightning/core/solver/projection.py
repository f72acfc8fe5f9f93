"""Plain projection onto the concept's top erase directions, as a method of the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .spectral import DissociationOperator, Spectrum, _in_range, _with_anchor, energy_subspace

__all__ = ["ProjectionParams", "projection_operator"]


@dataclass(frozen=True)
class ProjectionParams:
    """The projection's hyperparameters.

    Attributes:
        energy_kept: the share of the erase energy the projected directions hold (the top ones).
        rank_tol: singular values below ``rank_tol * s_max`` are treated as zero.
    """

    energy_kept: float = 1.0
    rank_tol: float = 1e-6

    needs_gram = False  # reads no layer weights

    def __post_init__(self) -> None:
        _in_range("energy_kept", self.energy_kept, 0.0, 1.0, "share of the erase energy kept", low_open=True)
        _in_range("rank_tol", self.rank_tol, 0.0, 1.0, "relative singular-value cut-off", True, True)

    def build(self, E_erase: Tensor, E_preserve: Tensor, anchor: tuple[Tensor, Tensor] | None = None,
              concepts: int = 1, E_base: Tensor | Spectrum | None = None,
              gram: Tensor | None = None) -> DissociationOperator:  # fmt: skip
        return projection_operator(E_erase, E_preserve, self.energy_kept, self.rank_tol, anchor=anchor)


def projection_operator(
    E_erase: Tensor,
    E_preserve: Tensor | None = None,
    energy_kept: float = 1.0,
    rank_tol: float = 1e-6,
    anchor: tuple[Tensor, Tensor] | None = None,
) -> DissociationOperator:
    """Plain projection: ``D = V_k V_k^T`` onto the top erase directions holding ``energy_kept`` of the
    energy (``E_preserve`` is ignored; accepted so every method has the same interface)."""
    if not 0 < energy_kept <= 1:
        raise ValueError(f"energy_kept must lie in (0, 1], got {energy_kept}")
    Pe = energy_subspace(E_erase, math.inf, rank_tol)
    cum = torch.cumsum(Pe.energy, 0)
    k = int((cum < energy_kept - 1e-12).sum()) + 1
    V = Pe.basis[:, :k]
    op = DissociationOperator(
        U=V, M=torch.eye(k, dtype=V.dtype), method="projection", hparams={"energy_kept": energy_kept}
    )
    return _with_anchor(op, anchor)
