"""The spectral pieces every method shares: energy-weighted subspaces, overlap projectors and the low-rank
operator ``D = U M U^T`` that edits a layer as ``W <- W (I - D)``.

Pure torch, float64. Notation (rows are token states): ``E_e`` (n_e x d) erase states, ``E_p`` (n_p x d)
preserve states. ``docs/method.md`` derives every formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "EnergySubspace",
    "Spectrum",
    "compress_states",
    "Overlap",
    "DissociationOperator",
    "expansion",
    "energy_subspace",
    "overlap_projector",
    "energy_overlap",
    "anderson_duffin",
    "with_hard_core",
]

_DTYPE = torch.float64
OverlapKind = Literal["angles", "energy", "parallel_sum", "anderson_duffin", "none"]



#: Above this, lam or mu swamp every other term of J in float64 and the edit silently vanishes.
_MAX_WEIGHT = 1e6
#: Below this, ``1 / mu`` in the Woodbury solve overflows what float64 resolves against the other terms.
_MIN_MU = 1e-12


def _in_range(name: str, value, low: float, high: float, what: str, low_open: bool = False,
              high_open: bool = False) -> None:  # fmt: skip
    """Refuse a hyperparameter outside ``[low, high]`` (or the open ends), NaN and inf included."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} ({what}) must lie in {lo}{low:g}, {high:g}{hi}, got {value!r}")


def expansion(r: Tensor, a: float) -> Tensor:
    """Anisotropic energy expansion ``f(r; a) = a r / ((a - 1) r + 1)``.

    ``f(0) = 0``, ``f(1) = 1``, ``a = 1`` gives ``f = r``, ``a -> inf`` gives the indicator ``r > 0``.
    """
    if math.isinf(a):
        return (r > 0).to(r.dtype)
    return a * r / ((a - 1.0) * r + 1.0)


@dataclass
class EnergySubspace:
    """``P = V diag(weights) V^T``: an orthonormal basis ``V`` (d x k) with energy-expanded weights."""

    basis: Tensor
    weights: Tensor
    energy: Tensor

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def dense(self) -> Tensor:
        """The d x d operator (for tests and small d only)."""
        return (self.basis * self.weights) @ self.basis.T


#: The error for erase states that span nothing (every route that reads them raises it).
ALL_ZERO_STATES = "the token states are all zero; nothing spans a subspace"


def _check_states(E: Tensor, name: str) -> Tensor:
    if not isinstance(E, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(E).__name__}")
    if E.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d) (one row per token state), got shape {tuple(E.shape)}")
    if E.shape[0] == 0:
        raise ValueError(f"{name} is empty: no token states were collected for it")
    if not torch.isfinite(E).all():
        raise ValueError(
            f"{name} contains NaN or inf; the text encoder produced non-finite states "
            "(run it in float32, or check its weights)"
        )
    return E.detach().to(_DTYPE)


class Spectrum(NamedTuple):
    """States given by their SVD, ``diag(s) Vh`` (at most d rows with the Gram matrix of the states they stand
    for): :func:`energy_subspace` reads them without decomposing again, which matters for a large base at
    d = 4096 (an SVD there takes seconds)."""

    s: Tensor
    Vh: Tensor

    def rows(self) -> Tensor:
        return self.s[:, None] * self.Vh


#: From this many rows and columns on, a spectrum comes from the eigen-decomposition of the smaller Gram matrix
#: (``E E^T`` or ``E^T E``) instead of an SVD: 5x faster at 1800 x 4096 (Wan, 100 concepts). Below it (every
#: single-concept erasure, every encoder up to 768-d) the SVD runs as before.
_GRAM_FROM = 1024
#: In the Gram form, singular values below this share of the largest cannot be told from round-off (the Gram's
#: eigenvalues carry an error of about ``eps s_max^2``): they are dropped. Their energy share is below 1e-14.
_GRAM_NOISE = 1e-7
#: In the Gram form, the directions of singular values below this share of the largest are orthonormalised again
#: (QR, in order of energy: the strong ones stay as they are), since ``E^T u / s`` loses orthogonality as
#: ``eps (s_max / s)^2``.
_GRAM_ACCURATE = 1e-4


