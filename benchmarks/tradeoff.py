"""Erasure/collateral trade-off of ICE, CURE, UCE, RECE and projection on the development set (real MiniLM encoder).

For every family of ``ice_lightning.evaluation.devset`` (5 concepts each) and every method swept over its main knob,
erase each concept from a pipeline whose text encoder is the pretrained all-MiniLM-L6-v2 and measure, on
held-out prompts, erasure (the name in new contexts), paraphrase erasure, collateral on held-out nearby
concepts and on unrelated prompts, and leakage. Averages per family give one curve per method; the check
is whether ICE's default lies on or above every other method's curve at equal collateral. Then erase 10
and 50 artists at once.

    python benchmarks/tradeoff.py [--tiny] [--out benchmarks/results] [--methods METHOD ...]

``--methods`` sweeps only these methods and keeps the saved rows of the others and the many-concept tables.

Writes ``tradeoff.json``, ``tradeoff.md`` and ``tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PLAIN, RESULTS, UCE_PUBLISHED, erase_with, minilm_pipeline, table, write_report  # noqa: E402

import ice_lightning  # noqa: E402
from ice_lightning.core.concepts import EVAL_TEMPLATES, UNRELATED_PROMPTS, ConceptSpec, Prompt  # noqa: E402
from ice_lightning.core.context import context_shifts  # noqa: E402
from ice_lightning.core.parts import pipeline_spaces  # noqa: E402
from ice_lightning.core.progress import progress  # noqa: E402
from ice_lightning.evaluation.devset import DEV_SET, MANY_ARTISTS, dev_concepts  # noqa: E402
from ice_lightning.evaluation.metrics import dev_concept_metrics, relative_change  # noqa: E402

METRICS = ("erasure", "paraphrase", "collateral_near", "collateral_near_preserved", "collateral_far",
           "collateral_far_read", "leakage")
#: The x axis of the trade-off: collateral on held-out nearby concepts (the hardest to spare).
COLLATERAL = "collateral_near"
#: The default must erase at least this much on average (held-out contexts): what the previous default erased
#: (a_e = 20, lam = 30, no base: 0.876). Among such configurations on or above every other curve, the one with
#: the least far collateral is recommended.
MIN_DEFAULT_ERASURE = 0.87
#: Many concepts at once: the erasure at which ICE's and UCE's near collateral are compared.
MANY_MIN_ERASURE = 0.85
#: The method file's Frobenius objective at the defaults this project used before this benchmark.
FROBENIUS = {"objective": "frobenius", "erase_expansion": 1000.0, "preserve_expansion": 10.0, "lam": 30.0,
             "overlap": "energy", "center": True, **PLAIN}  # fmt: skip


def sweeps(tiny: bool) -> dict[str, list[dict]]:
    """Each method's main knob (UCE: both of its knobs, the union of points is its curve). ICE's knobs are swept on
    its solve without the default's hardening (``PLAIN``: what section 1 of ``docs/benchmarks.md`` chose them on);
    the default itself is the hardened point ``{}`` beside its plain one."""
    if tiny:
        return {
            "ice": [{}, PLAIN, {"erase_expansion": 10.0, **PLAIN}],
            "cure": [{"preserve_expansion": 10.0}],
            "uce": [{"lam": 10.0}],
            "rece": [{"lam": 30.0}],
            UCE_PUBLISHED: [{}],
            "projection": [{"energy_kept": 0.9}],
        }
    return {
        "ice": [{}, PLAIN]
        + [
            {"erase_expansion": a, "lam": lam, "base_weight": b, **PLAIN}
            for a in (10.0, 20.0, 30.0, 50.0, 100.0, 300.0)
            for lam in (10.0, 30.0)
            for b in (0.0, 10.0, 30.0)
            if {"erase_expansion": a, "lam": lam, "base_weight": b} != DEFAULT  # the default
        ]
        + [{"erase_expansion": a, **PLAIN} for a in (3.0, 1000.0, math.inf)]
        + [FROBENIUS],
        "cure": [{"preserve_expansion": v} for v in (1.0, 3.0, 10.0, 30.0, 100.0, 1000.0, math.inf)],
        "uce": [
            {"lam": lam, "preserve_scale": s}
            for lam in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
            for s in (0.1, 1.0, 10.0)
        ],
        UCE_PUBLISHED: [{}],
        # RECE's rounds on top of UCE (its preserve_scale 1); its collateral stops falling with lam near 0.28 and falls
        # again only with its erasure (benchmarks/red_team.py --curves)
        "rece": [{"lam": lam} for lam in (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)],
        "projection": [{"energy_kept": v} for v in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)],
    }


#: The solver's defaults (ICEHyperParams), spelled out for the sweep.
DEFAULT = {"erase_expansion": ice_lightning.ICEHyperParams().erase_expansion, "lam": ice_lightning.ICEHyperParams().lam,
           "base_weight": ice_lightning.ICEHyperParams().base_weight}  # fmt: skip


def label(method: str, kw: dict) -> str:
    if method == "ice" and not kw:
        return "ICE default"
    if method == "ice" and kw == PLAIN:
        return "ICE default without hardening"
    if kw == FROBENIUS:
        return "ICE frobenius objective (method file's defaults)"
    if method == UCE_PUBLISHED:
        return "UCE as published (own recipe)"
    return f"{method.upper() if method != 'projection' else 'projection'} " + ", ".join(
        f"{k}={v}" for k, v in kw.items()
    )


def _envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto points: erasure strictly increasing with collateral."""
    best, env = -1.0, []
    for c, e in sorted(points):
        if e > best:
            env.append((c, e))
            best = e
    return env


