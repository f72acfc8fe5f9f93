"""The solver against closed forms, autograd and LBFGS (all float64)."""

import math

import pytest
import torch

from ice_lightning.core.solver import (
    ICEHyperParams,
    anderson_duffin,
    build_operator,
    compress_states,
    cure_operator,
    dense_minimizer,
    dissociation_operator,
    energy_subspace,
    expansion,
    ice_components,
    overlap_projector,
    projection_operator,
    spectral_unlearning_objective,
    uce_dense_edit,
    uce_operator,
)

F64 = torch.float64


def _states(seed: int, n_e: int = 8, n_p: int = 20, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(3, d, generator=g, dtype=F64)  # directions both sets use
    E_e = torch.randn(n_e, 3, generator=g, dtype=F64) @ shared + torch.randn(n_e, d, generator=g, dtype=F64)
    E_p = torch.randn(n_p, 3, generator=g, dtype=F64) @ shared + 0.5 * torch.randn(n_p, d, generator=g, dtype=F64)
    return E_e + 2.0, E_p + 2.0  # a common offset, as real token states have


def _dense_parts(E_e, E_p, hp):
    Pe, ov, _ = ice_components(E_e, E_p, hp)
    return Pe.dense(), ov.dense()


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]


OVERLAPS = ["energy", "angles", "parallel_sum", "anderson_duffin", "none"]
# (objective, overlap): the weighted objective has no separate overlap projector
FORMS = [("frobenius", o) for o in OVERLAPS] + [("weighted", "energy")]


