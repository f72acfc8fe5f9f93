"""The shapes world's measurement protocol, the shipped models, the image-level attack and the main-job CLI."""

import re

import pytest
import torch
from helpers import changed, snapshot, warnings_of_ours

import ice_lightning
from ice_lightning.demos.shapes import COLOURS, MODELS_DIR, SHAPES, SYNONYMS
from ice_lightning.demos.shapes.evaluation import (
    ShapesPrompt,
    concept_spec,
    eval_prompts,
    evaluate,
    generate,
    guide_concept,
    guide_prompt,
    renders,
    retention,
    score,
)


def _exact(prompts, per: int, size: int = 24, frames: int = 0) -> torch.Tensor:
    """What a perfect model draws: ``per`` exact renders per prompt, in [0, 1] in the pipeline's layout."""
    x = torch.cat([renders(p, per, size, frames, seed=i) for i, p in enumerate(prompts)])
    x = (x + 1) / 2
    return x.transpose(1, 2) if frames else x  # clips: (N, F, 3, H, W) as the pipeline returns them


def test_eval_prompts_cover_every_combination_with_the_right_words():
    seen, para = eval_prompts(), eval_prompts(held_out=True)
    assert {(p.colour, p.shape) for p in seen} == {(c, s) for c in COLOURS for s in SHAPES} and len(seen) == 12
    for p in para:  # paraphrases name the colour with a held-out synonym only
        assert any(w in p.text for w in SYNONYMS[p.colour][1]), p.text
        assert not any(f" {w} " in f" {p.text} " for w in SYNONYMS[p.colour][0]), p.text
    video = eval_prompts(video=True)
    assert len(video) == 48 and {p.direction for p in video} == {"left", "right", "up", "down"}


@pytest.mark.parametrize("video", [False, True])
def test_score_counts_presence_accuracy_and_how_erasure_failed(video):
    size, frames = (16, 6) if video else (24, 0)
    prompts = eval_prompts(video=video)
    x = _exact(prompts, 2, size, frames)
    perfect = score(x, prompts, "red")
    assert perfect["presence"] == 1.0 and perfect["blank"] == 0.0 and perfect["garbled"] == 0.0
    assert set(perfect["accuracy"]) == {"green", "blue", "yellow", *SHAPES} | ({"left", "right", "up", "down"}
                                                                               if video else set())  # fmt: skip
    assert all(v == 1.0 for v in perfect["accuracy"].values())
    # red prompts now draw green (erased into something else) or nothing (erased into blanks), alternately
    red = [i for i, p in enumerate(prompts) if p.colour == "red"]
    for k, i in enumerate(red):
        for j in (2 * i, 2 * i + 1):
            if k % 2:
                x[j] = 0.9
            else:
                green = ShapesPrompt("", "green", prompts[i].shape, prompts[i].direction)
                x[j] = _exact([green], 1, size, frames)[0]
    erased = score(x, prompts, "red")
    assert erased["presence"] == 0.0
    replaced = sum(k % 2 == 0 for k in range(len(red))) / len(red)
    assert erased["erased_replaced"] == pytest.approx(replaced)
    assert erased["erased_blank"] == pytest.approx(1 - replaced)
    assert erased["accuracy"] == perfect["accuracy"]  # other prompts untouched
    assert retention(perfect, erased) == dict.fromkeys(perfect["accuracy"], 1.0)
    with pytest.raises(ValueError, match="do not split evenly"):
        score(x[:-1], prompts, "red")


def test_retention_rates_only_concepts_the_unedited_model_drew():
    before = {"accuracy": {"blue": 0.0, "green": 0.4, "square": 0.5, "up": 1.0}}
    after = {"accuracy": {"blue": 0.0, "green": 0.0, "square": 0.25, "up": 0.75}}
    assert retention(before, after) == {"square": 0.5, "up": 0.75}  # never drawn before: nothing to keep
    assert retention(before, after, min_before=0.4) == {"green": 0.0, "square": 0.5, "up": 0.75}
    with pytest.raises(ValueError, match=r"min_before .* must lie in \(0, 1\], got 0"):
        retention(before, after, min_before=0)


