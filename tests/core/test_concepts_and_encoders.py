"""Concept specs, token selection by offsets, and the embedding spaces of each pipeline family."""

import pytest
import torch

from ice_lightning.core.concepts import (
    DEFAULT_PRESERVE,
    DEFAULT_SYNONYMS,
    DEFAULT_TEMPLATES,
    EVAL_TEMPLATES,
    FAMILY_ANCHOR,
    FAMILY_TEMPLATES,
    NEUTRAL_WORD,
    ConceptSpec,
    Prompt,
)
from ice_lightning.core.encoders import _tokenize, select_tokens
from ice_lightning.core.parts import pipeline_spaces
from ice_lightning.demos.tiny_parts import TEXT_DIM, minilm_path, word_tokenizer


def test_prompts_carry_the_concept_span():
    spec = ConceptSpec(erase=["Van Gogh"], family="style", synonyms={"Van Gogh": ["Vincent van Gogh"]})
    prompts = spec.erase_prompts()
    assert {p.text[p.span[0] : p.span[1]] for p in prompts} == {"Van Gogh", "Vincent van Gogh"}
    assert all("Van Gogh" not in p for p in spec.preserve)
    assert spec.preserve == list(DEFAULT_PRESERVE["style"])
    generic = [p for p in spec.preserve_prompts() if p.span is None]
    assert generic and all(p.text for p in generic)
    # held-out templates are not the ones that build the operator
    assert not {p.text for p in spec.heldout_erase_prompts()} & {p.text for p in prompts}


def test_each_family_is_collected_in_every_familys_contexts_and_never_in_held_out_ones():
    named = [f for f in FAMILY_TEMPLATES if f != "custom"]
    every = {t for f in named for t in FAMILY_TEMPLATES[f]}
    for f in named:
        own = FAMILY_TEMPLATES[f]
        assert DEFAULT_TEMPLATES[f][: len(own)] == own  # its own contexts first, in their order
        assert set(DEFAULT_TEMPLATES[f]) == every and len(DEFAULT_TEMPLATES[f]) == len(every)  # no duplicate
        assert not set(DEFAULT_TEMPLATES[f]) & {t for g in named for t in EVAL_TEMPLATES[g]}
        assert len(ConceptSpec(erase=["x"], family=f).erase_prompts()) == len(every) + (
            len(DEFAULT_SYNONYMS.get(f, ())) * len(every))
    assert DEFAULT_TEMPLATES["custom"] == ("{}",)
    mine = ConceptSpec(erase=["zebra"], family="object", templates=["a zebra-like {} thing"])
    assert [p.text for p in mine.erase_prompts()] == ["a zebra-like zebra thing"]  # the user's own win, alone


def test_defaults_per_family_and_overrides():
    explicit = ConceptSpec(erase=["nudity"], family="explicit")
    assert set(DEFAULT_SYNONYMS["explicit"]) <= set(explicit.erase_names())
    assert "nudity" not in explicit.preserve
    bare = ConceptSpec(erase=["nudity"], family="explicit", use_default_synonyms=False)
    assert bare.erase_names() == ["nudity"]
    custom = ConceptSpec(erase=["zebra"], preserve=["horse"], templates=["a zebra-like {} thing"])
    assert [p.text for p in custom.erase_prompts()] == ["a zebra-like zebra thing"]
    assert ConceptSpec(erase=["Monet"], family="style").preserve == [
        p for p in DEFAULT_PRESERVE["style"] if p != "Monet"
    ]
    assert ConceptSpec(erase=["Claude Monet"], family="style").preserve.count("Claude Monet") == 0


def test_family_anchor_is_the_familys_generic_concept_and_never_the_metrics_neutral_word():
    for family, word in FAMILY_ANCHOR.items():
        spec = ConceptSpec(erase=["x"], family=family, anchor="family")
        assert spec.anchor == word and spec.to_dict()["anchor"] == word  # the manifest names the word itself
        assert spec.anchor_prompts()[0][1].text == DEFAULT_TEMPLATES[family][0].format(word)
        # the leakage metric and the red-team attacks score against NEUTRAL_WORD: a default guide onto that very
        # word would be scored on its own mapping
        assert word.casefold() != NEUTRAL_WORD[family].casefold()
    assert set(FAMILY_ANCHOR) == set(NEUTRAL_WORD) - {"custom"}
    with pytest.raises(ValueError, match="the 'custom' family has none: name the anchor"):
        ConceptSpec(erase=["zebra"], anchor="family")
    with pytest.raises(ValueError, match="the anchor 'art' is one of the erased concepts"):
        ConceptSpec(erase=["art"], family="style", anchor="family")


def test_token_selection_uses_offsets_on_a_real_wordpiece_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    for concept in ("Van Gogh", "Hokusai"):
        p = Prompt.fill("a painting by {} at dusk", concept)
        enc = _tokenize(tok, [p.text], 32)
        picked = select_tokens(enc, 0, p)
        assert tok.convert_ids_to_tokens(enc["input_ids"][0, picked].tolist()) == tok.tokenize(concept)
    assert len(tok.tokenize("Hokusai")) > 1  # word pieces of one word are all taken
    with_eot = select_tokens(enc, 0, p, include_eot=True)
    assert tok.convert_ids_to_tokens([enc["input_ids"][0, with_eot[-1]].item()]) == ["[SEP]"]
    whole = select_tokens(enc, 0, Prompt(p.text))
    assert len(whole) == len(tok.tokenize(p.text))  # every real token, no [CLS]/[SEP]/[PAD]


