"""The ICE solver: energy-weighted subspaces, the overlap projector and the dissociation operator.

This module is the one home of the mathematics (``docs/method.md`` derives every formula). It is pure
torch: no Lightning, diffusers or transformers import, so the callback, the one-shot API, the benchmarks
and the tests all call the same code.

Notation (rows are token states): ``E_e`` (n_e x d) erase states, ``E_p`` (n_p x d) preserve states.
Every operator ``D`` is returned in low-rank form ``D = U M U^T`` with ``U`` (d x k) orthonormal, so a
linear layer reading the text states is edited as ``W <- W (I - D) = W - (W U)(M U^T)``.

Example:
    >>> import torch
    >>> from ice_lightning.core.solver import dissociation_operator
    >>> g = torch.Generator().manual_seed(0)
    >>> E_erase, E_preserve = torch.randn(12, 64, generator=g), torch.randn(40, 64, generator=g)
    >>> op = dissociation_operator(E_erase, E_preserve)
    >>> W = torch.randn(32, 64, generator=g)
    >>> op.apply(W).shape
    torch.Size([32, 64])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ICEHyperParams",
    "EnergySubspace",
    "Spectrum",
    "compress_states",
    "Overlap",
    "DissociationOperator",
    "expansion",
    "energy_subspace",
    "overlap_projector",
    "energy_overlap",
    "ice_components",
    "anderson_duffin",
    "spectral_unlearning_objective",
    "dense_minimizer",
    "dissociation_operator",
    "cure_operator",
    "projection_operator",
    "uce_operator",
    "uce_dense_edit",
    "build_operator",
    "check_hparams",
    "METHODS",
    "layer_gram",
    "adversarial_inputs",
    "harden",
    "rece_operator",
    "needs_gram",
]

_DTYPE = torch.float64
OverlapKind = Literal["angles", "energy", "parallel_sum", "anderson_duffin", "none"]
Objective = Literal["weighted", "frobenius"]
Metric = Literal["input", "output"]


@dataclass(frozen=True)
class ICEHyperParams:
    """Hyperparameters of ICE (defaults chosen on the MiniLM development prompts, see docs/method.md).

    Attributes:
        objective: ``"weighted"`` (default) measures the erasure fidelity in the erase energy metric and
            the preservation in the preserve energy metric,
            ``J = ||(D - P_e) P_e^1/2||^2 + lam ||D P_p^1/2||^2 + mu ||D||^2``, minimiser
            ``D* = P_e^2 (P_e + lam P_p + mu I)^-1`` (the overlap enters as the parallel-sum interaction of
            ``P_e`` and ``lam P_p``); ``"frobenius"`` is the method file's
            ``J = ||D - P_e||^2 + lam ||D P_ov||^2 + mu ||D||^2`` with an explicit overlap projector
            (``overlap``), minimiser ``D* = P_e ((1 + mu) I + lam P_ov^2)^-1``. ``docs/benchmarks.md`` shows
            why the weighted form is the default.
        erase_expansion: ``a_e`` of the expansion ``f(r; a)`` for the erase subspace; larger removes
            low-energy directions of the concept more completely (``inf`` is a hard projector). The main
            knob of the erasure/collateral trade-off.
        preserve_expansion: ``a_p`` for the preserve subspace; larger lets weak preserve directions
            count as fully preserved.
        lam: weight of the preservation term; larger spares preserved (shared) directions more.
        mu: ridge weight ``mu ||D||^2`` (``mu > 0`` makes ``J`` strongly convex).
        overlap: with ``objective="frobenius"``, how the overlap projector ``P_ov`` is built (see
            :func:`overlap_projector`):
            ``"energy"`` (default: share of preserve energy per erase direction), ``"angles"``
            (energy-weighted principal angles, the method file's generalisation), ``"parallel_sum"``
            (``P_e (P_e + P_p)^+ P_p``), ``"anderson_duffin"`` (``2 P (P + Q)^+ Q`` of the exact
            projectors) or ``"none"``.
        overlap_threshold: with ``overlap="angles"``, ``None`` weighs a shared direction by its
            squared (energy-weighted) cosine; a number in (0, 1] keeps directions whose cosine is at
            least that value with weight 1 and drops the rest.
        center: build the subspaces from states centred on the preserve mean and add the mean
            direction to the overlap (``frobenius``) or the preserve operator (``weighted``) with weight 1,
            so the component every token shares is kept (and so is that part of the concept's tokens).
        rank_tol: singular values below ``rank_tol * s_max`` are treated as zero.
        base_weight: weight ``lam_b`` of the broad preserve base (``weighted`` objective): with base states
            ``E_b`` (every token of everyday prompts), ``J`` gains ``lam_b ||D P_b^1/2||^2`` with
            ``P_b = energy_subspace(E_b, base_expansion)``, so the directions everyday tokens use are spared on
            top of the named preserve concepts. Without base states it has no effect.
        base_expansion: ``a_b`` of the base's expansion ``f(r; a_b)``; large values weigh every direction the
            base uses nearly alike (the base stands for "everything else", not for its strongest direction).
        harden_rounds: rounds of closed-form hardening (:func:`harden`; 0, the default, is plain ICE). Each
            round derives, from the edited layers themselves, the inputs that best bring the concept's original
            outputs back, and erases them too; it needs the layers' Gram matrix (``erase()`` passes it).
        harden_gamma: the ridge of the adversary's closed form, relative to the Gram matrix's largest
            eigenvalue: smaller finds shorter, more targeted inputs.
        harden_expansion: ``a_e`` of the adversarial rows' own erase subspace (they are solved as their own
            ICE erasure, with the same preserve sets, so they never dilute the concept's energy shares).
        metric: ``"input"`` measures energies, overlaps and the preserve terms on the token states themselves;
            ``"output"`` on the states as the edited layers see them, ``sum_l ||W_l x||^2`` (the solve runs on
            ``X L`` with ``L L^T = G / g + metric_ridge I``, :func:`metric_factor`, and ``D = L^-T D~ L^T``). What an
            output-metric erasure removes with eigenvalue 1 is orthogonal to every output the edited layers can
            produce, so no input of any norm brings it back; it needs the layers' Gram matrix (``erase()`` passes
            it).
        metric_ridge: the ridge of the output metric, relative to the Gram matrix's mean eigenvalue (directions
            no layer reads keep this much weight).
        harden_metric: the metric in which the hardening rounds' adversarial rows are erased (``None``: the
            erasure's own ``metric``). ``"output"`` under a token-state erasure keeps the default's erasure and
            removes what the adversary uses in the layers' own norm (``docs/method.md``, section 9).
        trigger_rounds: rounds of trigger discovery (:mod:`ice_lightning.core.triggers`; 0, the default, is off).
            Each round searches the text encoder's vocabulary for prompts that still bring the concept back through
            the edited layers and erases them as an erasure of their own, composed after the concept's. The search
            needs the text encoder, so :class:`~ice_lightning.core.plan.ErasurePlan` runs it (this solver, given
            only states, ignores the field); it reads the layers' Gram matrix.
        trigger_expansion: ``a_e`` of the found prompts' own erase subspace (solved in ``metric``, with the same
            preserve sets).
    """

    objective: Objective = "weighted"
    erase_expansion: float = 30.0
    preserve_expansion: float = 1.0
    lam: float = 10.0
    mu: float = 0.01
    overlap: OverlapKind = "energy"
    overlap_threshold: float | None = None
    center: bool = False
    rank_tol: float = 1e-6
    base_weight: float = 30.0
    base_expansion: float = 1.0
    harden_rounds: int = 0
    harden_gamma: float = 0.01
    harden_expansion: float = 3.0
    metric: Metric = "input"
    metric_ridge: float = 0.05
    harden_metric: Metric | None = None
    trigger_rounds: int = 0
    trigger_expansion: float = 3.0

    def __post_init__(self) -> None:
        if self.objective not in ("weighted", "frobenius"):
            raise ValueError(f"unknown objective {self.objective!r}; use 'weighted' or 'frobenius'")
        if not (self.erase_expansion > 0 and self.preserve_expansion > 0):
            raise ValueError("erase_expansion and preserve_expansion must be > 0 (use math.inf for a hard projector)")
        _in_range("lam", self.lam, 0.0, _MAX_WEIGHT, "the overlap weight")
        _in_range("base_weight", self.base_weight, 0.0, _MAX_WEIGHT, "the broad preserve base's weight")
        if not self.base_expansion > 0:
            raise ValueError(f"base_expansion must be > 0, got {self.base_expansion!r}")
        _in_range("mu", self.mu, 0.0, _MAX_WEIGHT, "the ridge weight; > 0 keeps J strongly convex", low_open=True)
        if self.mu < _MIN_MU:
            raise ValueError(f"mu (the ridge weight) must be at least {_MIN_MU:g}, got {self.mu!r}: below it the solve "
                             "divides by numbers float64 cannot hold")  # fmt: skip
        _in_range("rank_tol", self.rank_tol, 0.0, 1.0, "relative singular-value cut-off", low_open=True,
                  high_open=True)  # fmt: skip
        if self.overlap not in ("angles", "energy", "parallel_sum", "anderson_duffin", "none"):
            raise ValueError(
                f"unknown overlap {self.overlap!r}; use 'angles', 'parallel_sum', 'anderson_duffin' or 'none'"
            )
        if self.overlap_threshold is not None and not 0 < self.overlap_threshold <= 1:
            raise ValueError(f"overlap_threshold must lie in (0, 1], got {self.overlap_threshold}")
        _check_hardening(self.harden_rounds, self.harden_gamma)
        if not (isinstance(self.harden_expansion, (int, float)) and self.harden_expansion > 0):
            raise ValueError(f"harden_expansion must be > 0, got {self.harden_expansion!r}")
        if self.metric not in ("input", "output"):
            raise ValueError(f"unknown metric {self.metric!r}; use 'input' (token states) or 'output' (the layers' "
                             "outputs)")  # fmt: skip
        if self.harden_metric not in (None, "input", "output"):
            raise ValueError(f"unknown harden_metric {self.harden_metric!r}; use None (the erasure's own metric), "
                             "'input' or 'output'")  # fmt: skip
        _in_range("metric_ridge", self.metric_ridge, 0.0, 1.0, "the output metric's ridge, relative to the Gram's "
                  "mean eigenvalue", low_open=True)  # fmt: skip
        rounds = self.trigger_rounds
        if not (isinstance(rounds, int) and not isinstance(rounds, bool) and 0 <= rounds <= _MAX_ROUNDS):
            raise ValueError(f"trigger_rounds (rounds of trigger discovery) must be an integer in [0, {_MAX_ROUNDS}], "
                             f"got {rounds!r}; 1 is measured in docs/benchmarks.md")  # fmt: skip
        if not (isinstance(self.trigger_expansion, (int, float)) and self.trigger_expansion > 0):
            raise ValueError(f"trigger_expansion must be > 0, got {self.trigger_expansion!r}")


def _check_hardening(rounds, gamma) -> None:
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and 0 <= rounds <= _MAX_ROUNDS):
        raise ValueError(f"harden_rounds (rounds of closed-form hardening) must be an integer in [0, {_MAX_ROUNDS}], "
                         f"got {rounds!r}")
    _in_range("harden_gamma", gamma, 0.0, 1e3, "the adversary's ridge, relative to the Gram's largest eigenvalue",
              low_open=True)


#: More rounds than this only repeat the last ones' directions (each round adds one row per concept token).
_MAX_ROUNDS = 10


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


def check_hparams(method: str, hparams: dict) -> None:
    """Validate the solver hyperparameters of ``method`` before anything is computed; errors name the valid
    names or range."""
    if method == "ice":
        try:
            ICEHyperParams(**hparams)
        except TypeError as err:
            names = sorted(ICEHyperParams.__dataclass_fields__)
            raise ValueError(f"unknown ICE hyperparameter(s) in {sorted(hparams)}; choose from {names}") from err
        return
    allowed = {"cure": {"erase_expansion", "preserve_expansion", "rank_tol"},
               "projection": {"energy_kept", "rank_tol"}, "uce": {"lam", "preserve_scale"},
               "rece": {"lam", "preserve_scale", "rounds", "gamma"}}.get(method)  # fmt: skip
    if allowed is None:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(f"unknown {method} hyperparameter(s) {unknown}; choose from {sorted(allowed)}")
    for key in ("erase_expansion", "preserve_expansion"):
        if key in hparams and not (isinstance(hparams[key], (int, float)) and hparams[key] > 0):
            raise ValueError(f"{key} must be > 0 (math.inf for a hard projector), got {hparams[key]!r}")
    if "rank_tol" in hparams:
        _in_range("rank_tol", hparams["rank_tol"], 0.0, 1.0, "relative singular-value cut-off", True, True)
    if "energy_kept" in hparams:
        _in_range("energy_kept", hparams["energy_kept"], 0.0, 1.0, "share of the erase energy kept", low_open=True)
    if "lam" in hparams:
        _in_range("lam", hparams["lam"], 0.0, _MAX_WEIGHT, "UCE's ridge weight", low_open=True)
    if "preserve_scale" in hparams:
        _in_range("preserve_scale", hparams["preserve_scale"], 0.0, _MAX_WEIGHT, "UCE's preserve weight")
    if method == "rece":
        _check_hardening(hparams.get("rounds", 3), hparams.get("gamma", 0.01))


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


def compress_states(E: Tensor) -> Spectrum:
    """The rows of ``E`` (n x d) as a :class:`Spectrum`: the same Gram matrix, hence the same energy subspace."""
    _, s, Vh = torch.linalg.svd(_check_states(E, "E"), full_matrices=False)
    return Spectrum(s, Vh)


def energy_subspace(E: Tensor | Spectrum, a: float, rank_tol: float = 1e-6) -> EnergySubspace:
    """Energy-weighted subspace of the rows of ``E`` (n x d, or a :class:`Spectrum`): SVD, energy shares,
    expansion ``f(r; a)``."""
    if isinstance(E, Spectrum):
        s, Vh = E.s.to(_DTYPE), E.Vh.to(_DTYPE)
    else:
        _, s, Vh = torch.linalg.svd(_check_states(E, "E"), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        raise ValueError("the token states are all zero; nothing spans a subspace")
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
    U, s, _ = torch.linalg.svd(Rm, full_matrices=False)
    scale = float(X.norm(dim=0).max()) if X.numel() else 0.0
    return torch.cat([V, U[:, s > tol * max(scale, 1e-300)]], dim=1)


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
    """A d x d operator ``D = U M U^T`` in low-rank form, applied to a layer as ``W <- W - (W U)(M U^T)``.

    ``U`` (d x k) has orthonormal columns and ``M`` is k x k, both float64. ``method`` and ``hparams``
    record how it was made (they go into the export manifest).
    """

    U: Tensor
    M: Tensor
    method: str = "ice"
    hparams: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> Tensor:
        """The d x d matrix D (for tests and small d only)."""
        return self.U @ self.M @ self.U.T

    def factors(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """Low-rank factors ``(L, R)`` of the weight change, ``W_new = W - L @ R``, in float64."""
        if W.ndim != 2 or W.shape[1] != self.dim:
            raise ValueError(
                f"dimension mismatch: the operator acts on {self.dim}-d text states but the layer weight "
                f"has shape {tuple(W.shape)} (in_features {W.shape[-1]}); embed the prompts with the "
                "text encoder whose states this layer reads"
            )
        L = W.detach().to(self.U.device, _DTYPE) @ self.U
        return L, self.M @ self.U.T

    def apply(self, W: Tensor) -> Tensor:
        """``W (I - D)`` computed in float64 and cast back to W's dtype and device."""
        L, R = self.factors(W)
        return (W.detach().to(self.U.device, _DTYPE) - L @ R).to(W.device, W.dtype)

    def to(self, device: torch.device | str) -> DissociationOperator:
        return DissociationOperator(self.U.to(device), self.M.to(device), self.method, dict(self.hparams))


