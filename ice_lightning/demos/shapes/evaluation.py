"""Measuring the shapes world end to end: evaluation prompts, seeded sampling, detection rates, the concept
specs that erase a colour, shape or motion, and before/after image grids.

The protocol (used by ``ice-lightning erase``, ``benchmarks/shapes.py`` and the tests):

- prompts: one caption per (colour, shape[, direction]) combination, from the training templates with the
  training synonyms (``held_out=False``, "seen") or with the held-out synonyms (``held_out=True``,
  "paraphrases": "a ruby disk" asks for a red circle with words the model never saw in training);
- samples: ``samples`` per prompt, 20 DDIM steps with classifier-free guidance :data:`GUIDANCE`, noise
  from one seeded generator in a fixed order, so two models evaluated with the same seed see the same
  noise (paired comparisons);
- scores: on prompts that ask for the erased concept, its **presence** (the detector finds it) and how the
  other samples fail (``blank``, ``garbled``, or a clean sample of something else); on every other prompt,
  the **accuracy** of each remaining concept (a colour's accuracy: colour right on prompts asking for it).

Example:
    >>> from ice_lightning.demos.shapes.evaluation import eval_prompts, concept_spec
    >>> [p.text for p in eval_prompts(held_out=True)][:2]
    ['a picture of a ruby disk', 'one ruby quadrate']
    >>> concept_spec("red").erase_names()
    ['red', 'crimson', 'scarlet']
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ...core.concepts import ConceptSpec
from ...core.preview import png_bytes, render_grid
from .metrics import AttributeAccuracy, ConceptPresenceRate, FailureRate
from .world import (
    ATTRIBUTES,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SYNONYMS,
    TEMPLATES,
    VIDEO_TEMPLATES,
    attribute_of,
    detect,
    place,
    render,
    render_clip,
    with_articles,
)

__all__ = [
    "ShapesPrompt",
    "attribute_of",
    "eval_prompts",
    "generate",
    "score",
    "sample_splits",
    "evaluate",
    "format_report",
    "grid_rows",
    "renders",
    "guide_concept",
    "guide_prompt",
    "concept_spec",
    "retention",
    "MIN_ACCURACY_BEFORE",
    "ShapesProbe",
    "ShapesEraseReport",
]

#: Classifier-free guidance of every shapes-world measurement: the small pixel models draw clean, on-palette
#: samples at 1-2 and drift off-palette above 2 (measured on the shipped image model).
GUIDANCE = 1.5


@dataclass(frozen=True)
class ShapesPrompt:
    """A prompt and what it asks for."""

    text: str
    colour: str
    shape: str
    direction: str | None = None

    def asks_for(self, concept: str) -> bool:
        return concept in (self.colour, self.shape, self.direction)


def eval_prompts(video: bool = False, held_out: bool = False, seed: int = 0) -> list[ShapesPrompt]:
    """One prompt per (colour, shape[, direction]): a template and synonyms drawn by a seeded RNG, from the
    training synonyms or (``held_out``) the held-out ones."""
    rng = random.Random(seed * 7919 + int(held_out))
    pick = 1 if held_out else 0
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            for direction in DIRECTIONS if video else (None,):
                c, s = rng.choice(SYNONYMS[colour][pick]), rng.choice(SYNONYMS[shape][pick])
                if direction is None:
                    text = with_articles(rng.choice(TEMPLATES).format(c=c, s=s))
                else:
                    d = rng.choice(SYNONYMS[direction][pick])
                    text = with_articles(rng.choice(VIDEO_TEMPLATES).format(c=c, s=s, d=d))
                out.append(ShapesPrompt(text, colour, shape, direction))
    return out


@torch.no_grad()
def generate(pipe, prompts: list[str] | None = None, samples: int = 8, seed: int = 0, steps: int = 20,
             guidance: float = GUIDANCE, batch_size: int = 96,
             prompt_embeds: Tensor | None = None) -> Tensor:  # fmt: skip
    """``samples`` samples per prompt (prompt-major order) in [0, 1]: images (N, 3, H, W) or clips
    (N, F, 3, H, W). Pass ``prompt_embeds`` (one row per prompt) instead of ``prompts`` to sample from
    embeddings (the image-level attack)."""
    if prompt_embeds is None:
        prompt_embeds = pipe.encode_prompt(prompts, num_images_per_prompt=1)[0]
    embeds = prompt_embeds.repeat_interleave(samples, 0)
    negative = pipe.encode_prompt([""], num_images_per_prompt=1)[0]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, embeds.shape[0], batch_size):
        chunk = embeds[i : i + batch_size]
        res = pipe(None, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                   prompt_embeds=chunk, negative_prompt_embeds=negative.expand(len(chunk), -1, -1),
                   output_type="pt")  # fmt: skip
        out.append(res.frames if pipe.video else res.images)
    return torch.cat(out)


def score(samples: Tensor, prompts: list[ShapesPrompt], erased: str | None = None) -> dict:
    """Detection rates of ``samples`` (``len(samples) / len(prompts)`` per prompt, prompt-major).

    Returns ``accuracy`` per concept (its attribute right, on prompts that ask for it and not for
    ``erased``), ``blank``/``garbled`` on those other prompts, and, when ``erased`` is given, on its prompts:
    ``presence`` (the erased concept detected) and, splitting the rest, ``erased_blank``, ``erased_garbled``
    and ``erased_replaced`` (a clean sample without the concept: erased into something else, not into
    nothing); the four add up to 1.
    """
    per = len(samples) // len(prompts)
    if per * len(prompts) != len(samples):
        raise ValueError(f"{len(samples)} samples do not split evenly over {len(prompts)} prompts")
    groups: dict[str, list[int]] = {"erased": [], "other": []}
    for i, p in enumerate(prompts):
        groups["erased" if erased is not None and p.asks_for(erased) else "other"] += range(i * per, (i + 1) * per)
    targets = [p for p in prompts for _ in range(per)]
    out: dict = {"accuracy": {}}
    other = groups["other"]
    for concept, attribute in ATTRIBUTES.items():
        idx = [i for i in other if targets[i].asks_for(concept)]
        if concept == erased or not idx:
            continue
        acc = AttributeAccuracy(attribute)
        acc.update(samples[idx], [getattr(targets[i], attribute) for i in idx])
        out["accuracy"][concept] = float(acc.compute())
    for status in ("blank", "garbled"):
        fail = FailureRate(status)
        fail.update(samples[other])
        out[status] = float(fail.compute())
    if erased is not None:
        idx = groups["erased"]
        presence = ConceptPresenceRate(attribute_of(erased), erased)
        presence.update(samples[idx])
        out["presence"] = float(presence.compute())
        statuses = [detect(samples[i]) for i in idx]
        out["erased_blank"] = sum(d.status == "blank" for d in statuses) / len(idx)
        absent = [d for d in statuses if getattr(d, attribute_of(erased)) != erased]
        out["erased_garbled"] = sum(d.status == "garbled" for d in absent) / len(idx)
        out["erased_replaced"] = sum(d.status == "ok" for d in absent) / len(idx)
    return out


#: The two prompt sets of every report: training synonyms ("seen") and held-out synonyms ("paraphrase").
SPLITS = ("seen", "paraphrase")


def sample_splits(pipe, samples: int = 8, seed: int = 0, steps: int = 20, guidance: float = GUIDANCE,
                  splits: tuple[str, ...] = SPLITS) -> dict[str, tuple[list[ShapesPrompt], Tensor]]:  # fmt: skip
    """``{split: (prompts, samples)}`` for the seen and paraphrase prompt sets, same noise for every model."""
    out = {}
    for split in splits:
        prompts = eval_prompts(video=pipe.video, held_out=split == "paraphrase", seed=seed)
        out[split] = (prompts, generate(pipe, [p.text for p in prompts], samples, seed, steps, guidance))
    return out


def evaluate(pipe, erased: str | None = None, samples: int = 8, seed: int = 0, steps: int = 20,
             guidance: float = GUIDANCE) -> dict[str, dict]:  # fmt: skip
    """``{split: score}``: :func:`score` of ``samples`` per prompt on the seen and paraphrase prompt sets."""
    splits = sample_splits(pipe, samples, seed, steps, guidance)
    return {k: score(x, prompts, erased) for k, (prompts, x) in splits.items()}


def format_report(concept: str, before: dict[str, dict], after: dict[str, dict]) -> str:
    """Before/after table of an erasure in the shapes world (``before``/``after``: :func:`evaluate` output
    scored with ``erased=concept``)."""
    splits = [s for s in SPLITS if s in after]
    rows = [(f"{concept!r} present on its prompts", "presence")]
    rows += [("  ... blank / garbled / something else", None)]
    rows += [(f"accuracy of {c!r}", ("accuracy", c)) for c in after[splits[0]]["accuracy"]]
    rows += [("blank, other prompts", "blank"), ("garbled, other prompts", "garbled")]

    def get(d: dict, key) -> str:
        if key is None:
            return f"{d['erased_blank']:.2f}/{d['erased_garbled']:.2f}/{d['erased_replaced']:.2f}"
        v = d[key[0]][key[1]] if isinstance(key, tuple) else d[key]
        return f"{v:.3f}"

    width = max(len(r[0]) for r in rows)
    head = "".join(f"  {s + ' before':>17}  {s + ' after':>16}" for s in splits)
    lines = [f"{'':<{width}}{head}", "-" * (width + 37 * len(splits))]
    for label, key in rows:
        cells = "".join(f"  {get(before[s], key):>17}  {get(after[s], key):>16}" for s in splits)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def grid_rows(prompts: list[ShapesPrompt], before: Tensor, after: Tensor, concept: str, n_prompts: int = 3,
              n_samples: int = 4) -> list[tuple[str, Tensor, Tensor]]:  # fmt: skip
    """Rows for :func:`~ice_lightning.core.preview.render_grid`: ``n_prompts`` prompts that ask for ``concept`` and
    as many that do not."""
    per = len(before) // len(prompts)
    asks = [i for i, p in enumerate(prompts) if p.asks_for(concept)][:n_prompts]
    rest = [i for i, p in enumerate(prompts) if not p.asks_for(concept)][::4][:n_prompts]
    return [(prompts[i].text, before[i * per : i * per + n_samples], after[i * per : i * per + n_samples])
            for i in asks + rest]  # fmt: skip


#: A concept the unedited model draws right less often than this on a prompt set has no accuracy there to keep: its
#: retention is not rated (at 0 before, ``after / before`` would read a concept never drawn as one the edit broke).
MIN_ACCURACY_BEFORE = 0.5


def retention(before: dict, after: dict, min_before: float = MIN_ACCURACY_BEFORE) -> dict[str, float]:
    """Accuracy kept by each remaining concept: ``after / before`` (1.0 = untouched), over the concepts that the
    unedited model drew right at least ``min_before`` of the time (the others are left out, not scored 0)."""
    if not 0 < min_before <= 1:
        raise ValueError(f"min_before (the least accuracy before the edit that is rated) must lie in (0, 1], got "
                         f"{min_before!r}")
    return {c: after["accuracy"][c] / b for c, b in before["accuracy"].items()
            if c in after["accuracy"] and b >= min_before}  # fmt: skip


def renders(prompt: ShapesPrompt, n: int, size: int, frames: int = 0, seed: int = 0) -> Tensor:
    """``n`` exact renders of what ``prompt`` asks for, in the denoiser's layout and range: images
    (n, 3, H, W) or clips (n, 3, F, H, W), in [-1, 1] (the targets of the image-level attack)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        spec, _ = place(prompt.colour, prompt.shape, size, frames, rng, prompt.direction)
        x = render_clip(spec, prompt.direction, frames, size).transpose(0, 1) if frames else render(spec, size)
        out.append(x * 2 - 1)
    return torch.stack(out)


