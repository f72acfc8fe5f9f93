"""Closed-form hardening and RECE against dense references written from the layers' weights (float64)."""

import pytest
import torch

from ice_lightning.core.solver import (
    ICEHyperParams,
    adversarial_inputs,
    build_operator,
    dissociation_operator,
    harden,
    ice_components,
    layer_gram,
    needs_gram,
    output_erasure,
    rece_operator,
    uce_dense_edit,
    uce_operator,
)

F64 = torch.float64


#: The hardening as it was before it became the default: its rows erased in the erasure's own metric, at a fixed
#: ``harden_expansion`` (the dense references below are written for it).
FIXED = {"harden_metric": None, "harden_budget": None}


def _setting(seed: int = 0, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(rows, d, generator=g, dtype=F64) for rows in (5, 7, 9)]
    E_e = torch.randn(6, d, generator=g, dtype=F64) + 1.0
    E_p = torch.randn(30, d, generator=g, dtype=F64) + 1.0
    return Ws, E_e, E_p


def _dense_adversary(Ws, D, C, gamma):
    """``x = (sum W'^T W' + g I)^-1 sum W'^T W c`` from the edited layers themselves, ``g = gamma lambda_max``."""
    eye = torch.eye(D.shape[0], dtype=F64)
    edited = [W @ (eye - D) for W in Ws]
    H = sum(Wp.T @ Wp for Wp in edited)
    g = gamma * float(torch.linalg.eigvalsh(sum(W.T @ W for W in Ws)).max())
    rhs = sum(Wp.T @ W for Wp, W in zip(edited, Ws, strict=True)) @ C.T
    return torch.linalg.solve(H + g * eye, rhs).T


@pytest.mark.parametrize("gamma", [1e-3, 0.1])
def test_adversarial_inputs_equal_the_closed_form_over_every_layer(gamma):
    Ws, E_e, E_p = _setting()
    op = dissociation_operator(E_e, E_p)
    got = adversarial_inputs(op, layer_gram(Ws), E_e, gamma)
    assert torch.allclose(got, _dense_adversary(Ws, op.dense(), E_e, gamma), atol=1e-9, rtol=1e-7)


def test_layer_gram_is_the_sum_over_layers_and_refuses_none():
    Ws, _, _ = _setting()
    assert torch.allclose(layer_gram(Ws), torch.cat(Ws).T @ torch.cat(Ws))
    with pytest.raises(ValueError, match="no layer weights"):
        layer_gram([])


def test_hardened_operator_is_the_plain_edit_composed_with_the_adversaries_erasure():
    Ws, E_e, E_p = _setting(1)
    G = layer_gram(Ws)
    hp = ICEHyperParams(harden_rounds=2, harden_gamma=0.05, harden_expansion=5.0, **FIXED)
    hardened = dissociation_operator(E_e, E_p, hp, gram=G)
    # the same two rounds written out densely
    plain = dissociation_operator(E_e, E_p).dense()
    eye = torch.eye(E_e.shape[1], dtype=F64)
    rows, current = E_e[:0], plain
    for _ in range(2):
        x = _dense_adversary(Ws, current, E_e, 0.05)
        rows = torch.cat([rows, x / x.norm(dim=-1, keepdim=True) * E_e.norm(dim=-1, keepdim=True)])
        adversary = dissociation_operator(rows, E_p, erase_expansion=5.0).dense()
        current = eye - (eye - plain) @ (eye - adversary)
    assert torch.allclose(hardened.dense(), current, atol=1e-9)
    assert hardened.hparams["harden_rounds"] == 2 and hardened.method == "ice"
    assert harden(dissociation_operator(E_e, E_p), E_e, G, None, rounds=0).rank == dissociation_operator(E_e, E_p).rank


def _restored(Ws, E_e, D):
    """The share of the concept's outputs that the adversary's best input (at the concept token's norm) restores
    through the edited layers, over all of them."""
    eye = torch.eye(E_e.shape[1], dtype=F64)
    x = _dense_adversary(Ws, D, E_e, 0.01)
    x = x / x.norm(dim=-1, keepdim=True) * E_e.norm(dim=-1, keepdim=True)
    return sum(((x @ (W @ (eye - D)).T) * (E_e @ W.T)).sum() for W in Ws) / sum((E_e @ W.T).square().sum()
                                                                              for W in Ws)  # fmt: skip


