"""Closed-form hardening, shared by ICE and RECE: the layers' Gram matrix, the adversary that best brings the
concept's original outputs back through the edited layers (RECE's closed form), and the rounds that erase what it
finds (``docs/method.md``, section 9)."""

from __future__ import annotations

import torch
from torch import Tensor

from .spectral import _DTYPE, DissociationOperator, _composed, _in_range

__all__ = ["layer_gram", "adversarial_inputs", "harden", "metric_factor"]

#: More rounds than this only repeat the last ones' directions (each round adds one row per concept token).
_MAX_ROUNDS = 10


def _check_hardening(rounds, gamma) -> None:
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and 0 <= rounds <= _MAX_ROUNDS):
        raise ValueError(f"harden_rounds (rounds of closed-form hardening) must be an integer in [0, {_MAX_ROUNDS}], "
                         f"got {rounds!r}")
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