@pytest.mark.parametrize(("objective", "overlap"), FORMS)
@pytest.mark.parametrize("center", [True, False])
def test_closed_form_matches_lbfgs_minimiser(objective, overlap, center):
    E_e, E_p = _states(0)
    hp = ICEHyperParams(
        objective=objective, overlap=overlap, center=center, lam=5.0, mu=0.1, erase_expansion=20.0
    )
    P_e, P_ov = _dense_parts(E_e, E_p, hp)
    D = torch.zeros_like(P_e, requires_grad=True)
    opt = torch.optim.LBFGS(
        [D], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = spectral_unlearning_objective(D, P_e, P_ov, hp.lam, hp.mu, objective)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    D_star = dissociation_operator(E_e, E_p, hp).dense()
    rel = (D.detach() - D_star).norm() / D_star.norm()
    assert rel < 1e-6
    assert torch.allclose(D_star, dense_minimizer(P_e, P_ov, hp.lam, hp.mu, objective), atol=1e-10)


@pytest.mark.parametrize(("objective", "overlap"), FORMS)
def test_gradient_vanishes_at_closed_form(objective, overlap):
    E_e, E_p = _states(1)
    hp = ICEHyperParams(objective=objective, overlap=overlap, lam=3.0, mu=0.05)
    P_e, P_ov = _dense_parts(E_e, E_p, hp)
    D = dissociation_operator(E_e, E_p, hp).dense().requires_grad_(True)
    spectral_unlearning_objective(D, P_e, P_ov, hp.lam, hp.mu, objective).backward()
    assert D.grad.norm() < 1e-10
    # and it is not zero elsewhere: the test can fail
    D2 = (D.detach() + 1e-3).requires_grad_(True)
    spectral_unlearning_objective(D2, P_e, P_ov, hp.lam, hp.mu, objective).backward()
    assert D2.grad.norm() > 1e-4


def test_weighted_objective_is_strongly_convex_with_lipschitz_gradient():
    """Hessian 2 (P_e + lam P_p + mu I) (x) I: modulus 2 mu, Lipschitz constant <= 2 (1 + lam + mu)."""
    E_e, E_p = _states(2)
    hp = ICEHyperParams(lam=4.0, mu=0.2)
    P_e, P_p = _dense_parts(E_e, E_p, hp)
    D_star = dissociation_operator(E_e, E_p, hp).dense()
    g = torch.Generator().manual_seed(0)
    J = lambda D: spectral_unlearning_objective(D, P_e, P_p, hp.lam, hp.mu, "weighted")  # noqa: E731

    def grad(D):
        D = D.clone().requires_grad_(True)
        J(D).backward()
        return D.grad

    for _ in range(5):
        D1, D2 = (torch.randn(12, 12, generator=g, dtype=F64) for _ in range(2))
        assert (grad(D1) - grad(D2)).norm() <= 2 * (1 + hp.mu + hp.lam) * (D1 - D2).norm() + 1e-9
        assert J(D1) - J(D_star) >= hp.mu * (D1 - D_star).norm() ** 2 - 1e-9


def test_concepts_scale_the_erase_expansion():
    E_e, E_p = _states(4)
    many = dissociation_operator(E_e, E_p, concepts=4, erase_expansion=25.0)
    one = dissociation_operator(E_e, E_p, erase_expansion=100.0)
    assert torch.allclose(many.dense(), one.dense(), atol=1e-12)
    assert many.hparams["erase_expansion"] == 100.0 and many.hparams["concepts"] == 4
    with pytest.raises(ValueError, match="positive integer"):
        dissociation_operator(E_e, E_p, concepts=0)


def test_objective_is_strongly_convex_with_lipschitz_gradient():
    E_e, E_p = _states(2)
    hp = ICEHyperParams(objective="frobenius", lam=4.0, mu=0.2)
    P_e, P_ov = _dense_parts(E_e, E_p, hp)
    D_star = dissociation_operator(E_e, E_p, hp).dense()
    g = torch.Generator().manual_seed(0)

    def grad(D):
        D = D.clone().requires_grad_(True)
        spectral_unlearning_objective(D, P_e, P_ov, hp.lam, hp.mu).backward()
        return D.grad

    J = lambda D: spectral_unlearning_objective(D, P_e, P_ov, hp.lam, hp.mu)  # noqa: E731
    for _ in range(5):
        D1, D2 = (torch.randn(12, 12, generator=g, dtype=F64) for _ in range(2))
        assert (grad(D1) - grad(D2)).norm() <= 2 * (1 + hp.mu + hp.lam) * (D1 - D2).norm() + 1e-9
        assert J(D1) - J(D_star) >= (1 + hp.mu) * (D1 - D_star).norm() ** 2 - 1e-9


def test_low_rank_form_is_exact_and_small():
    E_e, E_p = _states(3, n_e=5, n_p=40, d=64)
    op = dissociation_operator(E_e, E_p)
    assert op.rank <= 2 * 5 + 1  # row space of P_e S^-1 (plus the mean direction)
    assert torch.allclose(op.U.T @ op.U, torch.eye(op.rank, dtype=F64), atol=1e-12)
    W = torch.randn(16, 64, dtype=F64)
    assert torch.allclose(op.apply(W), W @ (torch.eye(64, dtype=F64) - op.dense()), atol=1e-12)
    W32 = W.float()
    out = op.apply(W32)
    assert out.dtype == torch.float32 and out.shape == W32.shape


def test_expansion_limits():
    r = torch.linspace(0, 1, 101, dtype=F64)
    for a in (0.5, 1.0, 7.0, 1e6):
        f = expansion(r, a)
        assert f[0] == 0 and abs(f[-1] - 1) < 1e-15
        assert torch.all(f[1:] >= f[:-1])  # monotone
    assert torch.allclose(expansion(r, 1.0), r)
    assert torch.equal(expansion(r, math.inf), (r > 0).to(F64))
    assert torch.allclose(expansion(r[1:], 1e12), torch.ones(100, dtype=F64), atol=1e-9)
    assert torch.all(expansion(r, 10.0) >= r)  # a > 1 expands weak directions


def test_energy_subspace_weights():
    E = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    sub = energy_subspace(E, a=1.0)
    assert torch.allclose(sub.energy, torch.tensor([9, 4, 1], dtype=F64) / 14)
    assert torch.allclose(sub.weights, sub.energy)
    hard = energy_subspace(E, a=math.inf)
    assert torch.allclose(hard.dense(), torch.eye(3, dtype=F64))


def test_anderson_duffin_gives_intersection_projector():
    B = _orthonormal(10, 6, seed=0)
    # range(P) = span(b0, b1, b2, b3); range(Q) = span(b0, b1, b4 + b2, b5): intersection span(b0, b1)
    P = B[:, :4] @ B[:, :4].T
    Qb = torch.linalg.qr(torch.stack([B[:, 0], B[:, 1], B[:, 4] + B[:, 2], B[:, 5]], 1))[0]
    Q = Qb @ Qb.T
    inter = B[:, :2] @ B[:, :2].T
    assert torch.allclose(anderson_duffin(P, Q), inter, atol=1e-10)
    # the same through the solver's low-rank path on states spanning the two subspaces
    g = torch.Generator().manual_seed(0)
    E_e = torch.randn(9, 4, generator=g, dtype=F64) @ B[:, :4].T
    E_p = torch.randn(9, 4, generator=g, dtype=F64) @ Qb.T
    Pe, Pp = energy_subspace(E_e, math.inf), energy_subspace(E_p, math.inf)
    assert torch.allclose(overlap_projector(Pe, Pp, "anderson_duffin").dense(), inter, atol=1e-8)
    # principal angles with a threshold: exactly the intersection (b2 vs b2+b4 is at 45 degrees)
    assert torch.allclose(overlap_projector(Pe, Pp, "angles", threshold=0.999).dense(), inter, atol=1e-8)


def test_principal_angles_reduce_to_intersection_at_0_and_90_degrees():
    B = _orthonormal(10, 5, seed=1)
    E_e = torch.randn(7, 3, dtype=F64) @ B[:, :3].T  # span(b0, b1, b2)
    E_p = torch.randn(7, 3, dtype=F64) @ B[:, [0, 3, 4]].T  # span(b0, b3, b4): angles 0, 90, 90
    Pe, Pp = energy_subspace(E_e, math.inf), energy_subspace(E_p, math.inf)
    ov = overlap_projector(Pe, Pp, "angles")
    assert torch.allclose(ov.dense(), B[:, :1] @ B[:, :1].T, atol=1e-10)
    # exact subspaces that do not intersect: the Anderson-Duffin form is ~0
    E_p2 = torch.randn(7, 2, dtype=F64) @ B[:, 3:5].T
    assert overlap_projector(Pe, energy_subspace(E_p2, math.inf), "anderson_duffin").dense().norm() < 1e-8


def test_energy_overlap_is_the_preserve_share():
    # direction 0 only erase energy, direction 1 equal energy, direction 2 only preserve energy
    E_e = torch.tensor([[2.0, 1.0, 0.0], [-2.0, 1.0, 0.0]], dtype=F64)
    E_p = torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, -3.0]], dtype=F64)
    Pe = energy_subspace(E_e, 10.0)
    ov = overlap_projector(Pe, energy_subspace(E_p, 10.0), "energy", None, E_e, E_p)
    M = ov.dense()
    assert torch.allclose(M, torch.diag(torch.tensor([0.0, 0.5, 0.0], dtype=F64)), atol=1e-12)