def test_hardening_weakens_the_closed_form_adversary():
    """The adversary's best input restores less of the concept's outputs through the hardened layers."""
    Ws, E_e, E_p = _setting(2)
    G = layer_gram(Ws)
    plain = dissociation_operator(E_e, E_p).dense()
    hard = dissociation_operator(E_e, E_p, harden_rounds=3, gram=G, **FIXED).dense()
    assert _restored(Ws, E_e, hard) < _restored(Ws, E_e, plain) - 0.05  # 0.750 against 0.838


def test_the_default_hardens_wherever_the_layers_are_known():
    """``harden_rounds=None`` (the default): one round of the output-metric adversary within the collateral budget when
    the layers' Gram matrix is given (as ``erase()`` gives it), plain ICE for states alone; each records what it did."""
    Ws, E_e, E_p = _setting(2)
    G = layer_gram(Ws)
    alone = dissociation_operator(E_e, E_p)
    assert alone.hparams["harden_rounds"] == 0
    assert torch.equal(alone.dense(), dissociation_operator(E_e, E_p, harden_rounds=0).dense())
    assert torch.equal(build_operator("ice", E_e, E_p).dense(), alone.dense())  # no Gram needed for states alone
    hardened = dissociation_operator(E_e, E_p, gram=G)
    explicit = dissociation_operator(E_e, E_p, harden_rounds=1, harden_metric="output", harden_budget=0.003, gram=G)
    assert hardened.hparams["harden_rounds"] == 1 and hardened.hparams["harden_budget"] == 0.003
    assert torch.equal(hardened.dense(), explicit.dense())
    assert torch.equal(dissociation_operator(E_e, E_p, gram=G, harden_rounds=0).dense(), alone.dense())
    assert needs_gram("ice", {}) and not needs_gram("ice", {"harden_rounds": 0})
    # the adversary's best input restores less through the default edit than through the plain one
    assert _restored(Ws, E_e, hardened.dense()) < _restored(Ws, E_e, alone.dense())


def test_hardening_needs_the_layers_and_checks_its_settings():
    Ws, E_e, E_p = _setting()
    with pytest.raises(ValueError, match="pass gram="):
        dissociation_operator(E_e, E_p, harden_rounds=1)
    with pytest.raises(ValueError, match="pass gram="):
        build_operator("rece", E_e, E_p)
    with pytest.raises(ValueError, match="dimension mismatch: the Gram matrix"):
        dissociation_operator(E_e, E_p, harden_rounds=1, gram=torch.eye(3, dtype=F64))
    for bad in (-1, 1.5, True, 11):
        with pytest.raises(ValueError, match=r"harden_rounds .* integer in \[0, 10\]"):
            ICEHyperParams(harden_rounds=bad)
    with pytest.raises(ValueError, match="harden_gamma"):
        ICEHyperParams(harden_gamma=0.0)
    with pytest.raises(ValueError, match="harden_expansion must be > 0"):
        ICEHyperParams(harden_expansion=-1.0)


def test_rece_equals_its_rounds_of_uce_written_densely():
    Ws, E_e, E_p = _setting(3)
    G = layer_gram(Ws)
    assert torch.allclose(rece_operator(E_e, E_p, G, lam=2.0, rounds=0).dense(),
                          uce_operator(E_e, E_p, lam=2.0).dense(), atol=1e-10)  # fmt: skip
    op = build_operator("rece", E_e, E_p, gram=G, lam=2.0, rounds=2, gamma=0.05)
    assert op.method == "rece" and op.hparams["rounds"] == 2
    eye = torch.eye(E_e.shape[1], dtype=F64)
    rows = E_e
    edited = [uce_dense_edit(W, rows, E_p, lam=2.0) for W in Ws]
    for _ in range(2):  # RECE: the adversary against the current edit joins the erased rows; UCE again
        D = eye - torch.linalg.lstsq(torch.cat(Ws), torch.cat(edited)).solution
        rows = torch.cat([rows, _dense_adversary(Ws, D, E_e, 0.05)])
        edited = [uce_dense_edit(W, rows, E_p, lam=2.0) for W in Ws]
    for W, We in zip(Ws, edited, strict=True):
        assert torch.allclose(op.apply(W), We, atol=1e-8)