def _operator_from(spans: list[Tensor], D_apply, method: str, hparams: dict) -> DissociationOperator:
    """Build ``U, M`` from spans known to contain D's row and column spaces; ``D_apply(X) = D @ X``.
    ``spans[0]`` has orthonormal columns (it is extended, not re-decomposed)."""
    U = _extend(spans[0], torch.cat(spans[1:], dim=1)) if len(spans) > 1 else spans[0]
    M = U.T @ D_apply(U)
    return DissociationOperator(U=U, M=M, method=method, hparams=hparams)


def spectral_unlearning_objective(
    D: Tensor, P_e: Tensor, P_2: Tensor, lam: float, mu: float, objective: Objective = "frobenius"
) -> Tensor:
    """The spectral unlearning objective (dense; used to verify D*).

    ``frobenius``: ``||D - P_e||_F^2 + lam ||D P_ov||_F^2 + mu ||D||_F^2`` with ``P_2 = P_ov``;
    ``weighted``: ``tr((D - P_e) P_e (D - P_e)^T) + lam tr(D P_p D^T) + mu ||D||_F^2`` with ``P_2 = P_p``.
    """
    if objective == "weighted":
        R = D - P_e
        return (R @ P_e * R).sum() + lam * (D @ P_2 * D).sum() + mu * D.square().sum()
    return (D - P_e).square().sum() + lam * (D @ P_2).square().sum() + mu * D.square().sum()


