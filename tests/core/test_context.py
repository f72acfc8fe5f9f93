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


def test_each_row_is_a_context_tokens_state_minus_its_peers_mean_at_the_same_position():
    # the tiny pipeline's CLIP is causal: the template's words before the concept never move (their rows are dropped),
    # the words after it and the end-of-text token do
    spec = ConceptSpec(erase=["Van Gogh"], family="style", preserve=["Claude Monet", "Rembrandt"],
                       templates=["{} style artwork", "a painting by {}"])  # fmt: skip
    space = ErasurePlan(build_tiny_pipeline("sd"), spec, verify=False).spaces["text"]

    def after(name: str, eot: bool) -> torch.Tensor:  # the states after the concept (and the end-of-text token)
        text = f"{name} style artwork"
        return space.per_prompt([Prompt(text, (len(name), len(text)))], eot)[0]

    def peers_mean(eot: bool) -> torch.Tensor:
        return (after("Claude Monet", eot) + after("Rembrandt", eot)) / 2

    rows = context_shifts(space, spec)
    assert rows.dtype == F64 and rows.shape == (2, space.dim)  # "style", "artwork"
    assert torch.allclose(rows, after("Van Gogh", False) - peers_mean(False), atol=1e-12)
    with_eot = context_shifts(space, spec, include_eot=True)
    eot_rows = []
    for template in spec.templates:  # the end-of-text token moves in every template
        text = [template.format(n) for n in ("Van Gogh", "Claude Monet", "Rembrandt")]
        eot = [space.per_prompt([Prompt(t, (len(t), len(t)))], True)[0] for t in text]
        eot_rows.append(eot[0] - (eot[1] + eot[2]) / 2)
    assert with_eot.shape == (2 + 2, space.dim)
    assert torch.allclose(with_eot[:3], after("Van Gogh", True) - peers_mean(True), atol=1e-12)
    assert torch.allclose(with_eot[3], eot_rows[1][0], atol=1e-12)
    assert float(rows.norm(dim=1).min()) > 1e-3  # a real shift, not rounding


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
