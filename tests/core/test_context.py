"""The concept's imprint on its context tokens (``context_expansion``): measured against the preserve concepts in the
same templates, erased as an erasure of its own on what the concept's erasure leaves (checked densely), left where
there is nothing to measure it against."""

import pytest
import torch

from ice_lightning.core.concepts import ConceptSpec, Prompt
from ice_lightning.core.context import context_shifts
from ice_lightning.core.plan import ErasurePlan
from ice_lightning.core.solver import ICEHyperParams, dissociation_operator
from ice_lightning.demos.tiny import build_tiny_pipeline

F64 = torch.float64


def test_each_row_is_a_prompts_context_tokens_minus_their_peers_mean_summed_over_the_prompt():
    # the tiny pipeline's CLIP is causal: the template's words before the concept never move, the words after it and
    # the end-of-text token do; one row per training template, the sum over its context tokens
    spec = ConceptSpec(erase=["Van Gogh"], family="style", preserve=["Claude Monet", "Rembrandt"],
                       templates=["{} style artwork", "a painting by {}"])  # fmt: skip
    space = ErasurePlan(build_tiny_pipeline("sd"), spec, verify=False).spaces["text"]

    def context(template: str, name: str, eot: bool) -> torch.Tensor:  # every state but the concept's own
        text = template.format(name)
        lo = template.index("{}")
        hi = lo + len(name)
        parts = [Prompt(text, (0, lo)), Prompt(text, (hi, len(text)))]
        return torch.cat([space.per_prompt([p], eot and i == 1)[0] for i, p in enumerate(parts)])

    def shift(template: str, eot: bool) -> torch.Tensor:
        peers = [context(template, p, eot) for p in spec.preserve]
        return (context(template, "Van Gogh", eot) - sum(peers) / len(peers)).sum(0)

    rows = context_shifts(space, spec)
    # "style" + "artwork"; "a painting by {}" has no context token that moves (nothing after the name): no row
    assert rows.dtype == F64 and rows.shape == (1, space.dim)
    assert torch.allclose(rows[0], shift("{} style artwork", False), atol=1e-12)
    assert float(shift("a painting by {}", False).norm()) < 1e-9
    with_eot = context_shifts(space, spec, include_eot=True)
    assert with_eot.shape == (2, space.dim)
    for i, template in enumerate(spec.templates):  # the end-of-text token adds its own shift to each prompt's sum
        assert torch.allclose(with_eot[i], shift(template, True), atol=1e-12)
        assert float((with_eot[i] - shift(template, False)).norm()) > 1e-3
    assert float(rows[0].norm()) > 1e-3  # a real shift, not rounding


def test_the_imprint_is_erased_as_its_own_erasure_on_what_the_concepts_erasure_leaves():
    pipe = build_tiny_pipeline("sd")
    spec = ConceptSpec(erase=["Van Gogh"], family="style", include_eot=True)
    plan = ErasurePlan(pipe, spec, hparams={"context_expansion": 3}, verify=False)
    op = plan.solve()["text"]
    plain_plan = ErasurePlan(pipe, spec, hparams={"context_expansion": 0}, verify=False)
    plain = plain_plan.solve()["text"]
    assert plain_plan.states()["text"].context is None  # off: nothing extra is encoded
    st = plan.states()["text"]
    assert torch.equal(st.context, context_shifts(plan.spaces["text"], spec, include_eot=True))
    D_c = dissociation_operator(st.context, st.preserve, ICEHyperParams(), E_base=st.base, erase_expansion=3).dense()
    eye = torch.eye(op.dim, dtype=F64)
    assert torch.allclose(op.dense(), eye - (eye - D_c) @ (eye - plain.dense()), atol=1e-9)  # D_c acts last
    assert float((op.dense() - plain.dense()).norm()) > 1e-3
    assert op.hparams["context_expansion"] == 3  # recorded with the operator (and so in the manifest)


def test_with_no_preserve_concept_the_context_is_left_and_the_user_told_why(caplog):
    pipe = build_tiny_pipeline("sd")
    spec = ConceptSpec(erase=["Van Gogh"], family="style", preserve=[], include_eot=True)
    with caplog.at_level("WARNING", logger="ice_lightning.core.plan"):
        plan = ErasurePlan(pipe, spec, hparams={"context_expansion": 3}, verify=False)
        op = plan.solve()["text"]
    assert "set context_expansion=0" in caplog.text and plan.states()["text"].context is None
    plain = ErasurePlan(pipe, spec, hparams={"context_expansion": 0}, verify=False).solve()["text"]
    assert torch.allclose(op.dense(), plain.dense(), atol=1e-12)
    with pytest.raises(ValueError, match="context_expansion must be >= 0"):
        ICEHyperParams(context_expansion=-1.0)


def test_the_context_costs_no_encoding_of_its_own():
    # the context sides are spans of the erase and preserve prompts: states() asks for every span of a text in one
    # call, so each text goes through the encoder once, with the context on as with it off
    spec = ConceptSpec(erase=["Van Gogh"], family="style", preserve=["Claude Monet"], generic_prompts=[],
                       templates=["{} style artwork", "a painting by {}"], include_eot=True)  # fmt: skip
    encoded, context = {}, None
    for expansion in (0, 3):
        pipe = build_tiny_pipeline("sd")  # a fresh pipeline: nothing kept from the other run
        seen: list[int] = []
        pipe.text_encoder.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(args[0].shape[0]))
        plan = ErasurePlan(pipe, spec, hparams={"context_expansion": expansion, "base_weight": 0}, verify=False)
        context = plan.states()["text"].context
        encoded[expansion] = sum(seen)
    assert encoded == {0: 4, 3: 4}  # 2 templates x (the concept + its peer)
    assert context is not None and context.shape[0] > 0