def guide_concept(concept: str) -> str:
    """The default guide (anchor) of ``concept``: the next value of the same attribute (red -> green,
    circle -> square, left -> right; the last wraps to the first)."""
    values = [c for c, a in ATTRIBUTES.items() if a == attribute_of(concept)]
    return values[(values.index(concept) + 1) % len(values)]


def guide_prompt(prompt: ShapesPrompt, concept: str) -> ShapesPrompt:
    """``prompt`` with ``concept`` replaced by its guide (:func:`guide_concept`), word for word: the synonym at the
    same place of the guide's list ("a crimson disc" -> "an emerald disc", "a ruby box" -> "a jade box"). What an
    ideal erasure onto the guide would turn ``prompt`` into, and nothing else (the image-level attack's yardstick in
    ``benchmarks/shapes.py --reference``).

    >>> guide_prompt(ShapesPrompt("a crimson disc", "red", "circle"), "red")
    ShapesPrompt(text='an emerald disc', colour='green', shape='circle', direction=None)
    """
    attribute, guide = attribute_of(concept), guide_concept(concept)
    if not prompt.asks_for(concept):
        raise ValueError(f"{prompt.text!r} does not ask for {concept!r}: only its prompts have a guide's version")
    for held_out in (0, 1):
        words = SYNONYMS[concept][held_out]
        for i in sorted(range(len(words)), key=lambda i: -len(words[i])):  # "round dot" before "dot"
            pattern = rf"\b{re.escape(words[i])}\b"
            if re.search(pattern, prompt.text):
                text = re.sub(pattern, SYNONYMS[guide][held_out][i], prompt.text, count=1)
                text = with_articles(re.sub(r"\b([Aa])n\b", r"\1", text))  # the article follows the new word
                return dataclasses.replace(prompt, text=text, **{attribute: guide})
    raise ValueError(f"{prompt.text!r} names {concept!r} by none of its words {SYNONYMS[concept]}")


