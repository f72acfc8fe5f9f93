"""ICE's dissociation operator: the closed-form minimiser of the spectral unlearning objective, in the token
states' metric or the edited layers' output metric, optionally hardened (``docs/method.md`` derives it).

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

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .hardening import (
    _MAX_ROUNDS,
    _check_gram,
    _check_hardening,
    _largest_eigenvalue,
    harden,
    metric_sides,
    output_erasure,
    within_budget,
)
from .spectral import (
    _DTYPE,
    _MAX_WEIGHT,
    _MIN_MU,
    DissociationOperator,
    EnergySubspace,
    Overlap,
    OverlapKind,
    Spectrum,
    _add_direction,
    _checked_inputs,
    _in_range,
    _operator_from,
    _orth,
    _with_anchor,
    compress_states,
    energy_subspace,
    overlap_projector,
    with_hard_core,
)
from .two_sided import two_sided_applies, two_sided_weighted

__all__ = [
    "ICEHyperParams",
    "ice_components",
    "dissociation_operator",
    "spectral_unlearning_objective",
    "dense_minimizer",
]

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
        harden_rounds: rounds of closed-form hardening (:func:`harden`; 0 is plain ICE). Each round derives, from
            the edited layers themselves, the inputs that best bring the concept's original outputs back, and erases
            them too; it needs the layers' Gram matrix (``erase()``, the callback and the CLI pass it). ``None`` (the
            default): one round wherever the Gram matrix is given, none for states alone; the operator's ``hparams``
            record the rounds applied.
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
            erasure's own ``metric``). ``"output"`` (default) under a token-state erasure keeps the concept's erasure
            and removes what the adversary uses in the layers' own norm (``docs/method.md``, section 9).
        harden_budget: a number ``b`` in (0, 1] (default 0.003) chooses, per erasure, the strongest
            ``harden_expansion`` whose hardening changes the preserve states' outputs by at most ``b`` (relative, over
            every layer: :func:`within_budget`), so that each concept is hardened as far as its own neighbours allow;
            ``None`` hardens with ``harden_expansion``.
        trigger_rounds: rounds of trigger discovery (:mod:`ice_lightning.core.triggers`; 0, the default, is off).
            Each round searches the text encoder's vocabulary for prompts that still bring the concept back through
            the edited layers and erases them as an erasure of their own, composed after the concept's. The search
            needs the text encoder, so :class:`~ice_lightning.core.plan.ErasurePlan` runs it (this solver, given
            only states, ignores the field); it reads the layers' Gram matrix.
        trigger_expansion: ``a_e`` of the found prompts' own erase subspace (solved in ``metric``, with the same
            preserve sets).
        context_expansion: ``a_e`` of the concept's imprint on the template's other tokens (their shift against the
            preserve concepts in the same template, summed over the prompt: :mod:`ice_lightning.core.context`), erased
            as an erasure of its own in ``metric``, applied to what the concept's erasure (and its hardening) leaves; 0
            leaves the context.
            The rows need the text encoder, so :class:`~ice_lightning.core.plan.ErasurePlan` builds them (this solver
            ignores the field).
        anchor_context: with an anchor (the spec's guide concept), map not only the concept's own tokens onto the
            anchor's but every context token of each training prompt onto the same token of the anchor's prompt
            (matched by position before and after the concept): the map aims at what the whole anchor prompt reads
            like to the layers. The pairs need the text encoder, so :class:`~ice_lightning.core.plan.ErasurePlan`
            builds them (this solver, given pairs, uses whatever it is given). ``docs/benchmarks.md``, section 4: on
            the shapes video model the image-level attack at budget 0.1 restored the erased direction in 6 of 16
            clips instead of 12 (two seeds); elsewhere it changes little. ``False`` (default): the concept's tokens
            alone.
        erase_floor: with hardening (``harden_rounds`` > 0, or the default's wherever the layers are known), a number
            ``f`` makes ``erase_expansion`` the top of a ladder: the hardened operator is solved at ``erase_expansion``
            x 1/30, 1/10, 1/3 and 1 in turn, and the first whose erasure of the concept's own training states
            (:func:`~ice_lightning.core.solver.hardening.output_erasure`, through every layer that reads the space)
            reaches ``f`` is kept (the last where none does). A concept that the hardening already erases firmly keeps a
            soft erasure of its own, so its collateral stays low; one it does not, a firm one. ``None`` (default), or
            no hardening, solves at ``erase_expansion``. ``docs/method.md``, section 9: with a larger budget it lowers
            every text-space attack at the same collateral, but on the trained shapes model the softer erasure gives
            the image-level attack back. The operator's ``hparams`` record the rung's ``erase_expansion`` and no
            floor: they solve the same operator again.
        harden_ceiling: with ``harden_budget``, the most the hardening may raise that same erasure of the concept's
            training states (``None``, the default: no limit): the budget's search also keeps it at most this, so a
            concept whose adversary lies along its own directions is not pushed past its own outputs, spending the
            budget where nothing is left to erase. Without a budget it has no effect.
        hard_core: a number ``t`` in (0, 1) raises every eigenvalue of the concept's own operator above ``t`` to 1
            (:func:`~ice_lightning.core.solver.spectral.with_hard_core`), before its anchor, its hardening and its
            context erasure: the concept's dominant directions, where the preserve overlap is small, are erased
            exactly and nothing is left along them for an input to amplify. It is the least change of ``J`` that
            erases those eigenvectors exactly. ``None`` (default) keeps the spectrum. ``docs/method.md``, section 9:
            at 0.5 on the shapes image model the image-level attack at budget 0.1 restores circle in 6 % of samples
            instead of 38 %, but on the development set it costs near collateral (+0.025) for little.
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
    harden_rounds: int | None = None
    harden_gamma: float = 0.01
    harden_expansion: float = 3.0
    metric: Metric = "input"
    metric_ridge: float = 0.05
    harden_metric: Metric | None = "output"
    harden_budget: float | None = 0.003
    trigger_rounds: int = 0
    trigger_expansion: float = 3.0
    context_expansion: float = 2.0
    anchor_context: bool = False
    erase_floor: float | None = None
    harden_ceiling: float | None = None
    hard_core: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.anchor_context, bool):
            raise ValueError(f"anchor_context must be True or False, got {self.anchor_context!r}")
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
        _check_hardening(self.harden_rounds, self.harden_gamma, auto=True)
        if not (isinstance(self.harden_expansion, (int, float)) and self.harden_expansion > 0):
            raise ValueError(f"harden_expansion must be > 0, got {self.harden_expansion!r}")
        if self.harden_budget is not None:
            _in_range("harden_budget", self.harden_budget, 0.0, 1.0, "the most the hardening may change the preserve "
                      "states' outputs, relative", low_open=True)  # fmt: skip
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
        if not (isinstance(self.context_expansion, (int, float)) and self.context_expansion >= 0):
            raise ValueError(f"context_expansion must be >= 0 (0 leaves the context tokens), got "
                             f"{self.context_expansion!r}")  # fmt: skip
        if self.erase_floor is not None:
            _in_range("erase_floor", self.erase_floor, 0.0, 2.0, "the least erasure of the concept's training states, "
                      "relative; 0.8 is measured in docs/method.md", low_open=True)  # fmt: skip
        if self.harden_ceiling is not None:
            _in_range("harden_ceiling", self.harden_ceiling, 0.0, 10.0, "the most the hardening may raise the "
                      "erasure of the concept's training states, relative; 1.0 and 1.1 are measured in docs/method.md",
                      low_open=True)  # fmt: skip
        if self.hard_core is not None:
            _in_range("hard_core", self.hard_core, 0.0, 1.0, "the eigenvalue of the concept's operator above which it "
                      "is set to 1; 0.5 is measured in docs/method.md", low_open=True, high_open=True)  # fmt: skip

    @property
    def needs_gram(self) -> bool:
        """Whether the solve reads the edited layers' Gram matrix: in the output metric, hardened, or with the
        plan's trigger search."""
        return self.harden_rounds != 0 or self.metric == "output" or self.trigger_rounds > 0

    @property
    def gram_optional(self) -> bool:
        """Whether the solve also runs without the Gram matrix: only the default hardening (``harden_rounds=None``)
        reads it, and for states alone the operator is plain ICE."""
        return self.harden_rounds is None and self.metric == "input" and self.trigger_rounds == 0

    def build(self, E_erase: Tensor, E_preserve: Tensor, anchor: tuple[Tensor, Tensor] | None = None,
              concepts: int = 1, E_base: Tensor | Spectrum | None = None,
              gram: Tensor | None = None) -> DissociationOperator:  # fmt: skip
        """ICE's operator with these hyperparameters (:func:`dissociation_operator`)."""
        return dissociation_operator(E_erase, E_preserve, self, anchor=anchor, concepts=concepts, E_base=E_base,
                                     gram=gram)  # fmt: skip


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