def dense_minimizer(P_e: Tensor, P_2: Tensor, lam: float, mu: float, objective: Objective = "frobenius") -> Tensor:
    """The unique minimiser by a dense solve (reference for tests): ``frobenius``:
    ``P_e ((1 + mu) I + lam P_ov^2)^-1``; ``weighted``: ``P_e^2 (P_e + lam P_p + mu I)^-1``."""
    d = P_e.shape[0]
    eye = torch.eye(d, dtype=P_e.dtype, device=P_e.device)
    if objective == "weighted":
        S, rhs = P_e + lam * P_2 + mu * eye, P_e @ P_e
    else:
        S, rhs = (1 + mu) * eye + lam * P_2 @ P_2, P_e
    return torch.linalg.solve(S.T, rhs.T).T


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

    def apply(X: Tensor) -> Tensor:
        DX = D.U @ (D.M @ (D.U.T @ X))
        return DX - dst_T @ (src_pinv @ DX)

    hp = dict(op.hparams, anchor=True)
    return _operator_from([op.U, dst_T], apply, op.method, hp)


def _checked_inputs(E_erase: Tensor, E_preserve: Tensor, E_base: Tensor | Spectrum | None):
    """The states, checked (finite, 2-d, non-empty) and of one width; float64."""
    E_erase = _check_states(E_erase, "E_erase")
    E_preserve = _check_states(E_preserve, "E_preserve")
    if isinstance(E_base, Spectrum):  # an SVD's output: finite unless its singular values are not
        _check_states(E_base.s[:, None], "E_base")
    elif E_base is not None:
        E_base = _check_states(E_base, "E_base")
    for name, E in (("preserve", E_preserve), ("base", E_base)):
        width = None if E is None else (E.Vh if isinstance(E, Spectrum) else E).shape[1]
        if width is not None and width != E_erase.shape[1]:
            raise ValueError(f"dimension mismatch: erase states are {E_erase.shape[1]}-d, {name} states {width}-d")
    return E_erase, E_preserve, E_base


