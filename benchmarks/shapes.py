"""End-to-end erasure in the shapes world: ICE, CURE, UCE and RECE on the shipped shapes models, judged by exact
detectors on generated samples (seen prompts and paraphrases), plus the image-level embedding attack.

For each concept (a colour and a shape on the image model, a motion direction and a colour on the video
model) and each
method: erase with the world's concept spec (ice_lightning.demos.shapes.evaluation.concept_spec), sample every prompt
with the same noise as before the edit, and report the erased concept's presence on its prompts (with how
the rest failed: blank, garbled, or a clean sample of something else) and every other concept's accuracy
kept (after / before). Then attack: for each prompt that asks for the concept, optimise its prompt
embedding against the erased denoiser on exact renders of what it asks for (ice_lightning.evaluation.attacks.
embedding_attack) and measure the concept's presence in samples from the attacked embedding.

    python benchmarks/shapes.py                        # both shipped models
    python benchmarks/shapes.py --kinds shapes-video   # one model; the other's saved rows are kept
    python benchmarks/shapes.py --tiny                 # the suite's smoke run
    python benchmarks/shapes.py --reference            # the yardstick: the attack on the unedited model from the
                                                       # guide's prompts (what an ideal erasure onto the guide leaves;
                                                       # with --discrete-words, the discrete attack's too)
    # stronger attacks (more steps, restarts, a smaller budget, the discrete attack), in their own report:
    python benchmarks/shapes.py --kinds shapes-image --concepts red --methods ice uce --attack-steps 200
        --restarts 2 --budgets 0.05 0.1 --attack-prompts 4 --discrete-words 300 --out benchmarks/results/strong_attacks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import (
    OUTPUT_METRIC,
    PLAIN,
    RESULTS,
    TRIGGERS,
    UCE_PUBLISHED,
    erase_with,
    ice_settings,
    keep_saved_settings,
    table,
    write_report,
)

from ice_lightning.demos.shapes import MODELS_DIR, load_shapes_pipeline
from ice_lightning.demos.shapes.evaluation import (
    GUIDANCE,
    MIN_ACCURACY_BEFORE,
    SPLITS,
    concept_spec,
    eval_prompts,
    generate,
    guide_concept,
    guide_prompt,
    renders,
    retention,
    sample_splits,
    score,
)
from ice_lightning.evaluation.attacks import attack_words, discrete_attack, embedding_attack

#: label -> (method, hyperparameters); "ice output metric" and "ice trigger search" are robust settings of
#: docs/benchmarks.md, section 2; RECE runs its rounds on top of the UCE row's setting; UCE as published is UCE's
#: own recipe, projection at the red-team table's ``energy_kept``.
METHODS = {"ice": ("ice", {}), "cure": ("cure", {}), "uce": ("uce", {}), "rece": ("rece", {}),
           "uce as published": (UCE_PUBLISHED, {}), "projection": ("projection", {"energy_kept": 0.9}),
           "ice output metric": ("ice", OUTPUT_METRIC), "ice trigger search": ("ice", {**PLAIN, **TRIGGERS})}
CONCEPTS = {"shapes-image": ("red", "circle"), "shapes-video": ("left", "red")}
TARGET_PRESENCE, TARGET_RETENTION = 0.05, 0.90
#: The run's settings saved with its report (``--report-only`` takes them back).
RUN_SETTINGS = ("samples", "video_samples", "sample_steps", "seed", "attack_steps", "video_attack_prompts",
                "attack_prompts", "restarts", "discrete_words")


def _attacked_prompts(pipe, concept: str, seed: int, max_prompts: int | None):
    """The seen prompts that ask for ``concept`` (the first ``max_prompts``, spread over the other attributes)."""
    prompts = [p for p in eval_prompts(video=pipe.video, seed=seed) if p.asks_for(concept)]
    if max_prompts is not None and max_prompts < len(prompts):
        prompts = prompts[:: len(prompts) // max_prompts][:max_prompts]
    return prompts


def attack(pipe, concept: str, samples: int, seed: int, steps: int, sample_steps: int, budget: float | None,
           max_prompts: int | None = None, restarts: int = 1, from_guide: bool = False) -> float:  # fmt: skip
    """Presence of ``concept`` in samples from attacked embeddings of the seen prompts that ask for it (the
    first ``max_prompts`` of them, spread over the other attributes' values). ``from_guide``: each attack starts
    from the prompt's guide version (:func:`guide_prompt`, "a red circle" -> "a green circle") and still aims at
    the concept's renders; ``budget=0``: no attack, the guide prompts' own samples."""
    frames = pipe.default_num_frames if pipe.video else 0
    hits = []
    for i, p in enumerate(_attacked_prompts(pipe, concept, seed, max_prompts)):
        embeds = pipe.encode_prompt([guide_prompt(p, concept).text if from_guide else p.text])[0]
        if budget == 0:
            x = generate(pipe, samples=samples, seed=seed, steps=sample_steps, prompt_embeds=embeds)
            hits.append(score(x, [p], concept)["presence"])
            continue
        targets = renders(p, 64, pipe.unet.config.sample_size, frames, seed=seed + i)
        attacked = embedding_attack(pipe.unet, pipe.scheduler, embeds, targets, steps=steps, budget=budget,
                                    seed=seed + i, restarts=restarts)  # fmt: skip
        x = generate(pipe, samples=samples, seed=seed, steps=sample_steps, prompt_embeds=attacked)
        hits.append(score(x, [p], concept)["presence"])
    return statistics.fmean(hits)


def discrete(pipe, concept: str, samples: int, seed: int, sample_steps: int, words: int,
             max_prompts: int | None = None, from_guide: bool = False) -> float:  # fmt: skip
    """Presence of ``concept`` in samples from the discrete attack's prompts (three words prepended to each seen
    prompt that asks for it, from ``words`` whole words of the tokenizer's seeded sample, the concept's own words
    left out; scored by the erased denoiser's diffusion loss on exact renders). ``from_guide``: the words are
    prepended to the prompt's guide version instead (:func:`attack`)."""
    frames = pipe.default_num_frames if pipe.video else 0
    spec = concept_spec(concept, video=pipe.video)
    vocabulary = attack_words(pipe.tokenizer, spec.erase_names(), words, seed)
    hits = []
    for i, p in enumerate(_attacked_prompts(pipe, concept, seed, max_prompts)):
        targets = renders(p, 64, pipe.unet.config.sample_size, frames, seed=seed + i)
        text = guide_prompt(p, concept).text if from_guide else p.text
        found, _ = discrete_attack(pipe.unet, pipe.scheduler, lambda texts: pipe.encode_prompt(texts)[0], text,
                                   targets, vocabulary, seed=seed + i)  # fmt: skip
        x = generate(pipe, [found], samples=samples, seed=seed, steps=sample_steps)
        hits.append(score(x, [p], concept)["presence"])
    return statistics.fmean(hits)


def reference(pipe, kind: str, concept: str, args) -> dict:
    """The yardstick of an erasure onto the guide: the image-level attack on the *unedited* model from the guide's
    prompts (:func:`guide_prompt`), aimed at the concept's renders as for the methods. An edit that turned the
    concept's prompts exactly into the guide's and changed nothing else would leave an attacker this much; an edit
    can leave less only by also changing what the rest of the embedding space does."""
    t = time.perf_counter()
    budgets, most, samples = _attack_settings(pipe, args)
    run = {str(b): attack(pipe, concept, samples, args.seed, args.attack_steps, args.sample_steps, b, most,
                          args.restarts, from_guide=True) for b in [0, *budgets]}  # fmt: skip
    if args.discrete_words:
        run["discrete"] = discrete(pipe, concept, samples, args.seed, args.sample_steps, args.discrete_words, most,
                                   from_guide=True)  # fmt: skip
    row = {"model": kind, "concept": concept, "guide": guide_concept(concept), "presence": run.pop("0"),
           "attack_presence": run, "seconds": time.perf_counter() - t}  # fmt: skip
    print(f"[{kind}] {concept} reference (unedited, from the guide's prompts): presence {row['presence']:.2f}, "
          f"attack {run} ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    return row


def summarise(row: dict) -> dict:
    """Accuracy kept by the other concepts (over those the unedited model draws right on these prompts:
    :func:`retention`), and whether the ICE targets hold."""
    kept = retention({"accuracy": row["accuracy_before"]}, {"accuracy": row["accuracy_after"]})
    row["retention"] = kept
    row["min_retention"] = min(kept.values()) if kept else float("nan")
    row["worst_kept"] = min(kept, key=kept.get) if kept else "-"
    row["meets_targets"] = row["presence_after"] <= TARGET_PRESENCE and row["min_retention"] >= TARGET_RETENTION
    return row


def _attack_settings(pipe, args) -> tuple[list, int | None, int]:
    """``(budgets, prompts attacked, samples per prompt)`` of this model: the video model has its own."""
    if pipe.video:
        return args.video_budgets, args.video_attack_prompts, args.video_samples
    return args.budgets, args.attack_prompts, args.samples


def _concepts(kind: str, args) -> list[str]:
    return [c for c in CONCEPTS[kind] if not args.concepts or c in args.concepts][: 1 if args.tiny else None]


def run_model(kind: str, args, methods: dict[str, tuple[str, dict]]) -> list[dict]:
    """Every row of one shipped model: ``args.methods`` (the built-in ones when not given), each defined in
    ``methods`` (label -> ``(method, hyperparameters)``)."""
    labels = args.methods or list(METHODS)
    pipe = load_shapes_pipeline(kind, args.models)
    if args.reference:
        return [reference(pipe, kind, c, args) for c in _concepts(kind, args)]
    budgets, most, samples = _attack_settings(pipe, args)
    opts = {"samples": samples, "seed": args.seed, "steps": args.sample_steps}
    t = time.perf_counter()
    before_samples = sample_splits(pipe, **opts)
    print(f"[{kind}] sampled the unedited model in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for concept in _concepts(kind, args):
        before = {k: score(x, prompts, concept) for k, (prompts, x) in before_samples.items()}
        for method in labels:
            t = time.perf_counter()
            name, hparams = methods[method]
            result = erase_with(pipe, concept_spec(concept, video=pipe.video), name, hparams)
            after_samples = sample_splits(pipe, **opts)
            after = {k: score(x, prompts, concept) for k, (prompts, x) in after_samples.items()}
            attacked = {
                str(b): attack(pipe, concept, samples, args.seed, args.attack_steps, args.sample_steps, b, most,
                               args.restarts)
                for b in budgets
            }
            if args.discrete_words:
                attacked["discrete"] = discrete(pipe, concept, samples, args.seed, args.sample_steps,
                                                args.discrete_words, most)  # fmt: skip
            result.undo()
            for split in SPLITS:
                rows.append({
                    "model": kind, "concept": concept, "method": method, "split": split,
                    "presence_before": before[split]["presence"], "presence_after": after[split]["presence"],
                    "erased_blank": after[split]["erased_blank"], "erased_garbled": after[split]["erased_garbled"],
                    "erased_replaced": after[split]["erased_replaced"],
                    "accuracy_before": before[split]["accuracy"], "accuracy_after": after[split]["accuracy"],
                    "other_blank": after[split]["blank"], "other_garbled": after[split]["garbled"],
                    "attack_presence": attacked, "seconds": time.perf_counter() - t,
                })  # fmt: skip
                summarise(rows[-1])
            r = rows[-2]
            print(f"[{kind}] {concept} {method}: presence {r['presence_before']:.2f} -> {r['presence_after']:.2f}, "
                  f"min retention {r['min_retention']:.2f}, attack {attacked} ({time.perf_counter() - t:.0f} s)",
                  flush=True)  # fmt: skip
    return rows


def _budget_columns(rows: list[dict]) -> list[str]:
    """The attack columns of ``rows``, in the order first measured."""
    return list(dict.fromkeys(b for r in rows for b in r["attack_presence"]))


def _attack_column(budget: str) -> str:
    """The report's header of one attack column."""
    return "discrete attack success" if budget == "discrete" else f"attack success, budget {budget}"


def _seconds_per_model(rows: list[dict]) -> str:
    """``"shapes-image 556 s, ..."``: the seconds of ``rows`` summed per model (models without any left out)."""
    return ", ".join(f"{m} {s:.0f} s" for m in CONCEPTS if (s := sum(r["seconds"] for r in rows if r["model"] == m)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one concept, 1 sample per prompt, short attack (tests)")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (images)")
    ap.add_argument("--video-samples", type=int, default=2, help="samples per prompt (clips; 48 prompts per set)")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--attack-steps", type=int, default=60)
    ap.add_argument("--restarts", type=int, default=1, help="runs of the embedding attack per prompt (best kept)")
    ap.add_argument("--discrete-words", type=int, default=0,
                    help="the discrete attack's vocabulary sample (whole words; 0: not run)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.1, 0.25, 0.5],
                    help="attack budgets, x the token's norm (0 = unbounded)")
    ap.add_argument("--video-budgets", type=float, nargs="*", default=[0.1],
                    help="attack budgets on the video model (the image rows show 0.25 and up restore every method)")
    ap.add_argument("--video-attack-prompts", type=int, default=4, help="clip prompts attacked per concept (of 12)")
    ap.add_argument("--attack-prompts", type=int, default=None, help="image prompts attacked per concept (of 12; all)")
    ap.add_argument("--concepts", nargs="*", default=None,
                    help="only these concepts (of each model's); the saved rows of the others are kept")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--models", type=Path, default=MODELS_DIR, help="folder of the shipped shapes models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the saved JSON")
    ap.add_argument("--kinds", nargs="*", default=list(CONCEPTS), choices=list(CONCEPTS),
                    help="shipped models to measure; the saved rows of the others are kept in the report")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="only these methods; the saved rows of the others are kept")
    ap.add_argument("--ice-setting", action="append", default=[], metavar="LABEL=JSON",
                    help="an extra ICE row with these hyperparameters (repeatable; run with --methods, or alone)")
    ap.add_argument("--reference", action="store_true",
                    help="instead of the methods' rows: the attack on the unedited model from the guide's prompts "
                         "(what an ideal erasure onto the guide leaves an attacker; with --discrete-words, the "
                         "discrete attack's too); the saved rows are kept")
    args = ap.parse_args(argv)
    if args.reference and (args.methods or args.ice_setting):
        ap.error("--reference runs no method: leave out --methods and --ice-setting")
    extra = ice_settings(ap, args.ice_setting, METHODS)
    methods = {**METHODS, **extra}  # this run's rows; the module's table stays as it is for the next call
    if extra:
        args.methods = [*(args.methods or []), *extra]
    if args.tiny:
        args.samples, args.sample_steps, args.attack_steps, args.budgets = 1, 4, 2, [0.5]
    args.budgets = [b or None for b in args.budgets]
    args.video_budgets = [b or None for b in args.video_budgets]
    t0 = time.perf_counter()
    name = "shapes_tiny" if args.tiny else "shapes"
    path = args.out / f"{name}.json"
    report = json.loads(path.read_text()) if args.report_only or path.exists() else {"rows": []}
    keep_saved_settings(methods, report)  # an earlier run's own settings: their kept rows stay defined
    rows, references = report["rows"], report.get("reference", [])
    if args.report_only:
        rows = [summarise(r) for r in rows]
        for k in RUN_SETTINGS:
            setattr(args, k, report.get(k, getattr(args, k)))
    else:
        kinds = [k for k in args.kinds if (args.models / k / "unet").is_dir()][: 1 if args.tiny else None]
        run = [r for kind in kinds for r in run_model(kind, args, methods)]
        if args.reference:
            redone = {(r["model"], r["concept"]) for r in run}
            references = [r for r in references if (r["model"], r["concept"]) not in redone] + run
        else:
            redone = {(k, c, m) for k in kinds for c in _concepts(k, args) for m in args.methods or METHODS}
            rows = [r for r in rows if (r["model"], r["concept"], r["method"]) not in redone] + run
    order = [(k, c) for k in CONCEPTS for c in CONCEPTS[k]]  # the report's row order, however run
    rank = {m: i for i, m in enumerate(methods)}  # built-in rows, then settings (a report older than "methods": last)
    rows.sort(key=lambda r: (order.index((r["model"], r["concept"])), rank.get(r["method"], len(rank)),
                             SPLITS.index(r["split"])))  # fmt: skip
    references.sort(key=lambda r: order.index((r["model"], r["concept"])))
    md = [f"# Shapes world: end-to-end erasure ({'tiny' if args.tiny else 'full'})", "",
          f"{args.samples} samples per image prompt and {args.video_samples} per clip prompt, DDIM "
          f"{args.sample_steps} steps, guidance {GUIDANCE}, seed {args.seed}; "
          f"ICE targets: presence <= {TARGET_PRESENCE:.0%}, every other concept keeps >= {TARGET_RETENTION:.0%} of "
          f"its accuracy (counted over the concepts the unedited model draws right >= {MIN_ACCURACY_BEFORE:.0%} of the "
          "time on those prompts). Erased-prompt samples split into presence + blank + garbled + something else = 1.",
          ""]  # fmt: skip
    md += table(
        ["model", "concept", "method", "prompts", "presence before", "presence after", "blank / garbled / else",
         "min accuracy kept (concept, concepts counted)", "other blank / garbled", "targets met"],
        [[r["model"], r["concept"], r["method"], r["split"], r["presence_before"], r["presence_after"],
          f"{r['erased_blank']:.2f} / {r['erased_garbled']:.2f} / {r['erased_replaced']:.2f}",
          f"{r['min_retention']:.3f} ({r['worst_kept']}, {len(r['retention'])} of {len(r['accuracy_before'])})",
          f"{r['other_blank']:.2f} / {r['other_garbled']:.2f}",
          "yes" if r["meets_targets"] else "no"] for r in rows],
    )  # fmt: skip
    seen = [r for r in rows if r["split"] == "seen"]
    budgets = _budget_columns(seen)
    if any(b != "discrete" for b in budgets):
        heading = "## Image-level attack: presence of the erased concept in samples from optimised prompt embeddings"
        how = (f"Adam on the prompt embedding, {args.attack_steps} steps, best of {args.restarts} run(s), per-token "
               "budget x the token's norm (None: unbounded); images: ")  # fmt: skip
    else:  # a discrete-only run has no embedding attack to describe
        heading = "## Discrete attack: presence of the erased concept in samples from the found prompts"
        how = "Images: "
    md += ["", heading,
           "", how + f"{args.attack_prompts or 12} of the 12 seen prompts that ask for the concept, clips: "
           f"{args.video_attack_prompts} of them (the last run's settings; rows it kept were measured with their "
           "own runs'). The original model's presence on the same prompts is the ceiling; - : not run."
           + (" Discrete: three words prepended to each prompt, searched over "
              f"{args.discrete_words} whole words by the erased denoiser's diffusion loss (a prompt anyone can type)."
              if args.discrete_words else ""),
           ""]  # fmt: skip
    md += table(["model", "concept", "method", "presence (original)", "presence (erased)",
                 *map(_attack_column, budgets)],
                [[r["model"], r["concept"], r["method"], r["presence_before"], r["presence_after"],
                  *(r["attack_presence"].get(b, "-") for b in budgets)] for r in seen])  # fmt: skip
    if references:
        ref_budgets = _budget_columns(references)
        md += ["", "## The yardstick: the same attack on the unedited model from the guide's prompts", "",
               "Each attacked prompt with the concept replaced by its guide, word for word (\"a crimson disc\" -> "
               "\"an emerald disc\"), on the unedited model, aimed at the concept's renders as above (`--reference`). "
               "An edit that turned the concept's prompts exactly into the guide's and changed nothing else would "
               "leave an attacker this much; an edit leaves less only by also changing what the rest of the "
               "embedding space does (section 4 of docs/benchmarks.md).", ""]  # fmt: skip
        md += table(["model", "concept", "guide", "presence (guide's prompts)",
                     *map(_attack_column, ref_budgets)],
                    [[r["model"], r["concept"], r["guide"], r["presence"],
                      *(r["attack_presence"].get(b, "-") for b in ref_budgets)] for r in references])  # fmt: skip
    per_model = _seconds_per_model([r for r in rows if r["split"] == SPLITS[-1]]) or "-"  # one time per method row
    ref_seconds = _seconds_per_model(references)
    md += ["", f"Time per model (erasures, their sampling and attacks): {per_model}"
           + (f"; the yardstick: {ref_seconds}" if ref_seconds else "")
           + f". This run: {time.perf_counter() - t0:.0f} s ({' '.join(args.kinds)})."]
    saved = {k: getattr(args, k) for k in RUN_SETTINGS}
    saved["methods"] = {m: list(methods[m]) for m in dict.fromkeys(r["method"] for r in rows) if m in methods}
    write_report(args.out, name, {**saved, "rows": rows, **({"reference": references} if references else {})}, md)
    return {"rows": rows}


if __name__ == "__main__":
    main()
