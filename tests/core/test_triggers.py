"""Trigger discovery as a defence: the search's own vocabulary slice and objective, and the erasure of what it finds
(composed after the concept's, checked densely)."""

import pytest
import torch

import ice_lightning
from ice_lightning.core.concepts import FAMILY_TEMPLATES, NEUTRAL_WORD, ConceptSpec, Prompt
from ice_lightning.core.plan import ErasurePlan
from ice_lightning.core.solver import ICEHyperParams, dissociation_operator, needs_gram
from ice_lightning.core.triggers import TriggerSearch, _scorer, find_triggers, vocabulary_slice, whole_words
from ice_lightning.demos.tiny import build_tiny_pipeline
from ice_lightning.demos.tiny_parts import word_tokenizer

F64 = torch.float64
SEARCH = {"trigger_rounds": 1}


def test_the_vocabulary_slice_is_a_salted_order_of_whole_words():
    tok = word_tokenizer(["van", "gogh", "painter", "sky", "boat", "ab", "x1", "Paris", *(f"w{c}ord" for c in "abc")])
    words = whole_words(tok)
    assert {"van", "gogh", "painter", "sky", "boat"} <= words
    assert not {"ab", "x1", "Paris", "<unk>", "</s>"} & words  # short, non-alphabetic, capitalised, special
    first = vocabulary_slice(tok, ["Gogh"], 1000)
    assert "gogh" not in first and set(first) <= words
    assert vocabulary_slice(tok, ["Gogh"], 1000) == first  # deterministic
    assert vocabulary_slice(tok, ["Gogh"], 3) == first[:3]
    assert vocabulary_slice(tok, ["Gogh"], 1000, salt="another") != first  # the salt orders it
    with pytest.raises(ValueError, match="positive integer"):
        TriggerSearch(pool=0)


def _plan(hparams):
    pipe = build_tiny_pipeline("sd")
    spec = ConceptSpec(erase=["Van Gogh"], family="style")
    return pipe, spec, ErasurePlan(pipe, spec, hparams=hparams, verify=False)


def test_the_found_words_are_erased_as_their_own_erasure_composed_after_the_concepts():
    _, spec, plan = _plan(SEARCH)
    op = plan.solve()["text"]
    found = plan.triggers["text"]
    templates = spec._templates()
    assert len(found) == len(templates)  # one prompt per (erase concept, training template)
    _, _, plain_plan = _plan({})
    plain = plain_plan.solve()["text"]
    st, space = plan.states()["text"], plan.spaces["text"]
    # the prompts the search reports, with the searched words as the concept's span
    prompts = [Prompt.fill(t, f[len(t.split("{}")[0]) : len(f) - len(t.split("{}")[1])]) for t, f in
               zip(templates, found, strict=True)]  # fmt: skip
    assert [p.text for p in prompts] == found
    words = {w for p in prompts for w in p.text[p.span[0] : p.span[1]].split()}
    assert words <= set(vocabulary_slice(space._tokenizers()[0][0], ["van", "gogh"], TriggerSearch.pool))
    rows = space.token_states(prompts)
    hp = ICEHyperParams()
    D_t = dissociation_operator(rows, st.preserve, hp, E_base=st.base, erase_expansion=hp.trigger_expansion).dense()
    eye = torch.eye(op.dim, dtype=F64)
    expected = eye - (eye - plain.dense()) @ (eye - D_t)
    assert torch.allclose(op.dense(), expected, atol=1e-9)
    assert float((op.dense() - plain.dense()).norm()) > 1e-3


def test_erasing_the_found_prompts_lowers_their_score_against_the_edited_layers():
    """The search's objective, ``cos_G((I - D) x_p - x_n, x_c - x_n)``, for the prompts it found against the plain
    edit, before and after they were erased (the edited layers no longer move them towards the concept)."""
    _, spec, plan = _plan(SEARCH)
    op = plan.solve()["text"]
    _, _, plain_plan = _plan({})
    plain = plain_plan.solve()["text"]
    space, G = plan.spaces["text"], plan.grams()["text"]
    found = find_triggers(space, spec, plain, G)
    assert [p.text for p in found] == plan.triggers["text"]  # deterministic: the plan's search is this one
    before, after = [], []
    for t, p in zip(spec._templates(), found, strict=True):
        x = torch.stack([r.mean(0) for r in space.per_prompt([Prompt(p.text)])])
        n = space.per_prompt([Prompt.fill(t, NEUTRAL_WORD["style"])])[0].mean(0)
        c = space.per_prompt([Prompt.fill(t, "Van Gogh")])[0].mean(0)
        for D, out in ((plain, before), (op, after)):
            out.append(float(_scorer(G, c - n, n, lambda X, D=D: X - (X @ D.U) @ (D.M.T @ D.U.T))(x)[0]))
    assert sum(after) < sum(before) - 0.05, (before, after)


def test_trigger_rounds_reach_the_result_and_the_manifest_and_are_checked():
    pipe = build_tiny_pipeline("sd")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    own = list(FAMILY_TEMPLATES["style"])  # one search per training template: the family's own six keep it short
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", verify=False, trigger_rounds=1,
                                 templates=own)  # fmt: skip
    manifest = result.to_manifest()
    assert manifest["hparams"]["trigger_rounds"] == 1
    assert manifest["triggers"] == result.triggers and len(result.triggers["text"]) == len(own) == 6
    assert result.timings["trigger_search_s"] > 0
    result.undo()
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert needs_gram("ice", SEARCH) and not needs_gram("ice", {"harden_rounds": 0})
    assert "triggers" not in ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", verify=False).to_manifest()
    for bad, match in (({"trigger_rounds": -1}, "trigger_rounds"), ({"trigger_rounds": 1.5}, "integer"),
                       ({"trigger_expansion": 0}, "trigger_expansion")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ICEHyperParams(**bad)
