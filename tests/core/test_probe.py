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


def test_concept_residual_is_the_mean_relative_response_along_the_erased_directions():
    g = torch.Generator().manual_seed(1)
    E_e, E_p = torch.randn(6, 8, generator=g, dtype=F64), torch.randn(20, 8, generator=g, dtype=F64)
    op = dissociation_operator(E_e, E_p)
    W, b = torch.randn(5, 8, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    c = torch.randn(9, 8, generator=g, dtype=F64)
    got = concept_residual({"l": (W, b)}, {"l": "text"}, {"text": c}, {"text": op})
    D = op.dense()
    expected = ((W @ D @ c.T).T.norm(dim=1) / (c @ W.T + b).norm(dim=1)).mean()
    assert got == pytest.approx(float(expected), rel=1e-10)
    edited = concept_residual({"l": (op.apply(W), b)}, {"l": "text"}, {"text": c}, {"text": op})
    assert edited < got  # the edit lowers the response along what it removed


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