def test_concept_spec_erases_training_words_only_and_rejects_unknown_concepts():
    spec = concept_spec("red")
    assert spec.erase_names() == list(SYNONYMS["red"][0])
    assert not set(spec.erase_names()) & set(SYNONYMS["red"][1])  # paraphrases stay unseen
    assert {"green", "azure", "lemon"} <= set(spec.preserve) and "red" not in spec.preserve
    assert all("{}" in t for t in spec.templates)
    assert spec.anchor == "green" and concept_spec("yellow").anchor == "red"  # the next colour guides
    assert concept_spec("red", anchor=None).anchor is None
    circle = concept_spec("circle")
    assert circle.erase_names() == list(SYNONYMS["circle"][0]) and circle.anchor == "square"
    assert concept_spec("left", video=True).templates[0] == "a red circle {}"
    with pytest.raises(ValueError, match="unknown shapes concept 'purple'"):
        concept_spec("purple")
    with pytest.raises(ValueError, match="video=True"):
        concept_spec("left")


def _blank(text: str, word: str) -> str:
    """``text`` with ``word`` blanked and every article a plain "a"."""
    return re.sub(r"\ban\b", "a", re.sub(rf"\b{re.escape(word)}\b", "#", text))


def test_guide_prompt_swaps_the_concept_word_for_word_and_keeps_the_rest():
    assert guide_prompt(ShapesPrompt("a crimson disc", "red", "circle"), "red") == ShapesPrompt(
        "an emerald disc", "green", "circle")  # the synonym at the same place; the article follows it
    assert guide_prompt(ShapesPrompt("an emerald round dot", "green", "circle"), "circle").text == "an emerald block"
    assert guide_prompt(ShapesPrompt("a ruby ring", "red", "circle"), "circle").text == "a ruby quadrate"  # held out
    left = guide_prompt(ShapesPrompt("one blue box sliding to the left", "blue", "square", "left"), "left")
    assert left == ShapesPrompt("one blue box sliding to the right", "blue", "square", "right")
    for video in (False, True):
        for held_out in (False, True):
            for p in eval_prompts(video=video, held_out=held_out):
                for concept in filter(None, (p.colour, p.shape, p.direction)):
                    g, guide = guide_prompt(p, concept), guide_concept(concept)
                    assert g.asks_for(guide) and not g.asks_for(concept)
                    assert {g.colour, g.shape, g.direction} - {guide} == {p.colour, p.shape, p.direction} - {concept}
                    words = [pair for k in (0, 1)
                             for pair in zip(SYNONYMS[concept][k], SYNONYMS[guide][k], strict=True)]  # fmt: skip
                    assert any(_blank(p.text, w) == _blank(g.text, v) for w, v in words), (p, g)  # nothing else moved
    with pytest.raises(ValueError, match="does not ask for 'red'"):
        guide_prompt(ShapesPrompt("a green disc", "green", "circle"), "red")
    with pytest.raises(ValueError, match="names 'red' by none of its words"):
        guide_prompt(ShapesPrompt("a rosy disc", "red", "circle"), "red")


def test_embedding_attack_lowers_the_denoising_loss_within_its_budget():
    from diffusers import DDPMScheduler

    from ice_lightning.demos.shapes import new_pipeline
    from ice_lightning.evaluation.attacks import embedding_attack

    pipe = new_pipeline("shapes-image")
    prompt = ShapesPrompt("a red circle", "red", "circle")
    targets = renders(prompt, 16, 24)
    base = pipe.encode_prompt([prompt.text])[0]
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    attacked = embedding_attack(pipe.unet, pipe.scheduler, base, targets, steps=12, lr=0.05, batch_size=8,
                                budget=0.5)  # fmt: skip
    assert attacked.shape == base.shape and not attacked.requires_grad
    delta = (attacked - base).norm(dim=-1)
    assert (delta <= 0.5 * base.norm(dim=-1) + 1e-5).all() and delta.max() > 0
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in weights.items())  # denoiser untouched
    assert all(p.requires_grad for p in pipe.unet.parameters())

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(5)
    noise, t = torch.randn(targets.shape, generator=g), torch.randint(0, 1000, (16,), generator=g)
    noisy = sched.add_noise(targets, noise, t)

    def loss(e):
        with torch.no_grad():
            return float((pipe.unet(noisy, t, encoder_hidden_states=e.expand(16, -1, -1)).sample - noise).pow(2).mean())

    assert loss(attacked) < loss(base)