def ice_components(
    E_erase: Tensor, E_preserve: Tensor, hparams: ICEHyperParams, E_base: Tensor | Spectrum | None = None
) -> tuple[EnergySubspace, Overlap, Overlap | None]:
    """The ingredients of ``D*``: the energy-weighted erase subspace ``P_e``; by objective, the overlap projector
    ``P_ov`` (``frobenius``) or the energy-weighted preserve operator ``P_p`` (``weighted``); and the broad preserve
    base ``P_b`` (``weighted`` with base states and ``base_weight > 0``; ``None`` otherwise), all as
    ``Q diag(w) Q^T``. With the ``frobenius`` objective, base states join the preserve states."""
    hp = hparams
    E_erase, E_preserve, E_base = _checked_inputs(E_erase, E_preserve, E_base)
    if E_base is not None and hp.objective != "weighted":
        rows = E_base.rows() if isinstance(E_base, Spectrum) else E_base
        E_preserve, E_base = torch.cat([E_preserve, rows.to(_DTYPE)]), None
    mean = E_preserve.mean(0) if hp.center else None
    if mean is not None:  # subspaces of what is specific to the concept, not of the common token state
        E_erase, E_preserve = E_erase - mean, E_preserve - mean
    Pe = energy_subspace(E_erase, hp.erase_expansion, hp.rank_tol)
    Pp = energy_subspace(E_preserve, hp.preserve_expansion, hp.rank_tol)
    if hp.objective == "weighted":
        second = Overlap(basis=Pp.basis, weights=Pp.weights)
    else:
        second = overlap_projector(Pe, Pp, hp.overlap, hp.overlap_threshold, E_erase, E_preserve)
    if mean is not None:  # every token shares the mean direction: it is kept with weight 1
        second = _add_direction(second, mean)
    base = None
    if E_base is not None and hp.base_weight > 0:
        Pb = energy_subspace(E_base, hp.base_expansion, hp.rank_tol)
        base = Overlap(basis=Pb.basis, weights=Pb.weights)
    return Pe, second, base