def frontier(points: list[tuple[float, float]], x: float) -> float:
    """Best erasure a method reaches at collateral ``x``: the upper envelope of its points, linearly
    interpolated, with the no-edit point (0, 0) that every method reaches; flat beyond its last point."""
    env = _envelope([(0.0, 0.0), *points])
    if x >= env[-1][0]:
        return env[-1][1]
    for (c0, e0), (c1, e1) in zip(env, env[1:], strict=False):
        if c0 <= x <= c1:
            return e0 + (e1 - e0) * (x - c0) / (c1 - c0) if c1 > c0 else max(e0, e1)
    return 0.0


def run_family(pipe, family: str, grid: dict[str, list[dict]], n_concepts: int | None) -> list[dict]:
    rows = []
    concepts = dev_concepts(family)[:n_concepts]
    for method, kw in progress([(m, kw) for m, pts in grid.items() for kw in pts], desc=f"trade-off, {family}",
                               unit="config"):  # fmt: skip
        per = []
        t = time.perf_counter()
        for c in concepts:
            result = erase_with(pipe, c.spec(), method, kw)
            per.append(dev_concept_metrics(result, c))
            result.undo()
        rows.append(
            {
                "family": family,
                "method": method,
                "config": label(method, kw),
                "kwargs": {k: str(v) for k, v in kw.items()},
                "seconds_per_concept": (time.perf_counter() - t) / len(concepts),
                **{m: statistics.fmean(p[m] for p in per) for m in METRICS},
                "per_concept": {c.name: p for c, p in zip(concepts, per, strict=True)},
            }
        )
    return rows


def _points(rows: list[dict], method: str) -> list[tuple[float, float]]:
    return [(r[COLLATERAL], r["erasure"]) for r in rows if r["method"] == method]