def _dense_metric_roots(Ws, ridge):
    """The symmetric root ``T = (G / g + ridge I)^1/2``, ``g`` the mean eigenvalue, and its inverse."""
    lam, V = torch.linalg.eigh(sum(W.T @ W for W in Ws))
    r = (lam.clamp_min(0) / lam.mean() + ridge).sqrt()
    return V @ torch.diag(r) @ V.T, V @ torch.diag(1 / r) @ V.T


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_output_metric_solves_ice_on_the_states_as_the_layers_see_them(ridge):
    """``metric="output"``: ``D = T^-1 D~ T`` with the symmetric ``T = (G / g + ridge I)^1/2`` and ``D~`` ICE's
    operator of the mapped states ``X T`` (written densely from the layers' weights; the solver's Cholesky factor
    gives the same ``D``, ICE being equivariant under rotations)."""
    Ws, E_e, E_p = _setting(4)
    E_b = torch.randn(40, E_e.shape[1], generator=torch.Generator().manual_seed(5), dtype=F64)
    T, T_inv = _dense_metric_roots(Ws, ridge)
    got = dissociation_operator(E_e, E_p, E_base=E_b, metric="output", metric_ridge=ridge, harden_rounds=0,
                                gram=layer_gram(Ws))  # fmt: skip
    tilde = dissociation_operator(E_e @ T, E_p @ T, E_base=E_b @ T).dense()
    assert torch.allclose(got.dense(), T_inv @ tilde @ T, atol=1e-9)
    assert got.hparams["metric"] == "output" and got.rank <= 2 * dissociation_operator(E_e @ T, E_p @ T).rank


def test_a_hard_erasure_in_the_output_metric_leaves_nothing_for_any_input_to_restore():
    """With eigenvalue 1 on the concept (``erase_expansion=inf``, no preserve pull), the layers' outputs of *any*
    edited input are orthogonal, over every layer at once, to the concept outputs the edit removed; the same
    erasure in the input metric leaves a part an input can bring back."""
    d = 16
    g = torch.Generator().manual_seed(6)
    Ws = [torch.randn(rows, d, generator=g, dtype=F64) for rows in (12, 14, 16)]  # G full rank
    E_e = torch.randn(3, d, generator=g, dtype=F64)
    E_p = torch.randn(20, d, generator=g, dtype=F64)
    X = torch.randn(50, d, generator=g, dtype=F64)  # arbitrary attack inputs
    eye = torch.eye(d, dtype=F64)

    def cosine_to_removed(D):
        out = torch.cat([X @ (W @ (eye - D)).T for W in Ws], dim=1)
        removed = torch.cat([E_e @ (W @ D).T for W in Ws], dim=1)
        return float((out @ torch.linalg.pinv(removed) @ removed).norm() / out.norm())

    hard = {"erase_expansion": float("inf"), "lam": 0.0, "base_weight": 0.0, "mu": 1e-6, "metric_ridge": 1e-9}
    output = dissociation_operator(E_e, E_p, metric="output", gram=layer_gram(Ws), harden_rounds=0, **hard).dense()
    plain = dissociation_operator(E_e, E_p, **hard).dense()
    assert cosine_to_removed(output) < 1e-5
    assert cosine_to_removed(plain) > 0.1  # 6e-7 against 0.245


def test_output_metric_weakens_the_closed_form_adversary_and_needs_the_layers():
    Ws, E_e, E_p = _setting(2)
    G = layer_gram(Ws)
    plain = dissociation_operator(E_e, E_p).dense()
    output = dissociation_operator(E_e, E_p, metric="output", harden_rounds=1, gram=G, **FIXED).dense()
    adversary = dissociation_operator(E_e, E_p, harden_rounds=1, harden_budget=None, gram=G).dense()
    assert _restored(Ws, E_e, output) < _restored(Ws, E_e, plain) - 0.05  # 0.707 against 0.838
    assert _restored(Ws, E_e, adversary) < _restored(Ws, E_e, plain) - 0.05  # 0.763
    with pytest.raises(ValueError, match="metric='output' reads the edited layers: pass gram="):
        dissociation_operator(E_e, E_p, metric="output")
    with pytest.raises(ValueError, match="unknown metric 'outputs'"):
        ICEHyperParams(metric="outputs")
    with pytest.raises(ValueError, match="metric_ridge"):
        ICEHyperParams(metric_ridge=0.0)
    assert build_operator("ice", E_e, E_p, gram=G, metric="output").hparams["metric"] == "output"


