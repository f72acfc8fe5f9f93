"""The text-space metrics of an edit (``core/probe.py``) against their closed forms: relative output change,
leakage, the concept residual, and the probe's numbers through a checkpoint round trip."""

import pytest
import torch

import ice_lightning
from ice_lightning.core.probe import (
    LeakageRate,
    RelativeOutputChange,
    TextSpaceProbe,
    concept_residual,
    erasure_metrics,
)
from ice_lightning.core.solver import dissociation_operator

F64 = torch.float64


def test_relative_output_change_and_leakage_equal_their_closed_forms():
    g = torch.Generator().manual_seed(0)
    before, after = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, 5, generator=g, dtype=F64)
    metric = RelativeOutputChange()
    metric.update(before[:3], after[:3])
    metric.update(before[3:], after[3:])  # accumulates over batches: the mean over all rows
    expected = ((after - before).norm(dim=1) / before.norm(dim=1)).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-12)
    original, neutral = torch.zeros(4, 2), torch.tensor([[4.0, 0.0]]).expand(4, 2)
    edited = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.9, 0.0], [2.1, 0.0]])
    leak = LeakageRate()
    leak.update(edited, original, neutral)
    assert float(leak.compute()) == 0.5  # rows 0 and 2 are closer to the original than to the neutral output


def test_concept_residual_is_the_mean_response_along_the_erased_directions_relative_to_the_layers_gain():
    g = torch.Generator().manual_seed(1)
    E_e, E_p = torch.randn(6, 8, generator=g, dtype=F64), torch.randn(20, 8, generator=g, dtype=F64)
    op = dissociation_operator(E_e, E_p)
    W, b = torch.randn(5, 8, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    c = torch.randn(9, 8, generator=g, dtype=F64)
    V, b2 = torch.randn(3, 8, generator=g, dtype=F64), None  # a second layer reading the same space
    weights = {"l": (W, b), "m": (V, b2)}
    got = concept_residual(weights, {"l": "text", "m": "text"}, {"text": c}, {"text": op})
    D = op.dense()
    rows = [(A @ D @ c.T).T.norm(dim=1) / (c.norm(dim=1) * A.norm() / 8**0.5) for A in (W, V)]
    assert got == pytest.approx(float(torch.cat(rows).mean()), rel=1e-10)  # the mean over both layers' rows
    scaled = concept_residual({"l": (7.0 * W, b)}, {"l": "text"}, {"text": 3.0 * c}, {"text": op})
    assert scaled == pytest.approx(float(rows[0].mean()), rel=1e-10)  # scale-free in the weights and the states
    edited = concept_residual({"l": (op.apply(W), b)}, {"l": "text"}, {"text": c}, {"text": op})
    assert edited < float(rows[0].mean())  # the edit lowers the response along what it removed


def test_a_soft_edit_lowers_the_concept_residual_by_its_eigenvalue():
    """Along an eigenvector ``u`` of ``D`` (eigenvalue ``d``) the edit scales the response ``d W u`` to
    ``d (1 - d) W u``; the concept's own output shrinks by the same ``1 - d``, so a ratio to it (the v2
    manifest's residual) would not move, and an export of a soft erasure would be refused as no erasure."""
    from ice_lightning.core.export.manifest import _v2_residual
    from ice_lightning.core.solver import DissociationOperator

    n, d = 16, 0.6
    u = torch.zeros(n, 1, dtype=F64)
    u[3] = 1.0
    op = DissociationOperator(u, torch.tensor([[d]], dtype=F64), "ice", {})
    W, c = torch.eye(n, dtype=F64), 2.0 * u.T
    args = ({"text": "text"}, {"text": c}, {"text": op})
    before = concept_residual({"text": (W, None)}, *args)
    after = concept_residual({"text": (op.apply(W), None)}, *args)
    gain_after = (n - 1 + (1 - d) ** 2) ** 0.5 / n**0.5  # ||I - D||_F / sqrt(n)
    assert before == pytest.approx(d, rel=1e-12)
    assert after == pytest.approx(d * (1 - d) / gain_after, rel=1e-12)
    assert _v2_residual({"text": (W, None)}, *args) == pytest.approx(d, rel=1e-12)
    assert _v2_residual({"text": (op.apply(W), None)}, *args) == pytest.approx(d, rel=1e-12)  # blind to it


def test_probe_measures_against_the_reference_and_survives_a_checkpoint(load_pipeline):
    pipe = load_pipeline("sd")
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    probe = TextSpaceProbe.from_result(result)
    metrics = probe.compute(result.operators)
    assert metrics == {**erasure_metrics(result), "concept_residual": metrics["concept_residual"]}
    assert metrics["erasure"] > metrics["collateral_near"] > 0 and 0 <= metrics["leakage"] <= 1
    # the reference outputs travel in a checkpoint: a fresh probe loaded from it measures the same
    fresh = TextSpaceProbe(result.layer_map, result.spaces, result.spec)  # reference: the erased weights
    assert fresh.compute()["erasure"] == 0.0
    fresh.load_state_dict(probe.state_dict())
    assert fresh.compute(result.operators) == metrics
    result.undo()
    # undone: the layers equal the reference again (rebuilt from the undo record in float64: to rounding)
    assert probe.compute()["erasure"] == pytest.approx(0.0, abs=1e-6)