def test_operator_is_lipschitz_in_the_embeddings():
    E_e, E_p = _states(4)
    D0 = dissociation_operator(E_e, E_p).dense()
    g = torch.Generator().manual_seed(1)
    ratios = []
    for eps in (1e-7, 1e-6, 1e-5):
        dE = eps * torch.randn(E_e.shape, generator=g, dtype=F64)
        dP = eps * torch.randn(E_p.shape, generator=g, dtype=F64)
        D1 = dissociation_operator(E_e + dE, E_p + dP).dense()
        ratios.append(float((D1 - D0).norm() / torch.cat([dE, dP]).norm()))
    assert max(ratios) < 50.0  # bounded sensitivity...
    assert max(ratios) / min(ratios) < 3.0  # ...that is locally linear (no jump)


def test_baselines_match_their_formulas():
    E_e, E_p = _states(5)
    d = E_e.shape[1]
    I = torch.eye(d, dtype=F64)  # noqa: E741
    Pe, Pp = energy_subspace(E_e, 30.0), energy_subspace(E_p, 5.0)
    cure = cure_operator(E_e, E_p, erase_expansion=30.0, preserve_expansion=5.0).dense()
    assert torch.allclose(cure, Pe.dense() - Pe.dense() @ Pp.dense(), atol=1e-12)
    proj = projection_operator(E_e, energy_kept=1.0).dense()
    assert torch.allclose(proj, energy_subspace(E_e, math.inf).dense(), atol=1e-12)
    assert projection_operator(E_e, energy_kept=0.5).rank < proj.trace().round()
    W = torch.randn(6, d, dtype=F64)
    guide = torch.randn_like(E_e)
    for g in (None, guide):
        op = uce_operator(E_e, E_p, lam=0.7, preserve_scale=2.0, E_guide=g)
        dense = uce_dense_edit(W, E_e, E_p, lam=0.7, preserve_scale=2.0, E_guide=g)
        assert torch.allclose(W @ (I - op.dense()), dense, atol=1e-10)
    assert build_operator("cure", E_e, E_p, erase_expansion=30.0, preserve_expansion=5.0).method == "cure"