def ice_margins(rows: list[dict]) -> list[dict]:
    """For every ICE configuration: per family, its worst margin over the other methods' curves (``check``)."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows if r["method"] == "ice"):
        margins: dict[str, float] = {}
        for c in check(rows, config):
            margins[c["family"]] = min(margins.get(c["family"], math.inf), c["margin"])
        mine = [r for r in rows if r["config"] == config]
        out.append({"config": config, **margins, "worst": min(margins.values()),
                    "mean_erasure": statistics.fmean(r["erasure"] for r in mine),
                    "mean_paraphrase": statistics.fmean(r["paraphrase"] for r in mine),
                    "mean_far": statistics.fmean(r["collateral_far"] for r in mine)})  # fmt: skip
    return out


def recommend(margins: list[dict]) -> dict:
    """The configuration the defaults should be: mean erasure >= MIN_DEFAULT_ERASURE and on or above every other
    curve on every family (worst margin >= -0.005), then the least far collateral (unrelated prompts); if none is
    on or above, the largest worst-family margin (among all configurations if none erases enough)."""
    candidates = [m for m in margins if "frobenius" not in m["config"]]
    strong = [m for m in candidates if m["mean_erasure"] >= MIN_DEFAULT_ERASURE]
    on_or_above = [m for m in strong if m["worst"] >= -0.005]
    if on_or_above:
        return min(on_or_above, key=lambda m: m["mean_far"])
    return max(strong or candidates, key=lambda m: m["worst"])  # none erases enough (the --tiny sweep)


def check(rows: list[dict], config: str = "ICE default") -> list[dict]:
    """An ICE configuration against every other method's curve at its own collateral, per family."""
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        ice = next(r for r in fam if r["config"] == config)
        for method in dict.fromkeys(r["method"] for r in fam):
            if method in ("ice", UCE_PUBLISHED):
                continue
            other = frontier(_points(fam, method), ice[COLLATERAL])
            out.append(
                {
                    "family": family,
                    "versus": method,
                    "ice_collateral": ice[COLLATERAL],
                    "ice_erasure": ice["erasure"],
                    "other_erasure_at_equal_collateral": other,
                    "margin": ice["erasure"] - other,
                    "on_or_above": ice["erasure"] >= other - 0.005,
                }
            )
    return out


def many_grid(tiny: bool) -> list[tuple[str, dict]]:
    """The many-concept sweep: ICE over ``erase_expansion`` (per concept) and ``lam``, UCE over ``lam``, UCE's own
    recipe, CURE."""
    if tiny:
        return [("ice", {}), ("ice", PLAIN), ("uce", {"lam": 10.0}), (UCE_PUBLISHED, {})]
    return (
        [("ice", {}), ("ice", PLAIN)]
        + [("ice", {"erase_expansion": a, "lam": lam, **PLAIN})
           for a in (10.0, 30.0, 100.0, 300.0) for lam in (0.3, 1.0, 3.0, 10.0) if (a, lam) != (30.0, 10.0)]
        + [("uce", {"lam": lam}) for lam in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)]
        + [(UCE_PUBLISHED, {}), ("cure", {})]
    )


def many_concepts(pipe, counts: list[int], grid: list[tuple[str, dict]]) -> list[dict]:
    """Erase ``n`` artists at once; erasure on the erased names, collateral on held-out artists."""
    nearby = [n for c in dev_concepts("style") for n in c.nearby]
    templates = EVAL_TEMPLATES["style"]
    rows = []
    for n in counts:
        names = list(MANY_ARTISTS[:n])
        spec = ConceptSpec(erase=names, family="style")
        erased = [Prompt.fill(t, a) for a in names for t in templates]
        near = [Prompt.fill(t, a) for a in nearby for t in templates]
        far = [Prompt(u) for u in UNRELATED_PROMPTS]
        space = pipeline_spaces(pipe)["text"]
        for group in (spec.erase_prompts(), spec.preserve_prompts(), erased, near, far):
            space.per_prompt(group)  # encode before timing: "seconds" is the solve and the edit
        space.base_states(spec.base_prompts())
        context_shifts(space, spec)  # the context tokens' states too (kept by the space, like the groups above)
        for method, kw in grid:
            t = time.perf_counter()
            result = erase_with(pipe, spec, method, kw)
            seconds = time.perf_counter() - t
            rows.append(
                {
                    "concepts": n,
                    "method": method,
                    "config": label(method, kw),
                    "rank": result.operators["text"].rank,
                    "erasure": relative_change(result, erased),
                    "collateral_near": relative_change(result, near),
                    "collateral_far": relative_change(result, far),
                    "collateral_far_read": relative_change(result, far, read=True),
                    "seconds": seconds,
                }
            )
            result.undo()
    return rows


