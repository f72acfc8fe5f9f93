"""ICE's two-sided operator ``D = U M V^T``: from many erase states (Wan with 100 concepts: 1800 of 4096-d) the
weighted solve works on the states themselves and gives it, and every consumer of an operator (the edit and its
undo, hardening, the output metric, anchors, the export, its LoRA and ``verify``, the callback's state, the record's
way back) treats it as the symmetric form ``U M U^T``."""

import copy

import pytest
import torch

import ice_lightning
from ice_lightning.core.editing import apply_edits, edit_form, undo_edits
from ice_lightning.core.export import save_erased, verify_export
from ice_lightning.core.export.lora import erasure_lora
from ice_lightning.core.export.manifest import _load_operators, _save_operators
from ice_lightning.core.solver import (
    DissociationOperator,
    ICEHyperParams,
    adversarial_inputs,
    compress_states,
    dissociation_operator,
    ice_components,
    layer_gram,
)
from ice_lightning.core.solver import two_sided as two_sided_route
from ice_lightning.lightning.callback_state import ICEState

F64 = torch.float64


def _states(seed: int = 0, d: int = 48, n: int = 20):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=g, dtype=F64)
    E_e = torch.randn(n, d, generator=g, dtype=F64) + offset
    E_e = torch.cat([E_e, E_e[:4]])  # duplicated tokens: a rank-deficient Gram matrix
    E_p = torch.randn(30, d, generator=g, dtype=F64) + offset
    E_b = compress_states(torch.randn(70, d, generator=g, dtype=F64) + 0.5 * offset)
    Ws = [torch.randn(rows, d, generator=g, dtype=F64) for rows in (12, 20)]
    return E_e, E_p, E_b, Ws


