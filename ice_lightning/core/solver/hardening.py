"""Closed-form hardening, shared by ICE and RECE: the layers' Gram matrix, the adversary that best brings the
concept's original outputs back through the edited layers (RECE's closed form), and the rounds that erase what it
finds (``docs/method.md``, section 9)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .spectral import _DTYPE, DissociationOperator, Spectrum, _composed, _in_range, compress_states

__all__ = ["layer_gram", "adversarial_inputs", "harden", "metric_factor", "metric_sides", "output_change",
           "output_erasure", "within_budget"]

#: More rounds than this only repeat the last ones' directions (each round adds one row per concept token).
_MAX_ROUNDS = 10


def _check_hardening(rounds, gamma, auto: bool = False) -> None:
    """``auto``: ``rounds=None`` (ICE's default, one round where the layers are known) is allowed."""
    if auto and rounds is None:
        pass
    elif not (isinstance(rounds, int) and not isinstance(rounds, bool) and 0 <= rounds <= _MAX_ROUNDS):
        where = " or None (one round where the layers are known)" if auto else ""
        raise ValueError(f"harden_rounds (rounds of closed-form hardening) must be an integer in [0, {_MAX_ROUNDS}]"
                         f"{where}, got {rounds!r}")
    _in_range("harden_gamma", gamma, 0.0, 1e3, "the adversary's ridge, relative to the Gram's largest eigenvalue",
              low_open=True)



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

    ``A^T G A = G - D^T G - G D + D^T G D`` is formed from ``D = U M V^T`` in ``O(d^2 k)``; one Cholesky solve
    of d x d follows. ``gram_norm`` is ``lambda_max(G)`` when the caller already has it (rounds reuse it)."""
    G = gram.to(_DTYPE)
    C = C.to(_DTYPE)
    d = G.shape[0]
    U, M, V = op.U, op.M, op.right_basis  # D = U M V^T (V = U in the symmetric form)
    GU = G @ U
    Dt = V @ M.T  # D^T = V M^T U^T, kept as (V M^T) U^T
    GD = GU @ M @ V.T
    H = G - GD - GD.T + Dt @ ((U.T @ GU) @ M @ V.T)
    R = (C @ G) - (C @ GU) @ M @ V.T  # rows c^T G A
    scale = (gram_norm if gram_norm is not None else _largest_eigenvalue(G)) or 1.0
    H = (H + H.T) / 2 + gamma * scale * torch.eye(d, dtype=_DTYPE)
    L = torch.linalg.cholesky(H)
    return torch.cholesky_solve(R.T, L).T


def _largest_eigenvalue(G: Tensor) -> float:
    return float(torch.linalg.eigvalsh(G.to(_DTYPE))[-1])


def harden(op: DissociationOperator, E_erase: Tensor, gram: Tensor, solve_adversary, rounds: int,
           gamma: float = 0.01, gram_norm: float | None = None) -> DissociationOperator:  # fmt: skip
    """Closed-form hardening: ``rounds`` times, derive the adversarial inputs of every erase token against the
    current edit (:func:`adversarial_inputs`), rescale each to its concept token's norm (so that the
    adversarial rows carry the energy of the tokens they stand for), and erase all rows found so far with
    ``solve_adversary(rows)`` (an operator of its own), composed after ``op``:
    ``I - D_h = (I - D)(I - D_adv)``.

    The composition, not new rows inside ``op``'s own solve, is the point: adversarial rows appended to the
    erase states dilute the concept's energy shares and erase *less* (``docs/method.md``, hardening). ``gram_norm``:
    ``lambda_max(G)``, where the caller already has it."""
    if rounds == 0:
        return op
    E = E_erase.to(_DTYPE)
    norms = E.norm(dim=-1, keepdim=True)
    found, current = E[:0], op
    top = gram_norm if gram_norm is not None else _largest_eigenvalue(gram)
    for _ in range(rounds):
        x = adversarial_inputs(current, gram, E, gamma, top)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300) * norms
        found = torch.cat([found, x])
        current = _composed(op, solve_adversary(found), op.method, op.hparams)
    return current


#: The expansions ``within_budget`` searches (log scale) and its bisection steps.
_BUDGET_RANGE, _BUDGET_STEPS = (1e-2, 1e2), 8


def _output_terms(Y: Tensor, basis: Tensor, G: Tensor) -> Tensor:
    """Terms whose column sums are ``y^T G y = sum_l ||W_l y||^2`` for each column ``y`` of ``Y``, which must lie in
    ``span(basis)``: worked out in an orthonormal basis ``Q`` of that span, ``(Q^T G Q) c * c`` with ``c = Q^T Y``, so
    it costs ``d^2 m`` for m basis columns instead of ``d^2 n`` for n columns of ``Y``."""
    Q = torch.linalg.qr(basis).Q
    coef = Q.T @ Y
    return (Q.T @ G @ Q) @ coef * coef


def output_change(old: DissociationOperator, X: Tensor, gram: Tensor):
    """``new -> sqrt(sum_l ||W_l (D_new - D_old) x||^2 / sum_l ||W_l x||^2)`` over the rows ``x`` of ``X``
    (``gram = sum W^T W``): how much replacing ``old`` by ``new`` changes the layers' outputs of ``X``, relative.
    The denominator is formed once; each call works in both operators' column spaces (``D X`` lies there)."""
    X = X.to(_DTYPE).T
    G = gram.to(_DTYPE)
    total = float((X * (G @ X)).sum())
    before = old.times(X)

    def change(new: DissociationOperator) -> float:
        if total <= 0:
            return 0.0
        terms = _output_terms(new.times(X) - before, torch.cat([new.U, old.U], dim=1), G)
        return max(float(terms.sum()), 0.0) ** 0.5 / total**0.5

    return change


