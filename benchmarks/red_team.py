"""Text-space red-teaming of ICE (default, without its context erasure, hardened, in the output metric, its adversary
at a fixed strength or within a collateral budget, with the trigger search), CURE, UCE, RECE and projection on the
development set (real MiniLM encoder).

For every development concept, erase it with each method and run the package's attacks
(``ice_lightning.evaluation.RedTeam``): paraphrases, Ring-A-Bell (concept vector + discrete search; a second,
held-out search with another vocabulary slice and concept-vector strength) and the white-box RECE-style closed
form at several norm budgets. Each edit's erasure and collateral on the same concept are reported beside. A success
rate is the share of (held-out pair, layer) where the attacked output is closer to the original concept's than to
the neutral prompt's; the ``original`` column is the same attack on the unedited model (its ceiling).

    python benchmarks/red_team.py [--tiny] [--out benchmarks/results] [--methods LABEL ...] [--ice-setting LABEL=JSON]
                                  [--ring-cache FILE]

The Ring-A-Bell prompts depend only on the text encoder, the concept and the search's settings, not on the edit, so
one search per concept serves every row. ``--ring-cache FILE`` keeps them between runs too (a JSON file, created if
missing, keyed by concept and search settings): comparing ICE settings then takes about a tenth of the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    ADVERSARY_BUDGET,
    FIXED,
    OUTPUT_ADVERSARY,
    OUTPUT_METRIC,
    PLAIN,
    RESULTS,
    TRIGGERS,
    ice_settings,
    minilm_pipeline,
    table,
    write_report,
)

import ice_lightning  # noqa: E402
from ice_lightning.core.concepts import Prompt  # noqa: E402
from ice_lightning.core.progress import progress  # noqa: E402
from ice_lightning.evaluation.attacks import RedTeam, RingABellConfig  # noqa: E402
from ice_lightning.evaluation.baselines import uce_as_published  # noqa: E402
from ice_lightning.evaluation.devset import DEV_SET, dev_concepts  # noqa: E402
from ice_lightning.evaluation.metrics import dev_concept_metrics  # noqa: E402

#: Each method at a setting of similar collateral on held-out nearby concepts (benchmarks/tradeoff.py).
METHODS = {
    "ICE": ("ice", {}),
    "ICE without hardening": ("ice", PLAIN),  # the default until its hardening (2026-12-06)
    "ICE without context": ("ice", {**PLAIN, "context_expansion": 0}),  # the default before context erasure
    "ICE hardened": ("ice", {"harden_rounds": 3, **FIXED}),
    "ICE output metric": ("ice", OUTPUT_METRIC),
    "ICE output-metric adversary": ("ice", OUTPUT_ADVERSARY),
    "ICE adversary within a budget": ("ice", ADVERSARY_BUDGET),
    "ICE trigger search": ("ice", {**PLAIN, **TRIGGERS}),
    "ICE output metric + triggers": ("ice", {**OUTPUT_METRIC, **TRIGGERS}),
    "CURE": ("cure", {}),
    "UCE": ("uce", {"lam": 30.0}),
    "UCE as published": ("uce_published", {}),
    "RECE": ("rece", {"lam": 30.0}),
    "projection": ("projection", {"energy_kept": 0.9}),
}
BUDGETS = (0.25, 0.5, 1.0)
#: The ``--tiny`` run's search (tests): a small vocabulary, two words, one sweep.
TINY_RING = RingABellConfig(pool=60, candidates=6, length=2, sweeps=1)
#: Rows that say what each edit costs (relative output change), so attack rows compare at known collateral.
QUALITY = ("erasure", "collateral_near", "collateral_far")


def held_out_search(ring: RingABellConfig) -> RingABellConfig:
    """A second Ring-A-Bell search no defence ran or was tuned on: another vocabulary slice (seed), a stronger
    concept vector, three words."""
    return replace(ring, seed=ring.seed + 7, eta=1.5, length=3)


def _cache_key(concept, ring: RingABellConfig) -> str:
    return f"{concept.name} | {ring!r}"


def _load_prompts(cache: dict, concept, ring: RingABellConfig) -> dict[str, list[Prompt]] | None:
    found = cache.get(_cache_key(concept, ring))
    return {s: [Prompt(t, (lo, hi)) for t, lo, hi in ps] for s, ps in found.items()} if found else None


def _store_prompts(cache: dict, concept, ring: RingABellConfig, prompts: dict[str, list[Prompt]]) -> None:
    cache[_cache_key(concept, ring)] = {s: [[p.text, *p.span] for p in ps] for s, ps in prompts.items()}


def _read_cache(ap, path: Path | None) -> dict:
    """The cache file's prompts; a file that is not one is refused before anything is written to it."""
    if path is None or not path.exists():
        return {}
    try:
        cache = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        ap.error(f"--ring-cache {path} is not a Ring-A-Bell prompt cache ({err}); name a new file")
    ours = isinstance(cache, dict) and all(" | RingABellConfig(" in k and isinstance(v, dict) for k, v in cache.items())
    if not ours:
        ap.error(f"--ring-cache {path} is not a Ring-A-Bell prompt cache; name a new file")
    return cache