def test_hardening_can_erase_the_adversary_in_the_output_metric():
    """``harden_metric="output"`` under a token-state erasure: the plain edit composed with the adversary's rows
    erased in the output metric (``T^-1 D~ T``), written densely."""
    Ws, E_e, E_p = _setting(7)
    G = layer_gram(Ws)
    T, T_inv = _dense_metric_roots(Ws, 0.05)
    got = dissociation_operator(E_e, E_p, harden_rounds=1, harden_metric="output", harden_expansion=0.5,
                                harden_budget=None, gram=G)  # fmt: skip
    plain = dissociation_operator(E_e, E_p).dense()
    x = _dense_adversary(Ws, plain, E_e, 0.01)
    rows = x / x.norm(dim=-1, keepdim=True) * E_e.norm(dim=-1, keepdim=True)
    adversary = T_inv @ dissociation_operator(rows @ T, E_p @ T, erase_expansion=0.5).dense() @ T
    eye = torch.eye(E_e.shape[1], dtype=F64)
    assert torch.allclose(got.dense(), eye - (eye - plain) @ (eye - adversary), atol=1e-9)
    assert got.hparams["harden_metric"] == "output" and got.hparams["metric"] == "input"
    with pytest.raises(ValueError, match="unknown harden_metric 'outputs'"):
        ICEHyperParams(harden_metric="outputs")


def test_a_hardening_budget_takes_the_strongest_adversary_erasure_that_keeps_the_preserve_outputs_within_it():
    Ws, E_e, E_p = _setting(3)
    G = layer_gram(Ws)
    plain = dissociation_operator(E_e, E_p)

    def change(op) -> float:  # written from the layers: sqrt(sum_l ||W_l (D - D_plain) p||^2 / sum_l ||W_l p||^2)
        delta = (op.dense() - plain.dense()) @ E_p.T
        return float((sum((W @ delta).square().sum() for W in Ws) / sum((W @ E_p.T).square().sum() for W in Ws)).sqrt())

    def fixed(expansion: float):
        return dissociation_operator(E_e, E_p, harden_rounds=1, harden_expansion=expansion, harden_budget=None, gram=G)

    budget = change(fixed(1.0))
    got = dissociation_operator(E_e, E_p, harden_rounds=1, harden_budget=budget, gram=G)
    chosen = got.hparams["harden_expansion"]  # the expansion it chose is what the manifest records
    assert 0.9 < chosen <= 1.0 + 1e-9 and change(got) <= budget * (1 + 1e-9)
    assert torch.allclose(got.dense(), fixed(chosen).dense(), atol=1e-12)
    assert change(fixed(chosen * 1.3)) > budget  # the strongest within the budget, to the search's resolution
    # a budget no hardening can keep leaves the plain edit, recorded as no round applied (and those hyperparameters
    # solve it again); one every hardening keeps takes the strongest searched
    kept = dissociation_operator(E_e, E_p, harden_rounds=1, harden_budget=1e-12, gram=G)
    assert torch.allclose(kept.dense(), plain.dense(), atol=1e-12)
    assert kept.hparams["harden_rounds"] == 0 and kept.hparams["harden_budget"] == 1e-12
    assert torch.equal(dissociation_operator(E_e, E_p, gram=G, **kept.hparams).dense(), kept.dense())
    free = dissociation_operator(E_e, E_p, harden_rounds=1, harden_budget=1.0, gram=G)
    assert free.hparams["harden_expansion"] == pytest.approx(100)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="harden_budget"):
            ICEHyperParams(harden_budget=bad)


def test_preserve_states_as_a_spectrum_solve_the_weighted_uncentred_erasure_and_are_refused_elsewhere():
    """The hardening hands its adversary solves the preserve states decomposed once (a :class:`Spectrum`): the
    weighted, uncentred solve reads only their Gram matrix, so it is the same operator; the solves that read the rows
    themselves (centred, frobenius) refuse them with the reason."""
    from ice_lightning.core.solver import compress_states

    _, E_e, E_p = _setting(5)
    spectrum = compress_states(E_p)
    plain = dissociation_operator(E_e, E_p)
    assert torch.allclose(dissociation_operator(E_e, spectrum).dense(), plain.dense(), atol=1e-12)
    for setting in ({"center": True}, {"objective": "frobenius"}):
        with pytest.raises(ValueError, match="stand in for their Gram matrix only"):
            dissociation_operator(E_e, spectrum, **setting)