def concept_spec(concept: str, video: bool = False, preserve_all: bool = True,
                 anchor: str | None = "default") -> ConceptSpec:  # fmt: skip
    """The spec that erases a shapes concept: the concept and its *training* synonyms (the held-out ones
    stay unseen, so paraphrase results measure generalisation) in every caption context of the world, with
    the other values of the same attribute preserved in the same contexts.

    ``anchor``: the guide concept the erased one is mapped to (``"default"``: :func:`guide_concept`;
    ``None``: none). The shipped image model draws red in about a quarter of the samples of a prompt that
    names no colour (its prior), so removing the word alone leaves red at that rate; a guide is what brings
    the concept's presence near zero, and the reports count such samples as "something else".
    """
    attribute = attribute_of(concept)
    others = [c for c, a in ATTRIBUTES.items() if a == attribute and c != concept]
    if attribute == "colour":
        contexts = [t.format(c="{}", s=s) for t in TEMPLATES[:2] for shape in SHAPES for s in SYNONYMS[shape][0]]
    elif attribute == "shape":
        contexts = [t.format(c=c, s="{}") for t in TEMPLATES[:2] for col in COLOURS for c in SYNONYMS[col][0][:1]]
    else:
        if not video:
            raise ValueError(f"{concept!r} is a motion direction: erase it from the video model (video=True)")
        contexts = [t.format(c=c, s=s, d="{}") for t in VIDEO_TEMPLATES[:2] for col in COLOURS
                    for c in SYNONYMS[col][0][:1] for shape in SHAPES for s in SYNONYMS[shape][0][:1]]  # fmt: skip
    names = SYNONYMS[concept][0]
    preserve = [w for o in others for w in SYNONYMS[o][0]] if preserve_all else others
    guide = guide_concept(concept) if anchor == "default" else anchor
    if guide is not None and guide in SYNONYMS:
        guide = SYNONYMS[guide][0][0]
    return ConceptSpec(erase=[names[0]], synonyms={names[0]: list(names[1:])}, preserve=preserve,
                       templates=contexts, anchor=guide)  # fmt: skip