def test_anchor_maps_erased_states_onto_anchor_states():
    B = _orthonormal(16, 6, seed=2)
    g = torch.Generator().manual_seed(0)  # seeded: the states were drawn unseeded and failed about 1 run in 6
    E_e = torch.randn(4, 2, dtype=F64, generator=g) @ B[:, :2].T
    E_p = torch.randn(10, 2, dtype=F64, generator=g) @ B[:, 2:4].T
    src, dst = E_e[:2], torch.randn(2, 2, dtype=F64, generator=g) @ B[:, 4:6].T
    op = dissociation_operator(E_e, E_p, anchor=(src, dst), erase_expansion=math.inf, mu=1e-9, center=False)
    I = torch.eye(16, dtype=F64)  # noqa: E741
    assert torch.allclose((I - op.dense()) @ src.T, dst.T, atol=1e-6)
    # preserve states are untouched (orthogonal to the erase subspace here), up to the ridge's round-off: the
    # Woodbury solve divides by mu = 1e-9, so eps / mu ~ 1e-7
    assert torch.allclose((I - op.dense()) @ E_p.T, E_p.T, atol=1e-6)
    assert not torch.allclose((I - op.dense()) @ src.T, src.T, atol=1e-1)  # the anchor moved the erased states


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"E_erase": torch.full((3, 4), float("nan"))}, "NaN"),
        ({"E_erase": torch.zeros(0, 4)}, "empty"),
        ({"E_erase": torch.ones(3, 5)}, "dimension mismatch"),
        ({"E_erase": torch.ones(4)}, "shape"),
        ({"lam": -1.0}, "lam"),
        ({"mu": 0.0}, "strongly convex"),
        ({"overlap": "bogus"}, "unknown overlap"),
        ({"gamma": 1.0}, "unknown ICE hyperparameter"),
    ],
)
def test_bad_inputs_are_named(kwargs, message):
    args = {"E_erase": torch.randn(3, 4), "E_preserve": torch.randn(6, 4)}
    hp = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        dissociation_operator(args["E_erase"], args["E_preserve"], **hp)