def dissociation_operator(
    E_erase: Tensor,
    E_preserve: Tensor,
    hparams: ICEHyperParams | None = None,
    anchor: tuple[Tensor, Tensor] | None = None,
    concepts: int = 1,
    E_base: Tensor | Spectrum | None = None,
    gram: Tensor | None = None,
    **overrides,
) -> DissociationOperator:
    """ICE's dissociation operator, the unique minimiser of the spectral unlearning objective, in low-rank form.

    Args:
        E_erase: (n_e, d) token states of the concept(s) to erase.
        E_preserve: (n_p, d) token states to preserve.
        hparams: an :class:`ICEHyperParams`; keyword ``overrides`` replace single fields
            (``dissociation_operator(E, P, lam=5.0)``).
        anchor: optional pair ``(E_src, E_dst)`` of (m, d) paired states; the removed component of
            ``E_src`` is replaced by ``E_dst``'s (UCE-style guide concept).
        concepts: how many concepts ``E_erase`` holds. Energy shares are taken over all erase tokens, so
            with k concepts each one's directions carry about 1/k of the energy; ``erase_expansion`` is meant
            per concept and is applied as ``k * erase_expansion``.
        E_base: (n_b, d) states of the broad preserve base (every token of everyday prompts), weighted by
            ``base_weight``: ``S`` below gains ``lam_b P_b``.
        gram: with ``harden_rounds > 0`` or ``metric="output"``, :func:`layer_gram` of the layers the operator will
            edit; the operator is then solved in the layers' metric and/or hardened (:func:`harden`), its adversarial
            rows solved as their own ICE erasure with ``erase_expansion = harden_expansion`` and the same preserve
            sets.

    ``weighted`` (default): ``D* = P_e^2 S^-1`` with ``S = P_e + lam P_p + lam_b P_b + mu I``. ``B = lam_b P_b +
    mu I`` is diagonal in the base's own basis and ``P_e + lam P_p = A A^T`` is low rank, so ``S^-1`` applied to
    ``V_e`` is a Woodbury update of ``B^-1``: one m x m solve (m <= rank P_e + rank P_p), no d x d matrix even
    when the base spans every direction.
    ``frobenius``: ``D* = P_e ((1 + mu) I + lam P_ov^2)^-1`` with ``P_ov = Q diag(g) Q^T``; the inverse is a
    Woodbury update ``(I - Q diag(h) Q^T) / (1 + mu)``, ``h = lam g^2 / (1 + mu + lam g^2)``.
    In both, ``D*``'s row space is ``span(S^-1 V_e)`` (S symmetric): at most 2 rank(P_e) directions.
    """
    if not (isinstance(concepts, int) and concepts >= 1):
        raise ValueError(f"concepts must be a positive integer, got {concepts!r}")
    hp = _merge(hparams, overrides)
    if hp.metric == "output":
        return _in_output_metric(E_erase, E_preserve, hp, anchor, concepts, E_base, gram)
    if concepts > 1:
        hp = _merge(hp, {"erase_expansion": hp.erase_expansion * concepts})
    Pe, second, base = ice_components(E_erase, E_preserve, hp, E_base)
    V, f, Q, w = Pe.basis, Pe.weights, second.basis, second.weights

    if hp.objective == "weighted":
        # S = B + A A^T with B = mu I + lam_b P_b (diagonal in the base's basis: inverted in closed form, so a
        # base spanning all d directions costs no d x d solve) and A = [V f^1/2, Q (lam w)^1/2]; Woodbury:
        # S^-1 X = B^-1 X - B^-1 A (I + A^T B^-1 A)^-1 A^T B^-1 X, an m x m solve (m = rank P_e + rank P_p).
        if base is None:
            Qb, g = V[:, :0], f[:0]
        else:
            Qb, g = base.basis, hp.base_weight * base.weights

        def B_inv(X: Tensor) -> Tensor:
            return X / hp.mu + Qb @ ((1.0 / (g + hp.mu) - 1.0 / hp.mu)[:, None] * (Qb.T @ X))

        A = torch.cat([V * f.sqrt(), Q * (hp.lam * w).sqrt()], dim=1)
        BA = B_inv(A)
        K = torch.eye(A.shape[1], dtype=A.dtype) + A.T @ BA
        BV = B_inv(V)
        row_space = BV - BA @ torch.linalg.solve((K + K.T) / 2, A.T @ BV)  # S^-1 V

        def apply(X: Tensor) -> Tensor:  # D* X = V f^2 V^T S^-1 X = V f^2 (S^-1 V)^T X  (S symmetric)
            return V @ (f.square()[:, None] * (row_space.T @ X))

    else:
        h = hp.lam * w.square() / (1 + hp.mu + hp.lam * w.square())

        def apply(X: Tensor) -> Tensor:  # D* X = P_e (X - Q diag(h) Q^T X) / (1 + mu)
            Y = X - Q @ (h[:, None] * (Q.T @ X))
            return V @ (f[:, None] * (V.T @ Y)) / (1 + hp.mu)

        row_space = Q @ (h[:, None] * (Q.T @ V))
    op = _with_anchor(_operator_from([V, row_space], apply, "ice", {**_asdict(hp), "concepts": concepts}), anchor)
    return _hardened(op, E_erase, E_preserve, hp, concepts, E_base, gram)