def _held_out_loss(pipe, targets, batch_size: int, seed: int):
    """The attack's own held-out batch (``seed + 10_000``): the loss its restarts are judged on."""
    from ice_lightning.core.architectures import denoise
    from ice_lightning.evaluation.attacks import _training_batch

    g = torch.Generator().manual_seed(seed + 10_000)
    noisy, t, target = _training_batch(pipe.scheduler, targets, batch_size, g)

    def loss(e):
        with torch.no_grad():
            return float((denoise(pipe.unet, noisy, t, e.expand(batch_size, -1, -1)).float() - target).pow(2).mean())

    return loss


def test_embedding_attack_restarts_keep_the_best_run_within_the_budget():
    from ice_lightning.demos.shapes import new_pipeline
    from ice_lightning.evaluation.attacks import embedding_attack

    pipe = new_pipeline("shapes-image")
    prompt = ShapesPrompt("a red circle", "red", "circle")
    targets = renders(prompt, 16, 24)
    base = pipe.encode_prompt([prompt.text])[0]
    kw = {"steps": 6, "lr": 0.05, "batch_size": 8, "budget": 0.3, "seed": 3}
    once = embedding_attack(pipe.unet, pipe.scheduler, base, targets, **kw)
    assert torch.equal(embedding_attack(pipe.unet, pipe.scheduler, base, targets, restarts=1, **kw), once)
    best = embedding_attack(pipe.unet, pipe.scheduler, base, targets, restarts=3, **kw)
    loss = _held_out_loss(pipe, targets, 8, 3)
    assert loss(best) <= loss(once) + 1e-9
    assert ((best - base).norm(dim=-1) <= 0.3 * base.norm(dim=-1) + 1e-5).all()  # random starts stay in budget
    with pytest.raises(ValueError, match="restarts"):
        embedding_attack(pipe.unet, pipe.scheduler, base, targets, restarts=0)


def test_discrete_attack_prepends_words_that_lower_the_diffusion_loss():
    from ice_lightning.core.architectures import denoise
    from ice_lightning.demos.shapes import new_pipeline
    from ice_lightning.evaluation.attacks import _training_batch, attack_words, discrete_attack

    pipe = new_pipeline("shapes-image")
    prompt = ShapesPrompt("a red circle", "red", "circle")
    targets = renders(prompt, 16, 24)
    words = attack_words(pipe.tokenizer, ["red"], 40, seed=0)
    assert len(words) == 40 and "red" not in words
    encode = lambda texts: pipe.encode_prompt(texts)[0]  # noqa: E731
    found, found_loss = discrete_attack(pipe.unet, pipe.scheduler, encode, prompt.text, targets, words, length=2,
                                        candidates=6, batch_size=8, seed=1)  # fmt: skip
    prefix = found.removesuffix(" " + prompt.text).split()
    assert found.endswith(" a red circle") and len(prefix) == 2 and set(prefix) <= set(words)
    noisy, t, target = _training_batch(pipe.scheduler, targets, 8, torch.Generator().manual_seed(1))

    def loss(text):
        with torch.no_grad():
            return float((denoise(pipe.unet, noisy, t, encode([text]).expand(8, -1, -1)).float() - target).pow(2)
                         .mean())  # fmt: skip

    assert found_loss == pytest.approx(loss(found), rel=1e-5)  # scored on one fixed batch
    singles = sorted(words, key=lambda w: loss(f"{w} {prompt.text}"))
    assert found_loss <= loss(" ".join([*singles[:2], prompt.text])) + 1e-7  # never worse than where it starts
    with pytest.raises(ValueError, match="no words"):
        discrete_attack(pipe.unet, pipe.scheduler, encode, prompt.text, targets, [])