class ShapesProbe(Callback):
    """Measure a shapes concept on generated samples at the start of fitting and after every training
    epoch: its presence on the prompts that ask for it and the mean accuracy of every other concept (seen
    prompts, same noise each time). Logs ``shapes/presence_<concept>`` and ``shapes/accuracy_others`` and
    keeps ``history`` (one dict per measurement). Put it *after* an ``ICECallback`` in the callback list so
    that it measures the model as re-erased.

    ``splits`` adds ``"paraphrase"`` (``presence_paraphrase``: on prompts that ask for the concept with held-out
    words, "a ruby disc") and ``"unnamed"`` (``presence_unnamed``: the concept's share of the samples of prompts
    that name only a shape, "a circle"): a fine-tune on data that shows the concept without naming it teaches
    it back there first.

    Example:
        >>> probe = ShapesProbe("red", samples=4)
        >>> probe.history
        []
    """

    def __init__(self, concept: str, samples: int = 8, seed: int = 0, steps: int = 20,
                 splits: tuple[str, ...] = ("seen",)) -> None:  # fmt: skip
        attribute_of(concept)
        unknown = set(splits) - {"seen", "paraphrase", "unnamed"}
        if unknown or "seen" not in splits:
            raise ValueError(f"splits must include 'seen' and may add 'paraphrase' and 'unnamed', got {splits}")
        if "unnamed" in splits and attribute_of(concept) != "colour":
            raise ValueError(f"the 'unnamed' split (prompts that name only a shape) measures a colour, not {concept!r}")
        self.concept, self.samples, self.seed, self.steps = concept, samples, seed, steps
        self.splits = tuple(splits)
        self.history: list[dict] = []

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        from ...lightning.callback import find_pipeline

        pipe = find_pipeline(pl_module)
        was_training = pipe.unet.training
        pipe.unet.eval()
        try:
            prompts = eval_prompts(video=pipe.video, seed=self.seed)
            x = generate(pipe, [p.text for p in prompts], self.samples, self.seed, self.steps)
            extra = {}
            if "paraphrase" in self.splits:
                held = eval_prompts(video=pipe.video, held_out=True, seed=self.seed)
                xh = generate(pipe, [p.text for p in held], self.samples, self.seed, self.steps)
                extra["presence_paraphrase"] = score(xh, held, self.concept)["presence"]
            if "unnamed" in self.splits:
                texts = [t.format(s=w) for shape in SHAPES for w in SYNONYMS[shape][0][:2]
                         for t in ("a {s}", "one {s}")]  # fmt: skip
                xu = generate(pipe, texts, self.samples, self.seed, self.steps)
                presence = ConceptPresenceRate(attribute_of(self.concept), self.concept)
                presence.update(xu)
                extra["presence_unnamed"] = float(presence.compute())
        finally:
            pipe.unet.train(was_training)
        s = score(x, prompts, self.concept)
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "presence": s["presence"],
               "accuracy_others": sum(s["accuracy"].values()) / len(s["accuracy"]), "accuracy": s["accuracy"],
               "erased_blank": s["erased_blank"], "blank": s["blank"], **extra}  # fmt: skip
        self.history.append(row)
        return row

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        row = self.measure(trainer, pl_module)
        pl_module.log(f"shapes/presence_{self.concept}", row["presence"])
        pl_module.log("shapes/accuracy_others", row["accuracy_others"])

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