def _check_gram(gram: Tensor | None, d: int, missing: str) -> None:
    """Refuse a missing Gram matrix (``missing`` says why it is needed) or one of another width than the states."""
    if gram is None:
        raise ValueError(missing)
    if gram.shape != (d, d):
        raise ValueError(f"dimension mismatch: the Gram matrix is {tuple(gram.shape)}, the states are {d}-d")


def _hardened(op: DissociationOperator, E_erase: Tensor, E_preserve: Tensor, hp: ICEHyperParams, concepts: int,
              E_base, gram: Tensor | None) -> DissociationOperator:  # fmt: skip
    """``op`` after ``hp.harden_rounds`` rounds of :func:`harden`, each round's adversarial rows solved as their own
    ICE erasure with ``erase_expansion = harden_expansion``, in ``harden_metric`` (default: the erasure's own), with
    the same preserve sets."""
    if hp.harden_rounds == 0:
        return op
    _check_gram(gram, op.dim, "harden_rounds > 0 reads the edited layers: pass gram=layer_gram(weights)")
    plain = {"harden_rounds": 0, "erase_expansion": hp.harden_expansion, "metric": hp.harden_metric or hp.metric}

    def solve_adversary(rows: Tensor) -> DissociationOperator:
        return dissociation_operator(rows, E_preserve, hp, concepts=concepts, E_base=E_base, gram=gram, **plain)

    return harden(op, E_erase, gram, solve_adversary, hp.harden_rounds, hp.harden_gamma)


def metric_factor(gram: Tensor, ridge: float) -> Tensor:
    """The lower Cholesky factor ``L`` of ``G_r = G / g + ridge I`` (``g = trace(G) / d``, the mean eigenvalue):
    ``sum_l ||W_l x||^2 = g ||L^T x||^2`` up to the ridge, so states mapped by ``L^T`` (rows: ``X L``) are measured
    as the layers see them. Any square root of ``G_r`` would do: ICE's solve is equivariant under orthogonal
    changes of coordinates, and ``L^T`` is the symmetric root times an orthogonal matrix (a Cholesky of d = 4096
    takes about a second where an eigendecomposition takes half a minute)."""
    G = gram.to(_DTYPE)
    d = G.shape[0]
    scale = float(torch.diagonal(G).sum()) / d
    G_r = (G + G.T) / (2 * scale if scale > 0 else 2.0) + ridge * torch.eye(d, dtype=_DTYPE)
    return torch.linalg.cholesky(G_r)