def ice_components(
    E_erase: Tensor, E_preserve: Tensor, hparams: ICEHyperParams, E_base: Tensor | Spectrum | None = None
) -> tuple[EnergySubspace, Overlap, Overlap | None]:
    """The ingredients of ``D*``: the energy-weighted erase subspace ``P_e``; by objective, the overlap projector
    ``P_ov`` (``frobenius``) or the energy-weighted preserve operator ``P_p`` (``weighted``); and the broad preserve
    base ``P_b`` (``weighted`` with base states and ``base_weight > 0``; ``None`` otherwise), all as
    ``Q diag(w) Q^T``. With the ``frobenius`` objective, base states join the preserve states."""
    _, Pe, second, base = _components(E_erase, E_preserve, hparams, E_base)
    return Pe, second, base


def _components(E_erase: Tensor, E_preserve: Tensor, hp: ICEHyperParams, E_base: Tensor | Spectrum | None,
                erase_subspace: bool = True) -> tuple[Tensor, EnergySubspace | None, Overlap, Overlap | None]:
    """:func:`ice_components` after the erase states they are built from (checked, centred with ``center``);
    ``erase_subspace=False`` leaves ``P_e`` out (``None``) for the caller to form from those states."""
    E_erase, E_preserve, E_base = _checked_inputs(E_erase, E_preserve, E_base)
    if isinstance(E_preserve, Spectrum) and (hp.center or hp.objective != "weighted"):
        raise ValueError("preserve states given as a Spectrum stand in for their Gram matrix only: the weighted, "
                         "uncentred solve reads nothing else of them; pass the states themselves")
    if E_base is not None and hp.objective != "weighted":
        rows = E_base.rows() if isinstance(E_base, Spectrum) else E_base
        E_preserve, E_base = torch.cat([E_preserve, rows.to(_DTYPE)]), None
    mean = E_preserve.mean(0) if hp.center else None
    if mean is not None:  # subspaces of what is specific to the concept, not of the common token state
        E_erase, E_preserve = E_erase - mean, E_preserve - mean
    Pe = energy_subspace(E_erase, hp.erase_expansion, hp.rank_tol) if erase_subspace else None
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
    return E_erase, Pe, second, base


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
    With many erase states (``weighted``, from :data:`~ice_lightning.core.solver.two_sided.TWO_SIDED_FROM` rows and no
    more than d), the solve skips their spectrum and returns the two-sided ``D = U M V^T`` of rank n_e
    (:func:`~ice_lightning.core.solver.two_sided.two_sided_weighted`).
    """
    if not (isinstance(concepts, int) and concepts >= 1):
        raise ValueError(f"concepts must be a positive integer, got {concepts!r}")
    hp = _merge(hparams, overrides)
    if hp.harden_rounds is None:  # the default: harden wherever the layers are known
        hp = _merge(hp, {"harden_rounds": 0 if gram is None else 1})
    if hp.erase_floor is not None and hp.harden_rounds > 0:
        return _with_erase_floor(E_erase, E_preserve, hp, anchor, concepts, E_base, gram)
    if hp.metric == "output":
        return _in_output_metric(E_erase, E_preserve, hp, anchor, concepts, E_base, gram)
    if concepts > 1:
        hp = _merge(hp, {"erase_expansion": hp.erase_expansion * concepts})
    hparams = {**_asdict(hp), "concepts": concepts}
    two_sided = hp.objective == "weighted" and two_sided_applies(E_erase, hp.erase_expansion)
    E_used, Pe, second, base = _components(E_erase, E_preserve, hp, E_base, erase_subspace=not two_sided)
    if two_sided:
        op = two_sided_weighted(E_used, second, _base_inverse(base, hp), hp.erase_expansion, hp.lam, hparams)
    else:
        op = _spectral_operator(Pe, second, base, hp, hparams)
    op = _with_anchor(with_hard_core(op, hp.hard_core), anchor)
    return _hardened(op, E_erase, E_preserve, hp, concepts, E_base, gram)


def _spectral_operator(Pe: EnergySubspace, second: Overlap, base: Overlap | None, hp: ICEHyperParams,
                       hparams: dict) -> DissociationOperator:  # fmt: skip
    """ICE's ``D*`` from the erase subspace ``Pe``, the second (overlap or preserve) projector and the base, in the
    low-rank form ``V [.] (V, S^-1 V)`` (the formulas in :func:`dissociation_operator`'s docstring)."""
    V, f, Q, w = Pe.basis, Pe.weights, second.basis, second.weights
    if hp.objective == "weighted":
        # S = B + A A^T with B = mu I + lam_b P_b (diagonal in the base's basis: inverted in closed form, so a
        # base spanning all d directions costs no d x d solve) and A = [V f^1/2, Q (lam w)^1/2]; Woodbury:
        # S^-1 X = B^-1 X - B^-1 A (I + A^T B^-1 A)^-1 A^T B^-1 X, an m x m solve (m = rank P_e + rank P_p).
        B_inv = _base_inverse(base, hp)
        VQ, scale = torch.cat([V, Q], dim=1), torch.cat([f.sqrt(), (hp.lam * w).sqrt()])
        A = VQ * scale
        B_inv_VQ = B_inv(VQ)  # one pass over the base (it may span all d directions)
        BA, BV = B_inv_VQ * scale, B_inv_VQ[:, : V.shape[1]]
        K = torch.eye(A.shape[1], dtype=A.dtype) + A.T @ BA
        row_space = BV - BA @ torch.linalg.solve((K + K.T) / 2, A.T @ BV)  # S^-1 V

        def right(X: Tensor) -> Tensor:  # D* X = V f^2 V^T S^-1 X = V [f^2 (S^-1 V)^T X]  (S symmetric)
            return f.square()[:, None] * (row_space.T @ X)

    else:
        h = hp.lam * w.square() / (1 + hp.mu + hp.lam * w.square())

        def right(X: Tensor) -> Tensor:  # D* X = P_e (X - Q diag(h) Q^T X) / (1 + mu) = V [f V^T (...) / (1 + mu)]
            Y = X - Q @ (h[:, None] * (Q.T @ X))
            return f[:, None] * (V.T @ Y) / (1 + hp.mu)

        row_space = Q @ (h[:, None] * (Q.T @ V))
    return _operator_from([V, row_space], right, "ice", hparams, left=V)


#: The rungs of ``erase_floor``'s ladder, as fractions of ``erase_expansion`` (weakest first).
_FLOOR_LADDER = (1 / 30, 1 / 10, 1 / 3, 1.0)


def _with_erase_floor(E_erase, E_preserve, hp: ICEHyperParams, anchor, concepts, E_base, gram) -> DissociationOperator:
    """ICE's operator at the weakest rung of ``_FLOOR_LADDER`` x ``erase_expansion`` whose erasure of the concept's
    own rows (hardening included) reaches ``erase_floor``; the strongest where none does. Most concepts stop at the
    first rung, so this costs one solve for them and at most four."""
    E = _checked_inputs(E_erase, E_preserve, E_base)[0]
    _check_gram(gram, E.shape[-1], "harden_rounds > 0 reads the edited layers: pass gram=layer_gram(weights)")
    erasure = output_erasure(E, gram)
    for share in _FLOOR_LADDER:
        expansion = hp.erase_expansion * share
        op = dissociation_operator(E_erase, E_preserve, hp, anchor, concepts, E_base, gram, erase_floor=None,
                                   erase_expansion=expansion)  # fmt: skip
        if erasure(op) >= hp.erase_floor:
            break
    return op  # its hparams: the rung's erase_expansion, no floor (they solve the same operator again)


#: From this many multiply-adds per application on, ``B^-1`` takes the base's weak directions (weight at most ``mu``)
#: in float32 (:func:`_base_inverse`). Below it (every solve at d <= 768: SD 1.5, the development set) all of it is
#: float64; at Wan size with 100 concepts (25 G multiply-adds) it takes a sixth off the solve.
FLOAT32_TAIL_FROM = 10**9


def _base_inverse(base: Overlap | None, hp: ICEHyperParams):
    """``X -> B^-1 X`` for ``B = mu I + lam_b P_b``, diagonal in the base's own basis: inverted in closed form, so a
    base spanning all d directions costs no d x d solve.

    ``B^-1 X = X / mu + Qb diag(s) Qb^T X`` with ``s = 1 / (g + mu) - 1 / mu``. Along a direction with ``g > mu`` the
    two terms cancel (by up to ``(g + mu) / mu``, 1500 at the defaults), so those stay float64. Along the weak ones
    ``|s| mu = g / (g + mu) <= 1/2``, no cancellation: float32 there keeps the result within about 1e-7 of float64's.
    At Wan size with 100 concepts (a random base: 3190 of its 3600 directions weak) the operator stays within 1e-6 of
    float64's, where float32 throughout is 50x further off (2e-5); weights are edited in float32 or less.
    """
    if base is None:
        return lambda X: X / hp.mu
    Qb, g = base.basis, hp.base_weight * base.weights
    if not bool((g[:-1] >= g[1:]).all()):  # energy subspaces come sorted; the split below wants views
        order = g.argsort(descending=True)
        Qb, g = Qb[:, order], g[order]
    shift = 1.0 / (g + hp.mu) - 1.0 / hp.mu
    k = int((g > hp.mu).sum())  # the strong directions lead

    def B_inv(X: Tensor) -> Tensor:  # X / mu + Qb diag(shift) Qb^T X
        if (len(g) - k) * X.numel() < FLOAT32_TAIL_FROM:  # in one pass over the d x m result
            return torch.addmm(X, Qb, (Qb.T @ X).mul_(shift[:, None]), beta=1.0 / hp.mu)
        Qw, s_weak = Qb[:, k:].float(), shift[k:, None].float()
        weak = Qw @ (Qw.T @ X.float()).mul_(s_weak)
        return torch.addmm(X, Qb[:, :k], (Qb[:, :k].T @ X).mul_(shift[:k, None]), beta=1.0 / hp.mu).add_(weak)

    return B_inv


def _hardened(op: DissociationOperator, E_erase: Tensor, E_preserve: Tensor, hp: ICEHyperParams, concepts: int,
              E_base, gram: Tensor | None) -> DissociationOperator:  # fmt: skip
    """``op`` after ``hp.harden_rounds`` rounds of :func:`harden`, each round's adversarial rows solved as their own
    ICE erasure with ``erase_expansion = harden_expansion``, in ``harden_metric`` (default: the erasure's own), with
    the same preserve sets."""
    if hp.harden_rounds == 0:
        return op
    _check_gram(gram, op.dim, "harden_rounds > 0 reads the edited layers: pass gram=layer_gram(weights)")

    metric = hp.harden_metric or hp.metric
    # What every adversary solve shares, computed once (a budget's search solves about ten): the Gram's top eigenvalue;
    # the preserve states as at most d rows with their Gram matrix (all that the budget's output change reads of them);
    # in the output metric, the preserve and base states mapped into it; and, where the solve reads only the preserve
    # and base states' Gram matrices (weighted, uncentred), their spectra, decomposed here once instead of in every
    # solve (those SVDs were 85 % of a budget's search at SD 1.5 size).
    top = _largest_eigenvalue(gram)
    gram_only = hp.objective == "weighted" and not hp.center
    spectrum = None  # the preserve states' spectrum, where it was taken to compress them (not taken again below)
    if gram_only and E_preserve.shape[0] > E_preserve.shape[-1]:
        spectrum = compress_states(E_preserve.to(_DTYPE))
        E_preserve = spectrum.rows()
    if metric == "output":
        sides = metric_sides(E_preserve, E_base, gram, hp.metric_ridge, as_spectra=gram_only)
        preserve, base = E_preserve, E_base
    else:
        sides = None
        if gram_only:
            preserve = spectrum if spectrum is not None else compress_states(E_preserve)
        else:
            preserve = E_preserve
        base = compress_states(E_base) if gram_only and isinstance(E_base, Tensor) else E_base

    def hardened(expansion: float) -> DissociationOperator:
        adversary = part_params(hp, expansion, metric=metric)

        def solve_adversary(rows: Tensor) -> DissociationOperator:
            if sides is not None:
                return _in_output_metric(rows, preserve, adversary, None, concepts, base, gram, sides)
            return dissociation_operator(rows, preserve, adversary, concepts=concepts, E_base=base)

        return harden(op, E_erase, gram, solve_adversary, hp.harden_rounds, hp.harden_gamma, gram_norm=top)

    if hp.harden_budget is None:
        return hardened(hp.harden_expansion)
    ceiling = None if hp.harden_ceiling is None else (E_erase, hp.harden_ceiling)  # bounds the concept's erasure
    return within_budget(hardened, op, E_preserve, gram, hp.harden_budget, ceiling)


def _in_output_metric(E_erase, E_preserve, hp: ICEHyperParams, anchor, concepts, E_base, gram,
                      sides: tuple | None = None) -> DissociationOperator:  # fmt: skip
    """ICE solved on the states as the edited layers see them (``metric="output"``): with ``L`` from
    :func:`metric_factor`, ``D = L^-T D~ L^T`` where ``D~`` is ICE's operator for the states ``X L``. Every energy
    share, overlap and preserve weight is then measured in ``sum_l ||W_l x||^2``, and the layers' outputs of the
    edited input, ``W (I - D) x``, are orthogonal (over all layers) to what ``D~`` removed whenever ``D~`` is a
    projector there: no input of any norm brings that part back (``docs/method.md``, section 9)."""
    E_erase, E_preserve, E_base = _checked_inputs(E_erase, E_preserve, E_base)
    _check_gram(gram, E_erase.shape[-1], "metric='output' reads the edited layers: pass gram=layer_gram(weights), "
                "or metric='input' to measure the token states themselves")  # fmt: skip
    L, preserve, base = sides or metric_sides(E_preserve, E_base, gram, hp.metric_ridge)

    def mapped(E):  # rows x^T -> (L^T x)^T = x^T L
        return E.to(_DTYPE) @ L

    inner = _merge(hp, {"metric": "input", "harden_rounds": 0})
    anchor_t = None if anchor is None else (mapped(anchor[0]), mapped(anchor[1]))
    tilde = dissociation_operator(mapped(E_erase), preserve, inner, anchor=anchor_t, concepts=concepts, E_base=base)

    def back(Y: Tensor) -> Tensor:  # L^-T Y
        return torch.linalg.solve_triangular(L.T, Y, upper=True)

    def apply(X: Tensor) -> Tensor:  # D X = L^-T D~ L^T X
        return back(tilde.times(L.T @ X))

    hparams = {**_asdict(hp), "concepts": concepts, **({"anchor": True} if anchor is not None else {})}
    if tilde.V is not None:  # two-sided: L^-T U M V^T L^T = (L^-T U) M (L V)^T
        op = DissociationOperator(back(tilde.U), tilde.M, "ice", hparams, V=L @ tilde.V)
    else:
        op = _operator_from([_orth(back(tilde.U)), L @ tilde.U], apply, "ice", hparams)
    return _hardened(op, E_erase, E_preserve, hp, concepts, E_base, gram)


def part_params(hp: ICEHyperParams, erase_expansion: float, **overrides) -> ICEHyperParams:
    """The settings of an erasure solved to compose with ``hp``'s own (the hardening's adversary, the context's
    imprint, the found triggers): ``hp``'s at ``erase_expansion``, with no hardening and no hard core of its own. Each
    part stays a soft erasure of its own rows; the hard core and the hardening belong to the concept's operator."""
    return _merge(hp, {"harden_rounds": 0, "hard_core": None, "erase_expansion": erase_expansion, **overrides})


def _asdict(hp: ICEHyperParams) -> dict:
    return {k: getattr(hp, k) for k in hp.__dataclass_fields__}


def _merge(hparams: ICEHyperParams | None, overrides: dict) -> ICEHyperParams:
    base = _asdict(hparams or ICEHyperParams())
    unknown = set(overrides) - set(base)
    if unknown:
        raise TypeError(f"unknown ICE hyperparameter(s) {sorted(unknown)}; valid: {sorted(base)}")
    return ICEHyperParams(**{**base, **overrides})