class ShapesEraseReport:
    """The shapes world's report for ``ice-lightning erase`` (registered as its erase report): the world's concept
    spec, before/after detection rates of generated samples (seen prompts and paraphrases) and a before/after image
    grid shipped in the export (see :class:`~ice_lightning.core.pipelines.EraseReport`)."""

    def __init__(self, pipe, samples: int = 4, seed: int = 0) -> None:
        self.pipe, self.samples, self.seed = pipe, samples, seed
        self._before: dict | None = None

    def concept_spec(self, erase: list[str], preserve: list[str] | None = None, anchor: str | None = None,
                     templates: list[str] | None = None, include_eot: bool = False, **_) -> ConceptSpec:  # fmt: skip
        """The world's spec for the one concept (its training synonyms, every caption context, the next value as
        guide); the preserve set, templates and anchor the user gave win, and ``include_eot`` is the user's (the
        concept family is the world's own)."""
        if len(erase) != 1:
            raise ValueError(f"the shapes world report erases one concept at a time, got {erase}")
        world = concept_spec(erase[0], video=self.pipe.video, anchor=anchor or "default")
        return ConceptSpec(erase=world.erase, preserve=preserve or world.preserve, anchor=world.anchor,
                           templates=templates or world.templates, synonyms=world.synonyms,
                           include_eot=include_eot)  # fmt: skip

    def _sample(self, when: str) -> dict:
        from ...core.progress import pipeline_bar_config

        self.pipe.set_progress_bar_config(**pipeline_bar_config(f"sampling {when} the edit"))
        return sample_splits(self.pipe, samples=self.samples, seed=self.seed)

    def before(self) -> None:
        self._before = self._sample("before")

    def after(self, result) -> tuple[str, dict[str, bytes]]:
        after = self._sample("after")
        concept = result.spec.erase[0]
        scores = [{k: score(x, prompts, concept) for k, (prompts, x) in d.items()} for d in (self._before, after)]
        prompts, x0 = self._before["seen"]
        png = png_bytes(render_grid(grid_rows(prompts, x0, after["seen"][1], concept), scale=4))
        text = (f"detection on {self.samples} samples per prompt (seed {self.seed}); guide concept (anchor): "
                f"{result.spec.anchor!r}\n{format_report(concept, *scores)}")  # fmt: skip
        return text, {"before_after.png": png}
