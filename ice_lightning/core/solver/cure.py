"""CURE (arXiv 2505.12677) as a method of the registry: ``D = P_e - P_e P_p``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .spectral import DissociationOperator, Spectrum, _in_range, _operator_from, _with_anchor, energy_subspace

__all__ = ["CUREParams", "cure_operator"]


@dataclass(frozen=True)
class CUREParams:
    """CURE's hyperparameters.

    Attributes:
        erase_expansion: ``a_e`` of the erase subspace's energy expansion (``math.inf``: a hard projector).
        preserve_expansion: ``a_p`` of the preserve subspace's energy expansion.
        rank_tol: singular values below ``rank_tol * s_max`` are treated as zero.
    """

    erase_expansion: float = 1000.0
    preserve_expansion: float = 10.0
    rank_tol: float = 1e-6

    needs_gram = False  # reads no layer weights

    def __post_init__(self) -> None:
        _check_expansions(self.erase_expansion, self.preserve_expansion)
        _in_range("rank_tol", self.rank_tol, 0.0, 1.0, "relative singular-value cut-off", True, True)

    def build(self, E_erase: Tensor, E_preserve: Tensor, anchor: tuple[Tensor, Tensor] | None = None,
              concepts: int = 1, E_base: Tensor | Spectrum | None = None,
              gram: Tensor | None = None) -> DissociationOperator:  # fmt: skip
        return cure_operator(E_erase, E_preserve, self.erase_expansion, self.preserve_expansion, self.rank_tol,
                             anchor=anchor)  # fmt: skip


def _check_expansions(*values) -> None:
    for key, value in zip(("erase_expansion", "preserve_expansion"), values, strict=True):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{key} must be > 0 (math.inf for a hard projector), got {value!r}")


def cure_operator(
    E_erase: Tensor,
    E_preserve: Tensor,
    erase_expansion: float = 1000.0,
    preserve_expansion: float = 10.0,
    rank_tol: float = 1e-6,
    anchor: tuple[Tensor, Tensor] | None = None,
) -> DissociationOperator:
    """CURE (arXiv 2505.12677): ``D = P_e - P_e P_p`` with energy-weighted P_e, P_p."""
    Pe = energy_subspace(E_erase, erase_expansion, rank_tol)
    Pp = energy_subspace(E_preserve, preserve_expansion, rank_tol)
    V, f, Vp, fp = Pe.basis, Pe.weights, Pp.basis, Pp.weights

    def apply(X: Tensor) -> Tensor:
        Y = X - Vp @ (fp[:, None] * (Vp.T @ X))
        return V @ (f[:, None] * (V.T @ Y))

    hp = {"erase_expansion": erase_expansion, "preserve_expansion": preserve_expansion, "rank_tol": rank_tol}
    return _with_anchor(_operator_from([V, Vp], apply, "cure", hp), anchor)
