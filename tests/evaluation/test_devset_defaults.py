"""The defaults on the development set with the real MiniLM encoder: a regression in erasure, paraphrase erasure,
locality or leakage fails here (numbers measured by ``benchmarks/tradeoff.py``, ``docs/benchmarks.md`` section 1)."""

import statistics

import pytest

import ice_lightning
from ice_lightning.demos.tiny import build_tiny_pipeline
from ice_lightning.evaluation.devset import DEV_SET, dev_concepts
from ice_lightning.evaluation.metrics import dev_concept_metrics

pytestmark = pytest.mark.slow

#: family -> (erasure, paraphrase, collateral_near, collateral_far, leakage) measured at the defaults (2026-12-06 19:10
#: UTC, each family collected in every family's templates, the context erasure summed over each prompt and the hardening
#: within a collateral budget; on the family's own templates leakage was 0.419 / 0.169 / 0.106 / 0.487, with per-token
#: context rows 0.431 / 0.175 / 0.113 / 0.481, before the hardening erasure was 0.865 / 0.911 / 0.898 / 0.850 and
#: leakage 0.450 / 0.244 / 0.138 / 0.550, before the context erasure leakage was 0.569 / 0.463 / 0.181 / 0.756: the
#: erasure and leakage pins below fail without either).
MEASURED = {
    "style": (0.893, 0.177, 0.198, 0.086, 0.412),
    "object": (0.992, 0.288, 0.246, 0.080, 0.150),
    "identity": (0.950, 0.169, 0.225, 0.080, 0.106),
    "explicit": (0.908, 0.459, 0.218, 0.092, 0.469),
}
#: family -> collateral_far_read, the unrelated prompts at every position the denoiser reads (2026-12-07 23:40 UTC;
#: before the broad preserve base held the start and end-of-text tokens and the padding: 0.096 / 0.087 / 0.083 / 0.100,
#: so the pins below fail without them).
MEASURED_FAR_READ = {"style": 0.077, "object": 0.070, "identity": 0.069, "explicit": 0.079}
METRICS = ("erasure", "paraphrase", "collateral_near", "collateral_far", "collateral_far_read", "leakage")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd-minilm")


def _per_concept(pipe, concepts, **hparams) -> list[dict[str, float]]:
    per = []
    for c in concepts:
        result = ice_lightning.erase(pipe, spec=c.spec(), verify=False, **hparams)
        per.append(dev_concept_metrics(result, c))
        result.undo()
    return per


def _means(per: list[dict[str, float]]) -> dict[str, float]:
    return {m: statistics.fmean(p[m] for p in per) for m in METRICS}


@pytest.mark.parametrize("family", list(DEV_SET))
def test_defaults_hold_erasure_paraphrases_and_locality(pipe, family):
    per = _per_concept(pipe, dev_concepts(family))
    got = _means(per)
    erasure, paraphrase, near, far, leakage = MEASURED[family]
    print(family, {k: round(v, 3) for k, v in got.items()})
    assert got["erasure"] >= erasure - 0.02
    assert got["paraphrase"] >= paraphrase - 0.02
    assert got["collateral_near"] <= near + 0.02
    assert got["collateral_far"] <= far + 0.01
    assert got["collateral_far_read"] <= MEASURED_FAR_READ[family] + 0.01
    assert got["leakage"] <= leakage + 0.03  # the held-out prompts as a whole, context tokens included
    # the broad preserve base is what keeps unrelated prompts: without it they move more (on the family's first two
    # concepts, 0.021-0.042 more far collateral on 2026-12-06)
    without = _means(_per_concept(pipe, dev_concepts(family)[:2], base_weight=0.0))
    assert _means(per[:2])["collateral_far"] <= without["collateral_far"] - 0.01