CASES = {
    "default, 3 concepts": dict(concepts=3),
    "a < 2 (H^-1 G without the difference)": dict(erase_expansion=1.5),
    "a < 1": dict(erase_expansion=0.5),
    "no preserve term": dict(lam=0.0),
    "centred": dict(center=True),
    "small ridge": dict(mu=1e-4, concepts=2),
    "anchor": dict(anchor=True),
    "output metric": dict(metric="output"),
    "hardened": dict(harden_rounds=1),
    "hard core": dict(hard_core=0.35),  # 4 eigenvalues raised to 1 with the base, 10 without
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_base", [True, False])
def test_two_sided_solve_equals_the_spectral_route(case, with_base, monkeypatch):
    """Lowered to 16 states here (the default, 1024, is checked below): the same operator as the spectral route
    (``U M U^T`` from the erase states' SVD), to 1e-11 relative, in every setting that reaches it."""
    E_e, E_p, E_b, Ws = _states()
    kw = {"harden_rounds": 0, **CASES[case]}  # the plain solve unless the case hardens (the Gram is given to all)
    if kw.pop("anchor", False):
        kw["anchor"] = (E_e[:5], torch.randn(5, E_e.shape[1], generator=torch.Generator().manual_seed(3), dtype=F64))
    base = E_b if with_base else None
    gram = layer_gram(Ws)
    spectral = dissociation_operator(E_e, E_p, E_base=base, gram=gram, **kw)
    monkeypatch.setattr(two_sided_route, "TWO_SIDED_FROM", 16)
    two_sided = dissociation_operator(E_e, E_p, E_base=base, gram=gram, **kw)
    assert spectral.V is None
    assert two_sided.V is not None  # hardening composes it with the adversary's operator, still two-sided
    if not kw.get("harden_rounds"):
        assert two_sided.rank == E_e.shape[0]
    D_ref, D = spectral.dense(), two_sided.dense()
    assert float((D - D_ref).norm() / D_ref.norm()) < 1e-11


def test_two_sided_solve_equals_the_dense_minimiser_at_the_default_size(monkeypatch):
    """At the default threshold (1024 erase states, at most d of them) with the formula written densely:
    ``D* = P_e^2 (P_e + lam P_p + lam_b P_b + mu I)^-1``, the subspaces from ``ice_components``; and without the
    two-sided route (threshold raised) the spectral route gives the same operator."""
    g = torch.Generator().manual_seed(1)
    d = 1100
    offset = torch.randn(d, generator=g, dtype=F64)
    E_e = torch.randn(1030, d, generator=g, dtype=F64) + offset
    E_p = torch.randn(40, d, generator=g, dtype=F64) + offset
    E_b = compress_states(torch.randn(300, d, generator=g, dtype=F64) + offset)
    hp = ICEHyperParams()
    op = dissociation_operator(E_e, E_p, hp, concepts=50, E_base=E_b)
    assert op.V is not None and op.U.shape == (d, 1030)
    big = ICEHyperParams(erase_expansion=hp.erase_expansion * 50)
    Pe, Pp, Pb = ice_components(E_e, E_p, big, E_b)
    S = Pe.dense() + hp.lam * Pp.dense() + hp.base_weight * Pb.dense() + hp.mu * torch.eye(d, dtype=F64)
    D_star = torch.linalg.solve(S, (Pe.dense() @ Pe.dense()).T).T  # S symmetric
    assert float((op.dense() - D_star).norm() / D_star.norm()) < 1e-10
    monkeypatch.setattr(two_sided_route, "TWO_SIDED_FROM", 10**9)
    spectral = dissociation_operator(E_e, E_p, hp, concepts=50, E_base=E_b)
    assert spectral.V is None
    assert float((spectral.dense() - D_star).norm() / D_star.norm()) < 1e-10


def test_base_inverse_takes_weak_directions_in_float32_and_keeps_float64_where_it_cancels(monkeypatch):
    """From ``FLOAT32_TAIL_FROM`` multiply-adds on (lowered to 0 here), ``B^-1`` takes the base's directions of weight
    at most ``mu`` in float32: within 1e-6 of the dense solve, several times closer than the same formula in float32
    throughout (float64 where ``X / mu`` and the shift cancel), and the two-sided operator within 1e-6 of the spectral
    route's."""
    from ice_lightning.core.solver import ice as ice_route
    from ice_lightning.core.solver.spectral import Overlap, energy_subspace

    E_e, E_p, E_b, _ = _states()
    hp = ICEHyperParams(mu=0.1)  # a base of 48-d: larger ridge, so that it has weak directions
    Pb = energy_subspace(E_b, hp.base_expansion, hp.rank_tol)
    g = hp.base_weight * Pb.weights
    assert 0 < int((g > hp.mu).sum()) < len(g)
    B = hp.mu * torch.eye(48, dtype=F64) + (Pb.basis * g) @ Pb.basis.T
    X = torch.randn(48, 30, generator=torch.Generator().manual_seed(4), dtype=F64)
    want = torch.linalg.solve(B, X)

    def rel(got, ref):
        return float((got - ref).norm() / ref.norm())

    base = Overlap(basis=Pb.basis, weights=Pb.weights)
    assert rel(ice_route._base_inverse(base, hp)(X), want) < 1e-13  # small: all float64
    spectral = dissociation_operator(E_e, E_p, hp, E_base=E_b)
    monkeypatch.setattr(ice_route, "FLOAT32_TAIL_FROM", 0)
    mixed = ice_route._base_inverse(base, hp)(X)
    assert 1e-12 < rel(mixed, want) < 1e-6
    Q32, s32 = Pb.basis.float(), (1.0 / (g + hp.mu) - 1.0 / hp.mu).float()
    all_float32 = X.float() / hp.mu + Q32 @ ((Q32.T @ X.float()) * s32[:, None])
    assert rel(mixed, want) < rel(all_float32.double(), want) / 3  # measured: 6.4e-8 against 4.3e-7
    shuffled = torch.randperm(len(g), generator=torch.Generator().manual_seed(5))  # directions in any order
    assert torch.equal(ice_route._base_inverse(Overlap(Pb.basis[:, shuffled], Pb.weights[shuffled]), hp)(X), mixed)
    monkeypatch.setattr(two_sided_route, "TWO_SIDED_FROM", 16)
    two_sided = dissociation_operator(E_e, E_p, hp, E_base=E_b)
    assert two_sided.V is not None and 1e-12 < rel(two_sided.dense(), spectral.dense()) < 1e-6


def test_hard_expansion_and_more_states_than_dimensions_keep_the_spectral_route(monkeypatch):
    monkeypatch.setattr(two_sided_route, "TWO_SIDED_FROM", 16)
    E_e, E_p, _, _ = _states()
    assert dissociation_operator(E_e, E_p, erase_expansion=float("inf")).V is None  # f is not rational there
    wide, _, _, _ = _states(n=60)  # 64 states of 48-d: the spectrum is at most d wide
    assert dissociation_operator(wide, E_p).V is None
    assert dissociation_operator(E_e, E_p, objective="frobenius").V is None


def _two_sided(k: int, j: int, d: int = 64, seed: int = 0) -> DissociationOperator:
    g = torch.Generator().manual_seed(seed)
    U, V = (torch.randn(d, w, generator=g, dtype=F64) / d**0.5 for w in (k, j))
    return DissociationOperator(U, 0.3 * torch.randn(k, j, generator=g, dtype=F64), V=V)


@pytest.mark.parametrize(
    ("widths", "outs", "form"),
    [((10, 12), [8], "mixed"), ((10, 12), [24] * 3, "right factor"), ((40, 44), [24] * 8, "dense")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_sided_edit_is_exact_in_each_form_and_undoes_bit_for_bit(widths, outs, form, dtype):
    """The cost model picks (``d = 64``): one small layer takes ``L = (W U) M`` against ``R = V^T``; three share
    ``R = M V^T``; with ``k`` near ``d / 2``, eight share the dense ``D``. Each is ``W (I - D)`` and undoes exactly."""
    op = _two_sided(*widths)
    torch.manual_seed(2)
    lins = [torch.nn.Linear(64, out).to(dtype) for out in outs]
    originals = [lin.weight.detach().clone() for lin in lins]
    assert edit_form(op, outs) == {"mixed": "low-rank, M in L", "right factor": "low-rank", "dense": "dense"}[form]
    edits = apply_edits([(f"l{i}", lin, op) for i, lin in enumerate(lins)])
    if form == "dense":  # its undo record is a copy of the original
        assert all(e.original is not None and e.L is None for e in edits)
    else:  # the low-rank record keeps the factors of the chosen form
        R_rows, L_cols = (12, 12) if form == "mixed" else (10, 10)
        assert all(e.R.shape == (R_rows, 64) and e.L.shape[1] == L_cols for e in edits)
    for lin, w0 in zip(lins, originals, strict=True):
        want = w0.to(F64) @ (torch.eye(64, dtype=F64) - op.dense())
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert torch.allclose(lin.weight.to(F64), want, rtol=tol, atol=tol)
    undo_edits(edits)
    assert all(torch.equal(lin.weight, w0) for lin, w0 in zip(lins, originals, strict=True))


def test_two_sided_adversary_and_factors_match_the_dense_operator():
    E_e, _, _, Ws = _states()
    op = _two_sided(10, 12, d=48)
    D = op.dense()
    G = layer_gram(Ws)
    eye = torch.eye(48, dtype=F64)
    edited = [W @ (eye - D) for W in Ws]
    H = sum(Wp.T @ Wp for Wp in edited) + 0.01 * float(torch.linalg.eigvalsh(G).max()) * eye
    want = torch.linalg.solve(H, sum(Wp.T @ W for Wp, W in zip(edited, Ws, strict=True)) @ E_e.T).T
    assert torch.allclose(adversarial_inputs(op, G, E_e, 0.01), want, atol=1e-9)
    X = E_e[:3]
    assert torch.allclose(op.rows_times(X), X @ D.T, atol=1e-12) and torch.allclose(op.times(X.T), D @ X.T)
    basis = op.row_space()
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=F64), atol=1e-12)
    assert torch.allclose(D @ basis @ basis.T, D, atol=1e-12)  # every change W D lies in it


def test_composition_with_a_two_sided_operator_stays_two_sided_and_exact():
    """``I - D = (I - D_1)(I - D_2)`` (hardening and trigger rounds) with either side two-sided: no decomposition,
    ``V`` kept, and the product exact."""
    from ice_lightning.core.solver.spectral import _composed

    eye = torch.eye(48, dtype=F64)
    sym = DissociationOperator(torch.linalg.qr(torch.randn(48, 5, dtype=F64))[0], 0.4 * torch.randn(5, 5, dtype=F64))
    for first, second in ((_two_sided(6, 7, d=48), sym), (sym, _two_sided(6, 7, d=48, seed=1)),
                          (_two_sided(6, 7, d=48), _two_sided(3, 9, d=48, seed=2))):  # fmt: skip
        op = _composed(first, second, "ice", {})
        assert op.V is not None and op.U.shape[1] == first.U.shape[1] + second.U.shape[1]
        want = eye - (eye - first.dense()) @ (eye - second.dense())
        assert torch.allclose(op.dense(), want, atol=1e-12)


def test_two_sided_operator_round_trips_through_the_export_file_and_the_callback_state(tmp_path):
    op = _two_sided(6, 7, d=16)
    old = DissociationOperator(torch.linalg.qr(torch.randn(16, 3, dtype=F64))[0], torch.randn(3, 3, dtype=F64))
    path = tmp_path / "operators.safetensors"
    _save_operators(path, [{"text": op}, {"text": old}])
    manifest = {"erasures": [{"layer_spaces": {"a": "text"}}, {"layer_spaces": {"a": "text"}}]}
    back, back_old = _load_operators(path, manifest)
    assert torch.equal(back["text"].dense(), op.dense()) and back_old["text"].V is None  # files before V still load
    assert torch.equal(back_old["text"].dense(), old.dense())
    state = ICEState(operators={"text": op})
    restored = ICEState.from_dict(copy.deepcopy(state.to_dict()))
    assert torch.equal(restored.operators["text"].V, op.V) and torch.equal(restored.operators["text"].M, op.M)
    assert "V" not in ICEState(operators={"text": old}).to_dict()["operators"]["text"]


def test_an_erasure_solved_two_sided_exports_verifies_and_rebuilds_from_its_record(load_pipeline, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """The whole route with the two-sided operator (threshold lowered to reach it on the tiny pipeline): merged and
    LoRA exports verify; a copy of the pipeline exports from the record alone (``W (I - D)^-1`` by Woodbury), and its
    LoRA equals the live one."""
    monkeypatch.setattr(two_sided_route, "TWO_SIDED_FROM", 2)
    pipe = load_pipeline("sd")
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    assert all(op.V is not None for op in result.operators.values())
    twin = copy.deepcopy(pipe)
    assert all(verify_export(save_erased(pipe, tmp_path / "merged")).values())
    assert all(verify_export(save_erased(pipe, tmp_path / "lora", format="lora")).values())
    live, from_record = erasure_lora(pipe, [result]), erasure_lora(twin, [result.record])
    assert live.keys() == from_record.keys()
    for k, v in live.items():
        assert float((from_record[k] - v).norm()) <= 1e-4 * float(v.norm()), k
    assert all(verify_export(save_erased(twin, tmp_path / "copied", results=[result.record])).values())