def test_output_erasure_is_the_share_of_each_rows_outputs_the_edit_removes_over_every_layer():
    Ws, E_e, E_p = _setting(4)
    G = layer_gram(Ws)
    op = dissociation_operator(E_e, E_p, gram=G)
    D = op.dense()
    per_row = [float((sum((W @ D @ x).square().sum() for W in Ws) / sum((W @ x).square().sum() for W in Ws)).sqrt())
               for x in E_e]  # fmt: skip
    assert output_erasure(E_e, G)(op) == pytest.approx(sum(per_row) / len(per_row), rel=1e-10)
    assert output_erasure(torch.zeros(2, 16, dtype=F64), G)(op) == 0.0  # no row with outputs: nothing to remove


def test_an_erase_floor_takes_the_weakest_rung_whose_hardened_erasure_of_the_concept_reaches_it():
    Ws, E_e, E_p = _setting(3)
    G = layer_gram(Ws)
    erasure = output_erasure(E_e, G)

    def solve(**kw):
        return dissociation_operator(E_e, E_p, gram=G, **{"erase_floor": None, **kw})

    rungs = [30.0 / 30, 30.0 / 10, 30.0 / 3, 30.0]  # the default erase_expansion's ladder
    reached = [erasure(solve(erase_expansion=a)) for a in rungs]
    assert reached == sorted(reached) and reached[0] < reached[-1]  # a firmer expansion erases more here
    floor = (reached[1] + reached[2]) / 2  # reached by the third rung, not the second
    got = solve(erase_floor=floor)
    assert got.hparams["erase_expansion"] == pytest.approx(10.0) and got.hparams["erase_floor"] is None
    assert torch.equal(got.dense(), solve(erase_expansion=10.0).dense())
    assert torch.equal(dissociation_operator(E_e, E_p, gram=G, **got.hparams).dense(), got.dense())  # as recorded
    assert erasure(got) >= floor
    assert solve(erase_floor=reached[0] / 2).hparams["erase_expansion"] == pytest.approx(1.0)  # the first rung
    assert torch.equal(solve(erase_floor=1.9).dense(), solve().dense())  # no rung reaches it: the strongest
    # without hardening (no layers, or harden_rounds=0) there is nothing to measure it by: the solve at erase_expansion
    assert torch.equal(dissociation_operator(E_e, E_p, erase_floor=floor).dense(),
                       dissociation_operator(E_e, E_p, erase_floor=None).dense())  # fmt: skip
    assert torch.equal(solve(erase_floor=floor, harden_rounds=0).dense(), solve(harden_rounds=0).dense())
    for bad in (0.0, -0.5, 2.5):
        with pytest.raises(ValueError, match="erase_floor"):
            ICEHyperParams(erase_floor=bad)


def test_a_hardening_ceiling_keeps_the_concepts_erasure_within_it_at_the_strongest_adversary_erasure_it_allows():
    Ws, E_e, E_p = _setting(3)
    G = layer_gram(Ws)
    erasure = output_erasure(E_e, G)

    def solve(**kw):
        return dissociation_operator(E_e, E_p, gram=G, **{"erase_floor": None, "harden_ceiling": None, **kw})

    plain = solve(harden_rounds=0)
    free = solve(harden_budget=1.0)  # every hardening is within this budget
    assert erasure(free) > erasure(plain) + 0.05  # the adversary's erasure adds to the concept's
    ceiling = (erasure(plain) + erasure(free)) / 2
    got = solve(harden_budget=1.0, harden_ceiling=ceiling)
    assert erasure(plain) < erasure(got) <= ceiling
    chosen = got.hparams["harden_expansion"]
    assert erasure(solve(harden_budget=None, harden_expansion=chosen * 1.3)) > ceiling  # the strongest within it
    kept = solve(harden_budget=1.0, harden_ceiling=erasure(plain) / 2)
    assert torch.allclose(kept.dense(), plain.dense(), atol=1e-12) and kept.hparams["harden_rounds"] == 0
    assert torch.equal(solve(harden_budget=None, harden_ceiling=ceiling).dense(), solve(harden_budget=None).dense())
    with pytest.raises(ValueError, match="harden_ceiling"):
        ICEHyperParams(harden_ceiling=0.0)