def output_erasure(X: Tensor, gram: Tensor):
    """``op -> mean over the rows x of X of sqrt(sum_l ||W_l D x||^2 / sum_l ||W_l x||^2)``: how much of each row's
    outputs the edit ``W (I - D)`` removes, through every layer that reads the space (``gram = sum W^T W``); 1 where
    they are removed, above 1 where they are pushed past zero. On the concept's own erase rows it tracks the erasure
    measured on held-out prompts (``docs/method.md``, section 9). The denominators are formed once; each call works in
    the operator's column space (``D X`` lies there)."""
    X = X.to(_DTYPE).T
    G = gram.to(_DTYPE)
    norms = (X * (G @ X)).sum(0)
    kept = norms > 0

    def erasure(op: DissociationOperator) -> float:
        if not bool(kept.any()):
            return 0.0
        removed = _output_terms(op.times(X[:, kept]), op.U, G).sum(0).clamp_min(0.0)
        return float((removed / norms[kept]).sqrt().mean())

    return erasure


def within_budget(hardened, op: DissociationOperator, E_preserve: Tensor, gram: Tensor, budget: float,
                  ceiling: tuple[Tensor, float] | None = None) -> DissociationOperator:  # fmt: skip
    """``hardened(expansion)`` at the largest erase expansion of the adversarial rows (searched on a log scale over
    ``_BUDGET_RANGE``) whose change of the preserve states' outputs against ``op`` (:func:`output_change`) stays within
    ``budget``; the expansion chosen is recorded in the operator's ``hparams``. A concept whose adversarial inputs
    lie along its neighbours' directions is hardened less, one whose inputs are its own more. Where even the weakest
    hardening spends more than the budget, ``op`` itself, recorded as ``harden_rounds=0`` (no round was applied: the
    manifest says so, and the recorded hyperparameters solve the same operator again).

    ``ceiling=(E_erase, c)`` also keeps the hardened operator's :func:`output_erasure` of the concept's own rows at
    most ``c``: a concept whose adversary lies along its own directions would otherwise be pushed past its own
    outputs, spending the budget where nothing is left to erase."""
    change = output_change(op, E_preserve, gram)
    over = None if ceiling is None else output_erasure(ceiling[0], gram)

    def spent(log_a: float) -> tuple[float, DissociationOperator]:
        cand = hardened(math.exp(log_a))
        if over is not None and over(cand) > ceiling[1]:
            return math.inf, cand
        return change(cand), cand

    lo, hi = (math.log(a) for a in _BUDGET_RANGE)
    cost, best = spent(lo)
    if cost > budget:
        op.hparams = {**op.hparams, "harden_rounds": 0}
        return op
    cost, top = spent(hi)
    if cost <= budget:
        lo, best = hi, top
    else:
        for _ in range(_BUDGET_STEPS):
            mid = (lo + hi) / 2
            cost, cand = spent(mid)
            lo, hi, best = (mid, hi, cand) if cost <= budget else (lo, mid, best)
    best.hparams = {**best.hparams, "harden_expansion": math.exp(lo)}
    return best


def _check_gram(gram: Tensor | None, d: int, missing: str) -> None:
    """Refuse a missing Gram matrix (``missing`` says why it is needed) or one of another width than the states."""
    if gram is None:
        raise ValueError(missing)
    if gram.shape != (d, d):
        raise ValueError(f"dimension mismatch: the Gram matrix is {tuple(gram.shape)}, the states are {d}-d")


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


def metric_sides(E_preserve, E_base, gram: Tensor, ridge: float, as_spectra: bool = False) -> tuple[Tensor, ...]:
    """``L`` of :func:`metric_factor` and the preserve and base states mapped by it (rows ``X L``; a base
    :class:`Spectrum` compressed to at most d rows): the parts of an output-metric solve that do not depend on the
    erase rows, so that the hardening's adversary solves (about ten under a budget) share them. ``as_spectra``: both
    mapped sets as :class:`Spectrum` (decomposed here once), for a solve that reads only their Gram matrices."""
    L = metric_factor(gram, ridge)

    def mapped(E, compress: bool):
        if E is None:
            return None
        E = (E.rows() if isinstance(E, Spectrum) else E).to(_DTYPE) @ L
        return compress_states(E) if compress else E

    return L, mapped(E_preserve, as_spectra), mapped(E_base, as_spectra or isinstance(E_base, Spectrum))