def _in_output_metric(E_erase, E_preserve, hp: ICEHyperParams, anchor, concepts, E_base, gram) -> DissociationOperator:
    """ICE solved on the states as the edited layers see them (``metric="output"``): with ``L`` from
    :func:`metric_factor`, ``D = L^-T D~ L^T`` where ``D~`` is ICE's operator for the states ``X L``. Every energy
    share, overlap and preserve weight is then measured in ``sum_l ||W_l x||^2``, and the layers' outputs of the
    edited input, ``W (I - D) x``, are orthogonal (over all layers) to what ``D~`` removed whenever ``D~`` is a
    projector there: no input of any norm brings that part back (``docs/method.md``, section 9)."""
    E_erase, E_preserve, E_base = _checked_inputs(E_erase, E_preserve, E_base)
    _check_gram(gram, E_erase.shape[-1], "metric='output' reads the edited layers: pass gram=layer_gram(weights), "
                "or metric='input' to measure the token states themselves")  # fmt: skip
    L = metric_factor(gram, hp.metric_ridge)

    def mapped(E):  # rows x^T -> (L^T x)^T = x^T L
        if E is None:
            return None
        if isinstance(E, Spectrum):
            return compress_states(E.rows().to(_DTYPE) @ L)
        return E.to(_DTYPE) @ L

    inner = _merge(hp, {"metric": "input", "harden_rounds": 0})
    anchor_t = None if anchor is None else (mapped(anchor[0]), mapped(anchor[1]))
    tilde = dissociation_operator(mapped(E_erase), mapped(E_preserve), inner, anchor=anchor_t, concepts=concepts,
                                  E_base=mapped(E_base))  # fmt: skip

    def back(Y: Tensor) -> Tensor:  # L^-T Y
        return torch.linalg.solve_triangular(L.T, Y, upper=True)

    def apply(X: Tensor) -> Tensor:  # D X = L^-T D~ L^T X
        return back(tilde.U @ (tilde.M @ (tilde.U.T @ (L.T @ X))))

    hparams = {**_asdict(hp), "concepts": concepts, **({"anchor": True} if anchor is not None else {})}
    op = _operator_from([_orth(back(tilde.U)), L @ tilde.U], apply, "ice", hparams)
    return _hardened(op, E_erase, E_preserve, hp, concepts, E_base, gram)


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


def _asdict(hp: ICEHyperParams) -> dict:
    return {k: getattr(hp, k) for k in hp.__dataclass_fields__}


def _merge(hparams: ICEHyperParams | None, overrides: dict) -> ICEHyperParams:
    base = _asdict(hparams or ICEHyperParams())
    unknown = set(overrides) - set(base)
    if unknown:
        raise TypeError(f"unknown ICE hyperparameter(s) {sorted(unknown)}; valid: {sorted(base)}")
    return ICEHyperParams(**{**base, **overrides})


def layer_gram(weights: list[Tensor]) -> Tensor:
    """``G = sum_l W_l^T W_l`` (float64) of the layers that read one space: the output-side metric of the
    hardening (every adversary below needs only ``G``, since ``W'^T W' = (I - D)^T G (I - D)`` and
    ``W'^T W = (I - D)^T G`` for ``W' = W (I - D)``). For row-sharded weights, the sum over every rank's rows."""
    if not weights:
        raise ValueError("no layer weights: the Gram matrix of an empty set of layers is undefined")
    G = sum(W.detach().to(_DTYPE).T @ W.detach().to(_DTYPE) for W in weights)
    return (G + G.T) / 2


def adversarial_inputs(op: DissociationOperator, gram: Tensor, C: Tensor, gamma: float = 0.01,
                       gram_norm: float | None = None) -> Tensor:  # fmt: skip
    """The defence's adversary (RECE's closed form, Gong et al. 2024): per row ``c`` of ``C`` (n x d), the input
    ``x = (A^T G A + g I)^-1 A^T G c`` with ``A = I - D`` that best restores the concept's original outputs
    ``W_l c`` through every edited layer ``W_l A`` at once, ``g = gamma * lambda_max(G)`` (a fixed ridge; the
    red-team benchmark's attack instead bisects a norm budget per row, so the two are different objectives).

    ``A^T G A = G - D^T G - G D + D^T G D`` is formed from ``D = U M U^T`` in ``O(d^2 k)``; one Cholesky solve
    of d x d follows. ``gram_norm`` is ``lambda_max(G)`` when the caller already has it (rounds reuse it)."""
    G = gram.to(_DTYPE)
    C = C.to(_DTYPE)
    d = G.shape[0]
    GU = G @ op.U
    Dt = op.U @ op.M.T  # D^T = U M^T U^T, kept as (U M^T) U^T
    GD = GU @ op.M @ op.U.T
    H = G - GD - GD.T + Dt @ ((op.U.T @ GU) @ op.M @ op.U.T)
    R = (C @ G) - (C @ GU) @ op.M @ op.U.T  # rows c^T G A
    scale = (gram_norm if gram_norm is not None else _largest_eigenvalue(G)) or 1.0
    H = (H + H.T) / 2 + gamma * scale * torch.eye(d, dtype=_DTYPE)
    L = torch.linalg.cholesky(H)
    return torch.cholesky_solve(R.T, L).T


def _largest_eigenvalue(G: Tensor) -> float:
    return float(torch.linalg.eigvalsh(G.to(_DTYPE))[-1])


def _composed(first: DissociationOperator, second: DissociationOperator, method: str,
              hparams: dict) -> DissociationOperator:  # fmt: skip
    """``I - D = (I - D_first)(I - D_second)``: ``D = D_second + D_first (I - D_second)``, in span(U_1, U_2)."""

    def apply(X: Tensor) -> Tensor:
        Y = second.U @ (second.M @ (second.U.T @ X))
        Z = X - Y
        return Y + first.U @ (first.M @ (first.U.T @ Z))

    return _operator_from([first.U, second.U], apply, method, hparams)


