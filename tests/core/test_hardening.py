"""Closed-form hardening and RECE against dense references written from the layers' weights (float64)."""

import pytest
import torch

from ice_lightning.core.solver import (
    ICEHyperParams,
    adversarial_inputs,
    build_operator,
    dissociation_operator,
    harden,
    layer_gram,
    rece_operator,
    uce_dense_edit,
    uce_operator,
)

F64 = torch.float64


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
    hp = ICEHyperParams(harden_rounds=2, harden_gamma=0.05, harden_expansion=5.0)
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


def test_hardening_weakens_the_closed_form_adversary():
    """The adversary's best input restores less of the concept's outputs through the hardened layers."""
    Ws, E_e, E_p = _setting(2)
    G = layer_gram(Ws)
    eye = torch.eye(E_e.shape[1], dtype=F64)

    def restored(D):
        x = _dense_adversary(Ws, D, E_e, 0.01)
        x = x / x.norm(dim=-1, keepdim=True) * E_e.norm(dim=-1, keepdim=True)  # same norm as the concept token
        return sum(((x @ (W @ (eye - D)).T) * (E_e @ W.T)).sum() for W in Ws) / sum((E_e @ W.T).square().sum()
                                                                                  for W in Ws)  # fmt: skip

    plain = dissociation_operator(E_e, E_p).dense()
    hard = dissociation_operator(E_e, E_p, harden_rounds=3, gram=G).dense()
    assert restored(hard) < restored(plain) - 0.05  # 0.750 against 0.838


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