def test_broad_preserve_base_enters_the_weighted_objective_exactly():
    """``J + lam_b ||D P_b^1/2||^2`` has the minimiser ``P_e^2 (P_e + lam P_p + lam_b P_b + mu I)^-1``: the
    low-rank operator equals it, LBFGS finds it, and SVD-compressed base rows give the same operator."""
    E_e, E_p = _states(5)
    g = torch.Generator().manual_seed(5)
    E_b = torch.randn(40, 12, generator=g, dtype=F64) + 2.0
    hp = ICEHyperParams(lam=3.0, mu=0.1, base_weight=7.0, base_expansion=4.0)
    Pe, Pp, base = ice_components(E_e, E_p, hp, E_b)
    P_e, P_p, P_b = Pe.dense(), Pp.dense(), base.dense()
    assert torch.allclose(P_b, energy_subspace(E_b, 4.0).dense(), atol=1e-12)
    S = P_e + hp.lam * P_p + hp.base_weight * P_b + hp.mu * torch.eye(12, dtype=F64)
    expected = P_e @ P_e @ torch.linalg.inv(S)
    D_star = dissociation_operator(E_e, E_p, hp, E_base=E_b).dense()
    assert torch.allclose(D_star, expected, atol=1e-10)
    # the base changes the edit (the test can fail), and LBFGS on the full objective agrees
    assert (D_star - dissociation_operator(E_e, E_p, hp).dense()).norm() > 1e-3
    D = torch.zeros(12, 12, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([D], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = spectral_unlearning_objective(D, P_e, P_p, hp.lam, hp.mu, "weighted") + hp.base_weight * (
            D @ P_b * D).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert (D.detach() - D_star).norm() / D_star.norm() < 1e-6
    _, s, Vh = torch.linalg.svd(E_b, full_matrices=False)
    compressed = dissociation_operator(E_e, E_p, hp, E_base=s[:, None] * Vh).dense()
    assert torch.allclose(compressed, D_star, atol=1e-10)
    spectrum = compress_states(E_b)  # the form EmbeddingSpace.base_states caches: read without a second SVD
    assert torch.allclose(dissociation_operator(E_e, E_p, hp, E_base=spectrum).dense(), D_star, atol=1e-10)
    assert torch.allclose(dissociation_operator(E_e, E_p, hp, E_base=E_b, base_weight=0.0).dense(),
                          dissociation_operator(E_e, E_p, hp, base_weight=0.0).dense(), atol=1e-12)  # fmt: skip
    frob = ICEHyperParams(objective="frobenius", base_weight=7.0)  # there the base joins the preserve states
    assert torch.allclose(dissociation_operator(E_e, E_p, frob, E_base=E_b).dense(),
                          dissociation_operator(E_e, torch.cat([E_p, E_b]), frob).dense(), atol=1e-12)  # fmt: skip


def test_gram_form_of_large_state_matrices_matches_the_svd_and_the_dense_minimiser(monkeypatch):
    """From ``_GRAM_FROM`` rows and columns on, spectra come from the smaller Gram matrix (Wan, 100 concepts: 1800 x
    4096). Lowered here to reach that path at d = 48: wide states (duplicated rows, so rank-deficient, and weak
    directions, about 1e-6 of the largest, whose ``E^T u / s`` loses orthogonality without the QR pass) and tall base
    rows give the SVD's singular values, subspaces and ranks, and ICE's operator equals the dense minimiser built from
    the SVD path's components."""
    from ice_lightning.core.solver import spectral

    g = torch.Generator().manual_seed(7)
    d = 48
    E_e = torch.randn(20, d, generator=g, dtype=F64) + 30.0
    weak = torch.tensor([[1e-4], [2e-4]], dtype=F64) * torch.randn(2, d, generator=g, dtype=F64)
    E_e = torch.cat([E_e, E_e[:10], weak])  # rank 22 of 32 rows; 21 above rank_tol
    E_p = torch.randn(30, d, generator=g, dtype=F64) + 1.0
    E_b = torch.randn(90, d, generator=g, dtype=F64) + 0.5  # more rows than columns: the E^T E branch
    hp = ICEHyperParams(lam=3.0, mu=0.1, base_weight=7.0)
    svd = {name: spectral._spectrum(E, 1e-6) for name, E in (("erase", E_e), ("base", E_b))}
    Pe, Pp, base = ice_components(E_e, E_p, hp, E_b)
    reference = dissociation_operator(E_e, E_p, hp, E_base=compress_states(E_b))
    monkeypatch.setattr(spectral, "_GRAM_FROM", 16)
    for name, E in (("erase", E_e), ("base", E_b)):
        s, Vh = spectral._spectrum(E, 1e-6)
        s_ref, Vh_ref = svd[name]
        assert s.shape == s_ref.shape  # the duplicates add no round-off directions
        assert torch.allclose(s, s_ref, rtol=0, atol=1e-9 * float(s_ref[0]))
        assert torch.allclose(Vh @ Vh.T, torch.eye(len(s), dtype=F64), atol=1e-13)
        strong = s_ref > 1e-4 * s_ref[0]  # the same strong subspace; the weak directions' span is only as good
        assert torch.allclose(Vh[strong].T @ Vh[strong], Vh_ref[strong].T @ Vh_ref[strong], atol=1e-9)
        assert torch.allclose((Vh.T * s.square()) @ Vh, E.T @ E, atol=1e-12 * float(s[0]) ** 2)  # as their energy
    assert len(svd["erase"][0]) == 21
    op = dissociation_operator(E_e, E_p, hp, E_base=compress_states(E_b))
    S = Pe.dense() + hp.lam * Pp.dense() + hp.base_weight * base.dense() + hp.mu * torch.eye(d, dtype=F64)
    D_star = Pe.dense() @ Pe.dense() @ torch.linalg.inv(S)
    assert torch.allclose(op.dense(), D_star, atol=1e-10)
    assert op.rank == reference.rank and torch.allclose(op.U.T @ op.U, torch.eye(op.rank, dtype=F64), atol=1e-12)


def test_a_spectrum_whose_svd_fails_to_converge_comes_from_the_gram_matrix(monkeypatch):
    """LAPACK's divide-and-conquer SVD can fail to converge on a nearly degenerate matrix (it did here on a round-off
    residual in a hardening round, identity family without the broad base): ``_spectrum`` then takes the Gram route,
    whose singular values and subspace match the SVD's. The failure is forced here, as LAPACK builds differ in where
    they fail."""
    from ice_lightning.core.solver import spectral

    g = torch.Generator().manual_seed(3)
    E = torch.randn(12, 40, generator=g, dtype=F64)
    E = torch.cat([E, E[:4] + 1e-13 * torch.randn(4, 40, generator=g, dtype=F64)])  # near-duplicate rows
    s_ref, Vh_ref = spectral._spectrum(E, 1e-6)

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", fails)
    s, Vh = spectral._spectrum(E, 1e-6)
    assert s.shape == s_ref.shape == (12,)
    assert torch.allclose(s, s_ref, rtol=0, atol=1e-10 * float(s_ref[0]))
    assert torch.allclose(Vh.T @ Vh, Vh_ref.T @ Vh_ref, atol=1e-9)
