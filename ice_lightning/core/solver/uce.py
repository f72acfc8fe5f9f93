"""UCE (Gandikota et al. 2024), its closed form as an operator and, for the speed benchmark, as published."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .spectral import _DTYPE, _MAX_WEIGHT, DissociationOperator, Spectrum, _check_states, _in_range, _orth

__all__ = ["UCEParams", "uce_operator", "uce_dense_edit"]


@dataclass(frozen=True)
class UCEParams:
    """UCE's hyperparameters.

    Attributes:
        lam: the ridge weight of UCE's closed form (larger keeps the layer closer to the original).
        preserve_scale: the weight of the preserved rows.
    """

    lam: float = 1.0
    preserve_scale: float = 1.0

    needs_gram = False  # reads no layer weights

    def __post_init__(self) -> None:
        _in_range("lam", self.lam, 0.0, _MAX_WEIGHT, "UCE's ridge weight", low_open=True)
        _in_range("preserve_scale", self.preserve_scale, 0.0, _MAX_WEIGHT, "UCE's preserve weight")

    def build(self, E_erase: Tensor, E_preserve: Tensor, anchor: tuple[Tensor, Tensor] | None = None,
              concepts: int = 1, E_base: Tensor | Spectrum | None = None,
              gram: Tensor | None = None) -> DissociationOperator:  # fmt: skip
        # UCE pairs each erase state with a guide: with an anchor, the paired sources are C_e
        erase, guide = (E_erase, None) if anchor is None else anchor
        return uce_operator(erase, E_preserve, self.lam, self.preserve_scale, E_guide=guide)


def uce_operator(
    E_erase: Tensor,
    E_preserve: Tensor,
    lam: float = 1.0,
    preserve_scale: float = 1.0,
    E_guide: Tensor | None = None,
) -> DissociationOperator:
    """UCE's closed form as an operator: ``W' = W (I - D)`` with
    ``D = (C_e - C_g)^T C_e (lam I + C_e^T C_e + s C_p^T C_p)^-1`` (C_g = 0 without a guide).

    Identical to ``uce_dense_edit`` (tested), but solved inside span(C_e, C_g, C_p)."""
    Ce = _check_states(E_erase, "E_erase")
    Cp = _check_states(E_preserve, "E_preserve") * math.sqrt(preserve_scale)
    Cg = torch.zeros_like(Ce) if E_guide is None else _check_states(E_guide, "E_guide")
    if not lam > 0:
        raise ValueError(f"UCE needs lam > 0, got {lam}")
    Z = _orth(torch.cat([Ce.T, Cg.T, Cp.T], dim=1))
    Ze, Zp = Ce @ Z, Cp @ Z
    G = lam * torch.eye(Z.shape[1], dtype=Z.dtype) + Ze.T @ Ze + Zp.T @ Zp
    # D restricted to span(Z): D Z = (Ce - Cg)^T (Ce Z) G^-1; D vanishes on the complement.
    DZ = (Ce - Cg).T @ torch.linalg.solve(G.T, Ze.T).T
    hp = {"lam": lam, "preserve_scale": preserve_scale, "guide": E_guide is not None}
    return DissociationOperator(U=Z, M=Z.T @ DZ, method="uce", hparams=hp)


def uce_dense_edit(
    W: Tensor,
    E_erase: Tensor,
    E_preserve: Tensor,
    lam: float = 1.0,
    preserve_scale: float = 1.0,
    E_guide: Tensor | None = None,
) -> Tensor:
    """UCE's dense closed form for one layer, exactly as published:
    ``W' = (lam W + sum W c_g c^T + s sum W c_p c_p^T)(lam I + sum c c^T + s sum c_p c_p^T)^-1``.
    The baseline for the speed benchmark; ``uce_operator`` is the same edit in low-rank form."""
    Ce = _check_states(E_erase, "E_erase")
    Cp = _check_states(E_preserve, "E_preserve")
    Cg = torch.zeros_like(Ce) if E_guide is None else _check_states(E_guide, "E_guide")
    W64 = W.detach().to(_DTYPE)
    d = W64.shape[1]
    rhs = lam * W64 + W64 @ Cg.T @ Ce + preserve_scale * W64 @ Cp.T @ Cp
    lhs = lam * torch.eye(d, dtype=_DTYPE) + Ce.T @ Ce + preserve_scale * Cp.T @ Cp
    return torch.linalg.solve(lhs.T, rhs.T).T.to(W.dtype)