def test_a_hard_core_sets_the_eigenvalues_above_it_to_one_as_the_least_change_of_the_objective_that_does():
    """``hard_core=t``: ``g(D)`` with eigenvalues above ``t`` raised to 1 (against a dense eigendecomposition), equal
    to the minimiser of ``J`` under ``D x_c = x_c`` for those eigenvectors, written densely:
    ``D* + (C - D* C)(C^T S^-1 C)^-1 C^T S^-1``; the rest of the spectrum is kept."""
    _, E_e, E_p = _setting(4)
    hp = ICEHyperParams(harden_rounds=0, base_weight=0.0)
    plain = dissociation_operator(E_e, E_p, hp).dense()
    d, X = torch.linalg.eig(plain)
    t = float(d.real.sort(descending=True).values[2]) - 1e-6  # the top three eigenvalues
    assert float(d.real.max()) < 1 - 1e-3
    cored = dissociation_operator(E_e, E_p, hp, hard_core=t)
    g = torch.where(d.real > t, torch.ones_like(d), d)
    assert torch.allclose(cored.dense(), (X @ torch.diag(g) @ torch.linalg.inv(X)).real, atol=1e-12)
    C = X[:, d.real > t].real
    assert C.shape[1] == 3 and torch.allclose(cored.dense() @ C, C, atol=1e-12)
    Pe, Pp, _ = ice_components(E_e, E_p, hp)
    S = Pe.dense() + hp.lam * Pp.dense() + hp.mu * torch.eye(E_e.shape[1], dtype=F64)
    SiC = torch.linalg.solve(S, C)
    constrained = plain + (C - plain @ C) @ torch.linalg.solve(C.T @ SiC, SiC.T)
    assert torch.allclose(cored.dense(), constrained, atol=1e-12)
    kept = torch.linalg.eigvals(cored.dense()).real.sort(descending=True).values
    assert torch.allclose(kept[3:], d.real.sort(descending=True).values[3:], atol=1e-10)
    # above every eigenvalue: the plain operator, bit for bit; recorded in hparams, which solve it again
    assert torch.equal(dissociation_operator(E_e, E_p, hp, hard_core=0.999).dense(), plain)
    assert cored.hparams["hard_core"] == t
    assert torch.equal(dissociation_operator(E_e, E_p, **cored.hparams).dense(), cored.dense())
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="hard_core"):
            ICEHyperParams(hard_core=bad)


def test_a_hard_core_is_the_concepts_own_the_anchor_and_the_hardening_act_after_it():
    """The core is taken on the concept's operator before its anchor and its hardening: the anchored, hardened
    operator equals the anchor map and the hardening applied to the cored plain operator (the adversary's own
    erasure gets none), and the closed-form adversary restores less of the concept's outputs through it."""
    Ws, E_e, E_p = _setting(5)
    G = layer_gram(Ws)
    g = torch.Generator().manual_seed(9)
    anchor = (E_e[:3], torch.randn(3, E_e.shape[1], generator=g, dtype=F64) + 1.0)
    t = 0.3
    plain = dissociation_operator(E_e, E_p, harden_rounds=0)
    cored = dissociation_operator(E_e, E_p, harden_rounds=0, hard_core=t)
    assert int((torch.linalg.eigvals(plain.dense()).real > t).sum()) >= 2
    # anchored: (I - T) g(D), the anchor's T as it maps the plain operator
    anchored = dissociation_operator(E_e, E_p, harden_rounds=0, anchor=anchor)
    anchored_cored = dissociation_operator(E_e, E_p, harden_rounds=0, anchor=anchor, hard_core=t)
    T_part = plain.dense() - anchored.dense()  # T D
    T = T_part @ torch.linalg.pinv(plain.dense(), rtol=1e-10)
    assert torch.allclose(anchored_cored.dense(), cored.dense() - T @ cored.dense(), atol=1e-8)
    # hardened: the adversary's erasure composed with the cored operator, the adversary solved without a core
    kw = {**FIXED, "harden_rounds": 1}
    hardened = dissociation_operator(E_e, E_p, gram=G, hard_core=t, **kw)
    by_hand = harden(cored, E_e, G, lambda rows: dissociation_operator(rows, E_p, harden_rounds=0,
                                                                       erase_expansion=3.0), rounds=1)  # fmt: skip
    assert torch.allclose(hardened.dense(), by_hand.dense(), atol=1e-10)

    def restored(op):  # the share of the concept's outputs the closed-form adversary brings back, over every layer
        X = adversarial_inputs(op, G, E_e)
        D, eye = op.dense(), torch.eye(op.dim, dtype=F64)
        left = sum(((W @ (eye - D) @ X.T) - W @ E_e.T).norm() ** 2 for W in Ws)
        return 1 - float(left.sqrt() / sum((W @ E_e.T).norm() ** 2 for W in Ws).sqrt())

    assert restored(cored) < restored(plain) - 0.01