shipped = pytest.mark.skipif(not (MODELS_DIR / "shapes-image" / "unet").is_dir(), reason="no shipped image model")


@pytest.mark.slow
@shipped
def test_shipped_image_model_draws_what_it_is_asked_and_ice_erases_red():
    pipe = ice_lightning.demos.shapes.load_shapes_pipeline("shapes-image")
    before = evaluate(pipe, "red", samples=4, seed=0, steps=10)  # 10 DDIM steps: rates as at 20, half the time
    colour = [before["seen"]["accuracy"][c] for c in COLOURS if c != "red"]
    shape = [before["seen"]["accuracy"][s] for s in SHAPES]
    assert before["seen"]["presence"] >= 0.9 and min(colour) >= 0.9, before["seen"]
    assert sum(shape) / len(shape) >= 0.8, before["seen"]
    weights = snapshot(pipe)
    result = ice_lightning.erase(pipe, spec=concept_spec("red"))
    after = evaluate(pipe, "red", samples=4, seed=0, steps=10)
    for split in ("seen", "paraphrase"):
        assert after[split]["presence"] <= 0.05, (split, after[split])
        kept = retention(before[split], after[split])
        assert min(kept.values()) >= 0.9, (split, kept)
    result.undo()
    assert not changed(weights, pipe)  # exact undo, bit for bit: the seeded samples and rates are before's again


CLIP_ACCURACY_BEFORE = 0.9  # the seeded square prompts: colours and directions 1.00 when shipped (1 clip, 10 steps)
shipped_video = pytest.mark.skipif(not (MODELS_DIR / "shapes-video" / "unet").is_dir(), reason="no shipped video model")


@pytest.mark.slow
@shipped_video
def test_shipped_video_model_draws_colour_shape_and_direction_and_ice_erases_left():
    """Seeded clips of the 16 square prompts (4 colours x 4 directions, one clip each, 10 DDIM steps): the model
    draws the colour, the shape and which way it moves; after ICE erases "left" no clip of its prompts moves left
    and every other concept keeps its accuracy."""
    pipe = ice_lightning.demos.shapes.load_shapes_pipeline("shapes-video")
    assert type(pipe.unet).__name__ == "UNetSpatioTemporalConditionModel" and pipe.video
    prompts = [p for p in eval_prompts(video=True, seed=0) if p.shape == "square"]
    before = score(generate(pipe, [p.text for p in prompts], samples=1, seed=0, steps=10), prompts, "left")
    assert before["presence"] >= CLIP_ACCURACY_BEFORE and before["accuracy"]["square"] >= 0.8, before
    assert min(before["accuracy"][c] for c in (*COLOURS, "right", "up", "down")) >= CLIP_ACCURACY_BEFORE, before
    result = ice_lightning.erase(pipe, spec=concept_spec("left", video=True))
    after = score(generate(pipe, [p.text for p in prompts], samples=1, seed=0, steps=10), prompts, "left")
    result.undo()
    assert after["presence"] <= 0.05, after
    kept = retention(before, after)
    assert min(kept.values()) >= 0.9, (before, after)


@pytest.mark.slow
@shipped
def test_main_job_command_erases_red_writes_the_grid_and_warns_of_nothing_of_ours(tmp_path, capfd):
    import warnings

    from PIL import Image

    from ice_lightning.cli import main
    from ice_lightning.core.export import verify_export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["erase", "--erase", "red", "--out", str(tmp_path / "no-red"), "--samples", "1"]) == 0
    printed = capfd.readouterr()
    ours = warnings_of_ours(caught, printed.err + printed.out)
    assert not ours, "warnings from ice-lightning's own calls:\n" + "\n".join(ours)
    out = printed.out
    assert "'red' present on its prompts" in out and "seen before" in out and "paraphrase after" in out
    assert "accuracy of 'green'" in out and "blank, other prompts" in out
    grid = Image.open(tmp_path / "no-red" / "before_after.png")
    assert grid.size[0] > 300 and grid.size[1] > 6 * 96
    assert all(verify_export(str(tmp_path / "no-red")).values())