def harden(op: DissociationOperator, E_erase: Tensor, gram: Tensor, solve_adversary, rounds: int,
           gamma: float = 0.01) -> DissociationOperator:  # fmt: skip
    """Closed-form hardening: ``rounds`` times, derive the adversarial inputs of every erase token against the
    current edit (:func:`adversarial_inputs`), rescale each to its concept token's norm (so that the
    adversarial rows carry the energy of the tokens they stand for), and erase all rows found so far with
    ``solve_adversary(rows)`` (an operator of its own), composed after ``op``:
    ``I - D_h = (I - D)(I - D_adv)``.

    The composition, not new rows inside ``op``'s own solve, is the point: adversarial rows appended to the
    erase states dilute the concept's energy shares and erase *less* (``docs/method.md``, hardening)."""
    if rounds == 0:
        return op
    E = E_erase.to(_DTYPE)
    norms = E.norm(dim=-1, keepdim=True)
    found, current, top = E[:0], op, _largest_eigenvalue(gram)
    for _ in range(rounds):
        x = adversarial_inputs(current, gram, E, gamma, top)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300) * norms
        found = torch.cat([found, x])
        current = _composed(op, solve_adversary(found), op.method, op.hparams)
    return current


def rece_operator(E_erase: Tensor, E_preserve: Tensor, gram: Tensor, lam: float = 1.0,
                  preserve_scale: float = 1.0, E_guide: Tensor | None = None, rounds: int = 3,
                  gamma: float = 0.01) -> DissociationOperator:  # fmt: skip
    """RECE (Gong et al., ECCV 2024) on top of UCE: start from UCE's closed form, then ``rounds`` times derive the
    adversarial embeddings of the concept against the current edit (its closed form with the regulariser
    ``gamma``, :func:`adversarial_inputs`) and solve UCE again with them added to the erased rows, each mapped
    to the harmless guide (the anchor's states, or nothing: output zero) while the preserve rows are kept."""
    Ce = _check_states(E_erase, "E_erase")
    guide = None if E_guide is None else _check_states(E_guide, "E_guide")
    op = uce_operator(Ce, E_preserve, lam=lam, preserve_scale=preserve_scale, E_guide=guide)
    rows, guides, top = Ce, guide, _largest_eigenvalue(gram) if rounds else None
    for _ in range(rounds):
        x = adversarial_inputs(op, gram, Ce, gamma, top)
        rows = torch.cat([rows, x])
        if guides is not None:
            guides = torch.cat([guides, guide])
        op = uce_operator(rows, E_preserve, lam=lam, preserve_scale=preserve_scale, E_guide=guides)
    hp = {"lam": lam, "preserve_scale": preserve_scale, "guide": E_guide is not None, "rounds": rounds,
          "gamma": gamma}  # fmt: skip
    return DissociationOperator(U=op.U, M=op.M, method="rece", hparams=hp)


METHODS = ("ice", "cure", "uce", "projection", "rece")

#: Methods whose solve reads the edited layers' Gram matrix (ICE only when hardened).
NEEDS_GRAM = ("rece",)


def needs_gram(method: str, hparams: dict) -> bool:
    """Whether ``build_operator(method, ...)`` needs ``gram=``: RECE always, ICE in the output metric or with
    ``harden_rounds > 0`` (and the plan's trigger search, ``trigger_rounds > 0``)."""
    if method != "ice":
        return method in NEEDS_GRAM
    hp = ICEHyperParams(**hparams)
    return hp.harden_rounds > 0 or hp.metric == "output" or hp.trigger_rounds > 0


def build_operator(
    method: str,
    E_erase: Tensor,
    E_preserve: Tensor,
    anchor: tuple[Tensor, Tensor] | None = None,
    concepts: int = 1,
    E_base: Tensor | Spectrum | None = None,
    gram: Tensor | None = None,
    **hparams,
) -> DissociationOperator:
    """Dispatch to one of :data:`METHODS` with the same inputs (used by ``erase`` and the benchmarks);
    ``concepts`` (the number of erased concepts) and ``E_base`` (the broad preserve base) are used by ICE only;
    ``gram`` (:func:`layer_gram` of the layers that read this space) by RECE and hardened ICE."""
    if needs_gram(method, hparams) and gram is None:
        raise ValueError(f"{method!r} with these hyperparameters reads the edited layers: "
                         "pass gram=layer_gram(weights)")
    if method == "ice":
        return dissociation_operator(E_erase, E_preserve, anchor=anchor, concepts=concepts, E_base=E_base,
                                     gram=gram, **hparams)  # fmt: skip
    if method == "rece":
        guide = None if anchor is None else anchor[1]
        return rece_operator(E_erase if anchor is None else anchor[0], E_preserve, gram, E_guide=guide, **hparams)
    if method == "cure":
        return cure_operator(E_erase, E_preserve, anchor=anchor, **hparams)
    if method == "projection":
        return projection_operator(E_erase, E_preserve, anchor=anchor, **hparams)
    if method == "uce":
        guide = None if anchor is None else anchor[1]
        if anchor is not None:  # UCE pairs each erase state with a guide; use the paired sources as C_e
            E_erase = anchor[0]
        return uce_operator(E_erase, E_preserve, E_guide=guide, **hparams)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