def _spectrum(E: Tensor, rank_tol: float, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(s, Vh)`` of the thin SVD of ``E`` (n x d, float64), only the singular values above ``rank_tol * s_max`` and
    above ``floor``, largest first. From :data:`_GRAM_FROM` rows and columns on (and wherever the SVD fails to
    converge), by ``eigh`` of the smaller Gram matrix: with ``n <= d``, ``E E^T = U diag(s^2) U^T`` and
    ``Vh = diag(1/s) U^T E``; with ``n > d``, ``E^T E = V diag(s^2) V^T``. The two agree to about 1e-12 of ``E``'s
    norm (``tests/core/test_solver.py``)."""
    n, d = E.shape
    if min(n, d) < _GRAM_FROM:
        try:
            _, s, Vh = torch.linalg.svd(E, full_matrices=False)
        except torch.linalg.LinAlgError:  # LAPACK's divide and conquer can fail on a nearly degenerate E (a residual
            s = None  # of round-off, many equal tiny singular values): the Gram route below is exact enough there
        if s is not None:
            if s.numel() == 0 or s[0] <= 0:
                return s[:0], Vh[:0]
            keep = int(((s > rank_tol * s[0]) & (s > floor)).sum())  # sorted: the kept ones are a prefix
            return s[:keep], Vh[:keep]
    lam, Y = torch.linalg.eigh(E @ E.T if n <= d else E.T @ E)
    lam, Y = lam.flip(0), Y.flip(1)  # largest first
    if lam[0] <= 0:
        return lam[:0], E.new_zeros(0, d)
    s = lam.clamp_min(0).sqrt()
    keep = (s > max(rank_tol, _GRAM_NOISE) * s[0]) & (s > floor)
    s, Y = s[keep], Y[:, keep]
    if n > d:
        return s, Y.T
    Vh = (Y / s).T @ E
    if bool((s < _GRAM_ACCURATE * s[0]).any()):
        Q, R = torch.linalg.qr(Vh.T)
        Vh = Q.T * torch.sign(torch.diagonal(R))[:, None]
    return s, Vh


def compress_states(E: Tensor) -> Spectrum:
    """The rows of ``E`` (n x d) as a :class:`Spectrum`: the same Gram matrix (up to singular values below 1e-12 of
    the largest), hence the same energy subspace."""
    s, Vh = _spectrum(_check_states(E, "E"), 1e-12)
    return Spectrum(s, Vh)


def energy_subspace(E: Tensor | Spectrum, a: float, rank_tol: float = 1e-6) -> EnergySubspace:
    """Energy-weighted subspace of the rows of ``E`` (n x d, or a :class:`Spectrum`): SVD (:func:`_spectrum`), energy
    shares, expansion ``f(r; a)``."""
    if isinstance(E, Spectrum):
        s, Vh = E.s.to(_DTYPE), E.Vh.to(_DTYPE)
    else:
        s, Vh = _spectrum(_check_states(E, "E"), rank_tol)
    if s.numel() == 0 or s[0] <= 0:
        raise ValueError(ALL_ZERO_STATES)
    n = int((s > rank_tol * s[0]).sum())  # singular values come sorted: the kept ones are a prefix (a view)
    s, V = s[:n], Vh[:n].T
    r = s.square() / s.square().sum()
    return EnergySubspace(basis=V, weights=expansion(r, a), energy=r)


@dataclass
class Overlap:
    """``P_ov = Q diag(weights) Q^T`` with ``Q`` (d x k) orthonormal and weights in [0, 1]."""

    basis: Tensor
    weights: Tensor

    def dense(self) -> Tensor:
        return (self.basis * self.weights) @ self.basis.T


def _orth(X: Tensor, tol: float = 1e-10) -> Tensor:
    """Orthonormal basis of the column span of X (d x m), by SVD (rank-revealing)."""
    if X.shape[1] == 0:
        return X
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return X[:, :0]
    return U[:, s > tol * s[0]]


def _extend(V: Tensor, X: Tensor, tol: float = 1e-10) -> Tensor:
    """Orthonormal basis of span(V, X) for an orthonormal ``V`` (d x k): ``V`` followed by an orthonormal basis
    of ``X``'s part orthogonal to it (SVD of that d x m residual only, not of the d x (k + m) block)."""
    if X.shape[1] == 0:
        return V
    Rm = X - V @ (V.T @ X)
    Rm = Rm - V @ (V.T @ Rm)  # second pass: orthogonal to V to working precision
    scale = float(X.norm(dim=0).max()) if X.numel() else 0.0
    _, Uh = _spectrum(Rm.T, 0.0, floor=tol * max(scale, 1e-300))  # Rm's left singular vectors, as rows
    return torch.cat([V, Uh.T], dim=1)


def _low_rank_from_span(basis: Tensor, op_on_basis: Tensor) -> tuple[Tensor, Tensor]:
    """Given an orthonormal ``basis`` (d x k) and the k x k matrix of a symmetric operator in it, return
    the eigen-decomposition (Q, w) with w > 0 kept, Q orthonormal in R^d."""
    op_on_basis = (op_on_basis + op_on_basis.T) / 2
    w, A = torch.linalg.eigh(op_on_basis)
    keep = w > 1e-8  # weights live in [0, 1]; below this is round-off of an empty overlap
    return basis @ A[:, keep], w[keep].clamp(max=1.0)


def anderson_duffin(P: Tensor, Q: Tensor, rcond: float = 1e-10) -> Tensor:
    """Dense ``2 P (P + Q)^+ Q``: the orthogonal projector onto range(P) ∩ range(Q) for projectors P, Q."""
    return 2 * P @ torch.linalg.pinv(P + Q, rtol=rcond, hermitian=True) @ Q


def overlap_projector(
    erase: EnergySubspace,
    preserve: EnergySubspace,
    kind: OverlapKind = "angles",
    threshold: float | None = None,
    E_erase: Tensor | None = None,
    E_preserve: Tensor | None = None,
) -> Overlap:
    """Closed-form projector onto the directions the erase and preserve subspaces share.

    ``"angles"``: with ``B_e = V_e diag(sqrt f_e)`` and ``B_p = V_p diag(sqrt f_p)``, the SVD
    ``B_e^T B_p = A diag(c) C^T`` gives energy-weighted cosines ``c``; ``P_ov = (V_e A) diag(g(c)) (V_e A)^T``
    with ``g = c^2`` or a threshold. With exact projectors (f = 1) ``c`` are the cosines of the principal
    angles, so ``P_ov`` is the projector onto the intersection when the angles are 0 or 90 degrees.
    ``"parallel_sum"`` is ``P_e (P_e + P_p)^+ P_p`` (symmetrised), ``"anderson_duffin"`` the same formula
    (times 2) on the exact projectors ``V V^T``. All are computed inside span(V_e, V_p), never as d x d.
    ``"energy"`` needs the states themselves (``E_erase``, ``E_preserve``): see :func:`energy_overlap`.
    """
    d = erase.dim
    if kind == "none":
        return Overlap(basis=erase.basis[:, :0], weights=erase.weights[:0])
    if kind == "energy":
        if E_erase is None or E_preserve is None:
            raise ValueError("overlap='energy' needs the token states E_erase and E_preserve")
        return energy_overlap(erase, E_erase, E_preserve)
    if kind == "angles":
        cross = (erase.basis.T @ preserve.basis) * erase.weights.sqrt()[:, None] * preserve.weights.sqrt()
        A, c, _ = torch.linalg.svd(cross, full_matrices=False)
        c = c.clamp(0.0, 1.0)
        g = c.square() if threshold is None else (c >= threshold - 1e-12).to(c.dtype)
        keep = g > 0
        return Overlap(basis=erase.basis @ A[:, keep], weights=g[keep])
    # Both Anderson-Duffin forms live in span(V_e, V_p): write the operators in that basis (k x k).
    Z = _orth(torch.cat([erase.basis, preserve.basis], dim=1))
    if kind == "anderson_duffin":
        Pe = (Z.T @ erase.basis) @ (erase.basis.T @ Z)
        Pp = (Z.T @ preserve.basis) @ (preserve.basis.T @ Z)
        ov = anderson_duffin(Pe, Pp)
    elif kind == "parallel_sum":
        Ze, Zp = Z.T @ erase.basis, Z.T @ preserve.basis
        Pe = (Ze * erase.weights) @ Ze.T
        Pp = (Zp * preserve.weights) @ Zp.T
        ov = Pe @ torch.linalg.pinv(Pe + Pp, rtol=1e-10, hermitian=True) @ Pp
    else:
        raise ValueError(f"unknown overlap kind {kind!r}")
    basis, weights = _low_rank_from_span(Z, ov)
    assert basis.shape[0] == d
    return Overlap(basis=basis, weights=weights)


def energy_overlap(erase: EnergySubspace, E_erase: Tensor, E_preserve: Tensor) -> Overlap:
    """Share of preserve energy in each direction of the erase subspace.

    In the erase basis V, with mean token energies ``B = V^T E_e^T E_e V / n_e`` and
    ``A = V^T E_p^T E_p V / n_p``, ``P_ov = V (A + B)^{-1/2} A (A + B)^{-1/2} V^T``: symmetric, eigenvalues
    in [0, 1], 1 where only preserve tokens live, 0 where only the concept does (a normalised parallel
    sum of the two energy operators).
    """
    V = erase.basis
    Xe, Xp = E_erase @ V, E_preserve @ V
    B = Xe.T @ Xe / E_erase.shape[0]
    A = Xp.T @ Xp / E_preserve.shape[0]
    w, Y = torch.linalg.eigh(A + B)
    inv_sqrt = (Y / w.clamp_min(1e-12 * float(w.max())).sqrt()) @ Y.T
    g, Z = torch.linalg.eigh(inv_sqrt @ A @ inv_sqrt)
    g = g.clamp(0.0, 1.0)
    keep = g > 1e-8
    return Overlap(basis=V @ Z[:, keep], weights=g[keep])


def _add_direction(ov: Overlap, v: Tensor) -> Overlap:
    """Overlap with the direction ``v`` added at weight 1 (its part orthogonal to the current basis)."""
    r = v - ov.basis @ (ov.basis.T @ v)
    if r.norm() <= 1e-10 * max(float(v.norm()), 1e-300):
        return ov
    basis = torch.cat([ov.basis, (r / r.norm())[:, None]], dim=1)
    return Overlap(basis=basis, weights=torch.cat([ov.weights, ov.weights.new_ones(1)]))


@dataclass
class DissociationOperator:
    """A d x d operator in low-rank form, applied to a layer as ``W <- W (I - D) = W - (W U)(M V^T)``.

    ``D = U M U^T`` (``V`` is ``None``): ``U`` (d x k) has orthonormal columns spanning both of D's spaces and
    ``M`` is k x k. ``D = U M V^T`` (two-sided): ``U`` (d x k) spans D's columns and ``V`` (d x j) its rows, ``M``
    is k x j, neither basis need be orthonormal; ICE's solve gives this form when the erase states are many
    (half the width of the symmetric form's, see :func:`~ice_lightning.core.solver.dissociation_operator`). All
    float64. ``method`` and ``hparams`` record how it was made (they go into the export manifest).
    """

    U: Tensor
    M: Tensor
    method: str = "ice"
    hparams: dict = field(default_factory=dict)
    V: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """The width of the factors, an upper bound of D's rank (the smaller one in the two-sided form)."""
        return self.U.shape[1] if self.V is None else min(self.U.shape[1], self.V.shape[1])

    @property
    def right_basis(self) -> Tensor:
        """``V`` of ``D = U M V^T`` (``U`` in the symmetric form)."""
        return self.U if self.V is None else self.V

    def dense(self) -> Tensor:
        """The d x d matrix D (for tests and small d only)."""
        return self.U @ self.M @ self.right_basis.T

    def times(self, X: Tensor) -> Tensor:
        """``D X`` for X (d x m), through the factors."""
        return self.U @ (self.M @ (self.right_basis.T @ X))

    def rows_times(self, X: Tensor) -> Tensor:
        """``X D^T`` for rows X (m x d): each row ``x^T`` becomes ``(D x)^T``."""
        return ((X @ self.right_basis) @ self.M.T) @ self.U.T

    def row_space(self) -> Tensor:
        """An orthonormal basis (d x r) containing D's row space, where every change ``W D`` of a layer lies."""
        return self.U if self.V is None else _orth(self.V)

    def factors(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """Low-rank factors ``(L, R)`` of the weight change, ``W_new = W - L @ R``, in float64."""
        return self.left_factor(W), self.right_factor()

    def left_factor(self, W: Tensor) -> Tensor:
        """``L = W U`` (float64), the factor that depends on the layer; the dimension is checked."""
        if W.ndim != 2 or W.shape[1] != self.dim:
            raise ValueError(
                f"dimension mismatch: the operator acts on {self.dim}-d text states but the layer weight "
                f"has shape {tuple(W.shape)} (in_features {W.shape[-1]}); embed the prompts with the "
                "text encoder whose states this layer reads"
            )
        return W.detach().to(self.U.device, _DTYPE) @ self.U

    def right_factor(self) -> Tensor:
        """``R = M V^T`` (``M U^T`` in the symmetric form), the factor every layer the operator edits shares."""
        return self.M @ self.right_basis.T

    def apply(self, W: Tensor) -> Tensor:
        """``W (I - D)`` computed in float64 and cast back to W's dtype and device."""
        L, R = self.factors(W)
        return (W.detach().to(self.U.device, _DTYPE) - L @ R).to(W.device, W.dtype)

    def to(self, device: torch.device | str) -> DissociationOperator:
        V = None if self.V is None else self.V.to(device)
        return DissociationOperator(self.U.to(device), self.M.to(device), self.method, dict(self.hparams), V)


def _operator_from(spans: list[Tensor], D_apply, method: str, hparams: dict,
                   left: Tensor | None = None) -> DissociationOperator:  # fmt: skip
    """Build ``U, M`` from spans known to contain D's row and column spaces; ``D_apply(X) = D @ X``, or, given
    ``left`` (d x r), ``D @ X = left @ D_apply(X)``: ``M = (U^T left) D_apply(U)`` is then formed without a d x k
    intermediate (at Wan size with 100 concepts, 100 instead of 160 GFLOP). ``spans[0]`` has orthonormal columns
    (it is extended, not re-decomposed)."""
    U = _extend(spans[0], torch.cat(spans[1:], dim=1)) if len(spans) > 1 else spans[0]
    M = U.T @ D_apply(U) if left is None else (U.T @ left) @ D_apply(U)
    return DissociationOperator(U=U, M=M, method=method, hparams=hparams)


def _anchor_map(anchor: tuple[Tensor, Tensor] | None, d: int) -> tuple[Tensor, Tensor] | None:
    """``T = E_dst^T (E_src^T)^+``, returned as the pair (E_dst^T, pinv(E_src^T)), rank <= m."""
    if anchor is None:
        return None
    src, dst = (_check_states(x, n) for x, n in zip(anchor, ("anchor source states", "anchor states"), strict=True))
    if src.shape != dst.shape or src.shape[1] != d:
        raise ValueError(
            f"anchor pairs must be two (m, {d}) tensors of paired states, got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    return dst.T, torch.linalg.pinv(src.T, rtol=1e-8)


def _with_anchor(op: DissociationOperator, anchor: tuple[Tensor, Tensor] | None) -> DissociationOperator:
    """Replace the removed component by the anchor's: ``D -> (I - T) D`` with ``T c_src ≈ c_dst``."""
    pair = _anchor_map(anchor, op.dim)
    if pair is None:
        return op
    dst_T, src_pinv = pair
    D = op
    hp = dict(op.hparams, anchor=True)
    if op.V is not None:  # (I - T) U M V^T: only the column factor changes
        return DissociationOperator(op.U - dst_T @ (src_pinv @ op.U), op.M, op.method, hp, V=op.V)

    def apply(X: Tensor) -> Tensor:
        DX = D.times(X)
        return DX - dst_T @ (src_pinv @ DX)

    return _operator_from([op.U, dst_T], apply, op.method, hp)


def with_hard_core(op: DissociationOperator, threshold: float | None) -> DissociationOperator:
    """``op`` with every eigenvalue above ``threshold`` set to 1 (``None``: ``op`` itself), the rest as they are.

    Along an eigenvector ``x`` with ``D x = d x`` an input restores the layers' output at ``1 / (1 - d)`` times its
    norm; at ``d = 1`` nothing is left there to amplify. The result is the matrix function ``g(D)``, ``g(d) = 1``
    above the threshold and ``d`` below, computed on the factors: ``D U = U K`` with ``K = M V^T U`` (``K = M`` in
    the symmetric form), so ``D^n = U K^(n-1) M V^T`` and ``g(D) = U h(K) M V^T`` with ``h(d) = g(d) / d``, where
    ``h(K) = I + sum_c (1 / d_c - 1) a_c b_c^T`` over the right and left eigenvectors of ``K`` whose eigenvalues
    ``d_c`` are raised. Only ``M`` changes, so the form, the bases and the rank stay.

    For ICE's weighted minimiser ``D* = P_e^2 S^-1`` the eigenvectors ``x_c`` are ``S^-1``-orthogonal, and this is
    the minimiser of ``J`` under the constraint ``D x_c = x_c`` (``docs/method.md``, section 9): the least change of
    the objective that erases those directions exactly."""
    if threshold is None:
        return op
    K = op.M @ (op.right_basis.T @ op.U)
    d, A = torch.linalg.eig(K)
    core = d.real > threshold
    if not bool(core.any()):
        return op
    # a complex pair has one real part, so it is raised whole and the correction stays real
    left = torch.linalg.solve(A, torch.eye(A.shape[0], dtype=A.dtype))[core]  # rows b_c^T of A^-1
    h = torch.eye(K.shape[0], dtype=K.dtype) + ((A[:, core] * (1 / d[core] - 1)) @ left).real
    return DissociationOperator(op.U, h @ op.M, op.method, dict(op.hparams), V=op.V)


def _checked_inputs(E_erase: Tensor, E_preserve: Tensor, E_base: Tensor | Spectrum | None):
    """The states, checked (finite, 2-d, non-empty) and of one width; float64. The preserve and base states may come
    as a :class:`Spectrum` (an SVD's output: finite unless its singular values are not)."""
    E_erase = _check_states(E_erase, "E_erase")
    checked = []
    for name, E in (("E_preserve", E_preserve), ("E_base", E_base)):
        if isinstance(E, Spectrum):
            _check_states(E.s[:, None], name)
        elif E is not None:
            E = _check_states(E, name)
        checked.append(E)
    E_preserve, E_base = checked
    for name, E in (("preserve", E_preserve), ("base", E_base)):
        width = None if E is None else (E.Vh if isinstance(E, Spectrum) else E).shape[1]
        if width is not None and width != E_erase.shape[1]:
            raise ValueError(f"dimension mismatch: erase states are {E_erase.shape[1]}-d, {name} states {width}-d")
    return E_erase, E_preserve, E_base


def _composed(first: DissociationOperator, second: DissociationOperator, method: str,
              hparams: dict) -> DissociationOperator:  # fmt: skip
    """``I - D = (I - D_first)(I - D_second)``: ``D = D_second + D_first (I - D_second)``, in span(U_1, U_2). With a
    two-sided operator among them the result stays two-sided, with no decomposition:
    ``D = [U_1, U_2] [[M_1, -M_1 (V_1^T U_2) M_2], [0, M_2]] [V_1, V_2]^T``."""
    if first.V is not None or second.V is not None:
        U1, M1, V1, U2, M2, V2 = first.U, first.M, first.right_basis, second.U, second.M, second.right_basis
        top = torch.cat([M1, -(M1 @ (V1.T @ U2)) @ M2], dim=1)
        bottom = torch.cat([M2.new_zeros(M2.shape[0], M1.shape[1]), M2], dim=1)
        return DissociationOperator(torch.cat([U1, U2], dim=1), torch.cat([top, bottom]), method, hparams,
                                    V=torch.cat([V1, V2], dim=1))  # fmt: skip

    def apply(X: Tensor) -> Tensor:
        Y = second.times(X)
        return Y + first.times(X - Y)

    return _operator_from([first.U, second.U], apply, method, hparams)