def attack_concept(pipe, concept, ring: RingABellConfig, budgets=BUDGETS, labels=tuple(METHODS),
                   cache: dict | None = None) -> dict[str, dict]:  # fmt: skip
    """Every method's attack rates on ``concept``; ``cache`` (``{key: prompts}``, updated in place) holds the
    Ring-A-Bell prompts of earlier runs."""
    out: dict[str, dict[str, float]] = {}
    cache = {} if cache is None else cache
    held_out_ring = held_out_search(ring)
    ring_prompts, held_out_prompts = _load_prompts(cache, concept, ring), _load_prompts(cache, concept, held_out_ring)
    for label in labels:
        method, kw = METHODS[label]
        if method == "uce_published":  # UCE's own recipe (one state per concept, a guide, lam 0.5)
            result = uce_as_published(pipe, concept.spec())
        else:
            result = ice_lightning.erase(pipe, spec=concept.spec(), method=method, verify=False, **kw)
        try:
            team = RedTeam.from_result(
                result, paraphrases=concept.paraphrases, ring_a_bell=ring, attacks=["paraphrase", "ring_a_bell"],
                ring_prompts=ring_prompts,
            )  # fmt: skip
            rates = team.compute()
            ring_prompts = team.ring_a_bell_prompts()
            held_out = RedTeam.from_result(result, ring_a_bell=held_out_ring, attacks=["ring_a_bell"],
                                           ring_prompts=held_out_prompts)  # fmt: skip
            rates.update({k.replace("ring_a_bell", "ring_a_bell_held_out"): v for k, v in held_out.compute().items()})
            held_out_prompts = held_out.ring_a_bell_prompts()
            quality = dev_concept_metrics(result, concept)  # the same edit's erasure and collateral, to match on
            rates.update({key: quality[key] for key in QUALITY})
            for b in budgets:
                wb = RedTeam.from_result(result, attacks=["whitebox"], whitebox_budget=b).compute()
                rates[f"whitebox@{b}"], rates[f"whitebox@{b}_original"] = wb["whitebox"], wb["whitebox_original"]
            out[label] = rates
        finally:
            result.undo()
    _store_prompts(cache, concept, ring, ring_prompts)
    _store_prompts(cache, concept, held_out_ring, held_out_prompts)
    out["_ring_prompts"] = [p.text for p in ring_prompts["text"]]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one concept per family, a small search (tests)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="only these rows (ICE is always run: its 'original' column); the saved rows of the others "
                    "are kept")  # fmt: skip
    ap.add_argument("--ice-setting", action="append", default=[], metavar="LABEL=JSON",
                    help="an extra ICE row with these hyperparameters, e.g. 'soft={\"erase_expansion\": 5}' "
                    "(repeatable; only ICE, these and any --methods run; the others' saved rows are kept)")  # fmt: skip
    ap.add_argument("--ring-cache", type=Path, default=None, metavar="FILE",
                    help="keep the Ring-A-Bell prompts in this JSON file between runs (read if it exists)")
    args = ap.parse_args(argv)
    cache = _read_cache(ap, args.ring_cache)
    extra = ice_settings(ap, args.ice_setting, METHODS)
    METHODS.update(extra)
    named = [*(args.methods or []), *extra]
    labels = list(dict.fromkeys(["ICE", *named])) if named else list(METHODS)
    ring = TINY_RING if args.tiny else RingABellConfig()
    budgets = (1.0,) if args.tiny else BUDGETS
    pipe = minilm_pipeline()
    t0 = time.perf_counter()
    name = "red_team_tiny" if args.tiny else "red_team"
    saved = args.out / f"{name}.json"
    kept = json.loads(saved.read_text())["per_concept"] if named and saved.exists() else {}
    per_concept = {}
    concepts = [(f, c) for f in DEV_SET for c in dev_concepts(f)[: 1 if args.tiny else None]]
    for family, concept in progress(concepts, desc="red-teaming", unit="concept"):
        per_concept[concept.name] = {**kept.get(concept.name, {}), "family": family,
                                     **attack_concept(pipe, concept, ring, budgets, labels, cache)}  # fmt: skip
        if args.ring_cache:  # after each concept: an interrupted run keeps what it searched
            args.ring_cache.write_text(json.dumps(cache, indent=1))
    present = [m for m in METHODS if all(m in r for r in per_concept.values())]  # columns run (or kept)
    attacks = ["paraphrase", "ring_a_bell", "ring_a_bell_held_out", *(f"whitebox@{b}" for b in budgets)]
    rows = []
    for family in DEV_SET:
        names = [n for n, r in per_concept.items() if r["family"] == family]
        for attack in attacks:
            row = {"family": family, "attack": attack}
            row["original"] = statistics.fmean(per_concept[n]["ICE"][attack + "_original"] for n in names)
            for label in present:
                row[label] = statistics.fmean(per_concept[n][label][attack] for n in names)
            rows.append(row)
    for attack in attacks:  # all families
        row = {"family": "all", "attack": attack}
        for col in ("original", *present):
            row[col] = statistics.fmean(r[col] for r in rows if r["attack"] == attack and r["family"] != "all")
        rows.append(row)
    quality = [{"family": "all", "metric": key, **{m: statistics.fmean(r[m][key] for r in per_concept.values())
                                                   for m in present}} for key in QUALITY]  # fmt: skip
    md = [f"# Text-space red-teaming ({'tiny' if args.tiny else 'full'}): attack success rate (lower is better)", ""]
    md += table(["family", "attack", "original model", *present], [[r["family"], r["attack"], r["original"],
                *(r[m] for m in present)] for r in rows])  # fmt: skip
    md += ["", "What each edit costs, on the same concepts (relative output change; erasure: higher is better, "
           "collateral: lower is better):", ""]
    md += table(["metric", *present], [[q["metric"], *(q[m] for m in present)] for q in quality])
    md += ["", "Ring-A-Bell prompts found (first held-out context of each concept):", ""]
    md += [f"- {n}: `{r['_ring_prompts'][0]}`" for n, r in per_concept.items()]
    md += ["", f"Total {time.perf_counter() - t0:.0f} s."]
    write_report(args.out, name, {"methods": {k: list(METHODS[k]) for k in present}, "rows": rows,
                                  "quality": quality, "per_concept": per_concept}, md)  # fmt: skip
    return {"rows": rows, "per_concept": per_concept}


if __name__ == "__main__":
    main()