def collateral_to_reach(points: list[tuple[float, float]], erasure: float) -> float | None:
    """The least collateral at which a method's curve (upper envelope, linearly interpolated) reaches ``erasure``;
    ``None`` if it never does."""
    env = _envelope([(0.0, 0.0), *points])
    for (c0, e0), (c1, e1) in zip(env, env[1:], strict=False):
        if e0 <= erasure <= e1:
            return c0 + (c1 - c0) * (erasure - e0) / (e1 - e0) if e1 > e0 else c0
    return None


def many_summary(rows: list[dict], min_erasure: float = MANY_MIN_ERASURE) -> list[dict]:
    """Per concept count: ICE's configuration with the least near collateral among those erasing at least
    ``min_erasure``, and the near collateral UCE's swept curve needs for the same erasure."""
    out = []
    for n in dict.fromkeys(r["concepts"] for r in rows):
        at = [r for r in rows if r["concepts"] == n]
        uce = [(r["collateral_near"], r["erasure"]) for r in at if r["method"] == "uce"]
        strong = [r for r in at if r["method"] == "ice" and r["erasure"] >= min_erasure]
        best = min(strong, key=lambda r: r["collateral_near"]) if strong else None
        uce_near = collateral_to_reach(uce, best["erasure"]) if best else None
        out.append({"concepts": n, "ice_config": best["config"] if best else None,
                    "ice_erasure": best["erasure"] if best else None,
                    "ice_collateral_near": best["collateral_near"] if best else None,
                    "uce_collateral_near_at_equal_erasure": uce_near})  # fmt: skip
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the [bench] extra brings it
        print("matplotlib not installed (pip install -e '.[bench]'): no plot written")
        return
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), squeeze=False)
    colours = {"ice": "tab:red", "cure": "tab:blue", "uce": "tab:green", "rece": "tab:purple", "projection": "tab:gray"}
    for ax, family in zip(axes[0], families, strict=True):
        fam = [r for r in rows if r["family"] == family]
        for method, colour in colours.items():
            mine = [r for r in fam if r["method"] == method and "frobenius" not in r["config"]]
            pts = [(r[COLLATERAL], r["erasure"]) for r in mine]
            if not pts:
                continue
            ax.plot(*zip(*pts, strict=True), ".", color=colour, alpha=0.35)
            env = _envelope(pts)
            ax.plot(*zip(*env, strict=True), "-", color=colour, lw=1.2, label=f"{method.upper()} (envelope)")
        frob = [r for r in fam if "frobenius" in r["config"]]
        ax.plot([r[COLLATERAL] for r in frob], [r["erasure"] for r in frob], "x", color="tab:red", ms=8,
                label="ICE, method file's objective")  # fmt: skip
        pub = [r for r in fam if r["method"] == UCE_PUBLISHED]
        ax.plot([r[COLLATERAL] for r in pub], [r["erasure"] for r in pub], "D", color="tab:green", ms=7, mec="k",
                label="UCE as published")  # fmt: skip
        ice = next(r for r in rows if r["family"] == family and r["config"] == "ICE default")
        ax.plot(ice[COLLATERAL], ice["erasure"], "*", color="tab:red", ms=16, mec="k", label="ICE default")
        ax.set_title(family)
        ax.set_xlabel("collateral on held-out nearby concepts")
        ax.set_ylabel("erasure (held-out contexts)")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one concept per family, one point per baseline (tests)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--methods", nargs="+", default=None, choices=list(sweeps(False)),
                    help="sweep only these methods; the saved rows of the others and the many-concept tables are "
                    "kept (the saved report must exist)")  # fmt: skip
    args = ap.parse_args(argv)
    name = "tradeoff_tiny" if args.tiny else "tradeoff"
    saved = args.out / f"{name}.json"
    if args.methods and not saved.exists():
        ap.error(f"--methods keeps the other methods' rows from {saved}, which does not exist: run without --methods")
    kept = json.loads(saved.read_text()) if args.methods else None
    pipe = minilm_pipeline()
    grid = sweeps(args.tiny)
    order = list(grid)
    if args.methods:
        grid = {m: grid[m] for m in order if m in args.methods}
    t0 = time.perf_counter()
    rows = [r for family in DEV_SET for r in run_family(pipe, family, grid, 1 if args.tiny else None)]
    if kept is not None:  # the others' rows as saved, in the report's order (family, then method)
        rows += [r for r in kept["rows"] if r["method"] not in grid]
        rows.sort(key=lambda r: (list(DEV_SET).index(r["family"]), order.index(r["method"])))
    checks = check(rows)
    margins = ice_margins(rows)
    if kept is not None:
        many, summary = kept["many_concepts"], kept["many_summary"]
    else:
        many = many_concepts(pipe, [3] if args.tiny else [1, 10, 50, 100], many_grid(args.tiny))
        summary = many_summary(many)
    md = [f"# Trade-off on the development set ({'tiny' if args.tiny else 'full'})", ""]
    md += ["## Per family and configuration (mean over the family's concepts)", ""]
    md += table(
        ["family", "config", *METRICS],
        [[r["family"], r["config"], *(r.get(m, "-") for m in METRICS)] for r in rows],  # "-": a kept row before it
    )
    md += ["", f"## ICE default against the other curves at equal collateral ({COLLATERAL})", ""]
    md += table(
        ["family", "versus", "ICE collateral", "ICE erasure", "other at equal collateral", "margin", "on/above"],
        [
            [c["family"], c["versus"], c["ice_collateral"], c["ice_erasure"], c["other_erasure_at_equal_collateral"],
             c["margin"], "yes" if c["on_or_above"] else "NO"]
            for c in checks
        ],
    )  # fmt: skip
    md += ["", "## Every ICE configuration: erasure minus the best other curve at equal collateral", ""]
    families = list(DEV_SET)
    md += table(
        ["config", *families, "worst", "mean erasure", "mean paraphrase", "mean far collateral"],
        [[m["config"], *(m[f] for f in families), m["worst"], m["mean_erasure"], m["mean_paraphrase"], m["mean_far"]]
         for m in margins],
    )  # fmt: skip
    best = recommend(margins)
    md += [
        "",
        f"Recommended default (mean erasure >= {MIN_DEFAULT_ERASURE}, on or above every curve, then the least far "
        f"collateral): **{best['config']}** (worst margin {best['worst']:+.3f}, mean erasure "
        f"{best['mean_erasure']:.3f}, mean far collateral {best['mean_far']:.3f}).",
    ]
    md += ["", "## Many concepts at once (artists)", ""]
    md += table(
        ["concepts", "config", "rank", "erasure", "collateral_near", "collateral_far", "collateral_far_read",
         "seconds"],
        [[r["concepts"], r["config"], r["rank"], r["erasure"], r["collateral_near"], r["collateral_far"],
          r.get("collateral_far_read", "-"), r["seconds"]] for r in many],
    )  # fmt: skip
    md += ["", f"ICE's least near collateral with erasure >= {MANY_MIN_ERASURE} against UCE's swept curve at the "
           "same erasure (- : none reaches it):", ""]
    md += table(
        ["concepts", "ICE config", "ICE erasure", "ICE collateral_near", "UCE collateral_near at equal erasure"],
        [[m["concepts"], m["ice_config"] or "-", m["ice_erasure"] if m["ice_erasure"] is not None else "-",
          m["ice_collateral_near"] if m["ice_collateral_near"] is not None else "-",
          m["uce_collateral_near_at_equal_erasure"] if m["uce_collateral_near_at_equal_erasure"] is not None
          else "-"] for m in summary],
    )  # fmt: skip
    md += ["", f"Total {time.perf_counter() - t0:.0f} s."]
    data = {"rows": rows, "checks": checks, "ice_margins": margins, "many_concepts": many, "many_summary": summary}
    write_report(args.out, name, data, md)
    plot(rows, args.out / f"{name}.png")
    return data


if __name__ == "__main__":
    main()