def test_word_tokenizer_template_tokens_are_not_selected():
    tok = word_tokenizer(style="clip")
    p = Prompt.fill("a painting by {}", "Van Gogh")
    enc = _tokenize(tok, [p.text], 16)
    picked = select_tokens(enc, 0, p, include_eot=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"][0, picked].tolist()) == ["van", "gogh", "</s>"]


@pytest.mark.parametrize(
    ("kind", "spaces"),
    [
        ("sd", {"text": TEXT_DIM}),
        ("sdxl", {"text": 2 * TEXT_DIM}),
        ("sd3", {"text": TEXT_DIM, "pooled": 2 * TEXT_DIM}),
        ("flux", {"text": TEXT_DIM, "pooled": TEXT_DIM}),
        ("wan", {"text": TEXT_DIM}),
        ("sd-minilm", {"text": 384}),
    ],
)
def test_embedding_spaces_follow_the_pipeline(kind, spaces, load_pipeline):
    pipe = load_pipeline(kind)
    got = pipeline_spaces(pipe)
    assert {name: s.dim for name, s in got.items()} == spaces
    prompts = [Prompt.fill("a painting by {}", "Van Gogh"), Prompt("a photo of a city street")]
    for name, space in got.items():
        rows = space.per_prompt(prompts)
        assert all(r.dtype == torch.float64 and r.shape[1] == spaces[name] for r in rows)
        if space.pooled:
            assert [r.shape[0] for r in rows] == [1, 1]
        else:
            assert rows[0].shape[0] >= 2 and rows[1].shape[0] >= 5
        again = space.per_prompt(prompts)  # cached: the very same tensors
        assert all(a is b for a, b in zip(rows, again, strict=True))


def test_sdxl_space_is_both_encoders_penultimate_states_concatenated(load_pipeline):
    pipe = load_pipeline("sdxl")
    p = Prompt.fill("a painting by {}", "Van Gogh")
    got = pipeline_spaces(pipe)["text"].token_states([p])
    ids = pipe.tokenizer(p.text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        h2 = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    want = torch.cat([h1, h2], -1)[0, 4:6].double()  # <s> a painting by [van gogh]
    assert torch.allclose(got, want, atol=1e-6)


ALL_KINDS = ["sd", "sdxl", "sd3", "flux", "pixart", "text2video", "animatediff", "cogvideox", "wan", "ltx"]


def _encode_prompt(pipe, prompt: Prompt) -> tuple:
    """The pipeline's own ``encode_prompt`` output for one prompt (its keywords, whichever the pipeline takes)."""
    import inspect

    wanted = {
        "prompt": prompt.text,
        "prompt_2": None,
        "prompt_3": None,
        "device": "cpu",
        "num_images_per_prompt": 1,
        "num_videos_per_prompt": 1,
        "do_classifier_free_guidance": False,
    }
    params = inspect.signature(pipe.encode_prompt).parameters
    return pipe.encode_prompt(**{k: v for k, v in wanted.items() if k in params})


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_states_are_what_the_pipeline_feeds_its_denoiser(kind, load_pipeline):
    """Every collected row must be a row of the pipeline's own ``encode_prompt`` output."""
    pipe = load_pipeline(kind)
    prompt = Prompt.fill("a painting by {}", "Van Gogh")
    out = _encode_prompt(pipe, prompt)
    embeds = {"text": out[0]}
    if kind == "flux":
        embeds["pooled"] = out[1]
    if kind == "sd3":
        embeds["pooled"] = out[2]
    spaces = pipeline_spaces(pipe)
    assert set(spaces) == set(embeds)
    for name, space in spaces.items():
        rows = space.token_states([prompt])
        ref = embeds[name].detach().reshape(-1, embeds[name].shape[-1]).double()
        dist = torch.cdist(rows, ref, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        assert rows.shape[0] >= 1 and torch.all(dist <= 1e-4 * ref.norm(dim=1).max()), (name, dist)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux", "cogvideox", "pixart", "ltx", "wan"])
def test_read_rows_are_every_position_the_denoiser_reads(kind, load_pipeline):
    """The broad preserve base's rows (``read_rows``): each of the pipeline's own rows for the prompt's tokens, its
    start and end-of-text tokens included, once; where the denoiser reads the padding, one row more, the padding
    positions' mean. Wan's pipeline zeroes the padding (nothing to read); PixArt's and LTX's denoisers mask it."""
    pipe = load_pipeline(kind)
    prompt = Prompt.fill("a painting by {}", "Van Gogh")
    ref = _encode_prompt(pipe, prompt)[0][0].detach().double()
    space = pipeline_spaces(pipe)["text"]
    (source,) = space.sources
    rows = space.read_rows([prompt])[0]
    assert source.reads_padding == (kind not in ("pixart", "ltx", "wan"))
    n = rows.shape[0] - source.reads_padding  # the prompt's positions come first, the padding's row last
    assert n >= 5  # <s> a painting by van gogh </s>
    assert torch.allclose(rows[:n], ref[:n], atol=1e-5)
    if source.reads_padding:
        assert torch.allclose(rows[n], ref[n:].mean(0), atol=1e-5)
    if kind == "wan":
        assert float(ref[n:].abs().max()) == 0.0
