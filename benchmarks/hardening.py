"""Robust ICE at many concepts: do the default's hardening, its context erasure, the output metric with one hardening
round, the adversary's round alone in the output metric, or a hard core raise near collateral at equal erasure? (real
MiniLM)

Erases 10 and 50 artists at once with ICE over ``erase_expansion``: without the default's hardening (plain), at the
default, plain without its context erasure, in the output metric with one hardening round, with one hardening
round whose adversary is erased in the output metric (at a fixed strength and within a budget), and the default with
``hard_core=0.5``; reads each curve's
near collateral (held-out artists) at the erasure the plain solve reaches at its default expansion
(``docs/benchmarks.md``, section 2; ``docs/method.md``, section 9).

    python benchmarks/hardening.py [--tiny] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    ADVERSARY_BUDGET,
    OUTPUT_ADVERSARY,
    OUTPUT_METRIC,
    PLAIN,
    RESULTS,
    minilm_pipeline,
    table,
    write_report,
)
from tradeoff import collateral_to_reach, many_concepts  # noqa: E402

#: The default's solve without its hardening ("plain", the default until 2026-12-06: the reference), the default
#: (hardened within a collateral budget), the plain solve without its context erasure, the output metric with one
#: hardening round, the output-metric adversary at a fixed strength and within a budget of 0.01 (``docs/method.md``,
#: section 9) and the default with a hard core at 0.5, each over its own ``erase_expansion`` range (the output metric
#: measures energy shares otherwise: its values are smaller; the core erases more at each expansion, 0.95 of 10
#: artists at 10 where the plain solve erases 0.73); the last number is each curve's own setting.
_OUTPUT_CURVE = {k: v for k, v in OUTPUT_METRIC.items() if k != "erase_expansion"}
_ADVERSARY_CURVE = {k: v for k, v in OUTPUT_ADVERSARY.items() if k != "erase_expansion"}
_BUDGET_CURVE = {k: v for k, v in ADVERSARY_BUDGET.items() if k != "erase_expansion"}
CURVES = {"plain": (PLAIN, (10.0, 30.0, 100.0, 300.0), 30.0),
          "default": ({}, (10.0, 30.0, 100.0, 300.0), 30.0),
          "without context": ({**PLAIN, "context_expansion": 0.0}, (10.0, 30.0, 100.0, 300.0), 30.0),
          "output metric": (_OUTPUT_CURVE, (1.0, 2.0, 4.0, 10.0), OUTPUT_METRIC["erase_expansion"]),
          "output adversary": (_ADVERSARY_CURVE, (3.0, 10.0, 30.0, 100.0), OUTPUT_ADVERSARY["erase_expansion"]),
          "adversary budget": (_BUDGET_CURVE, (3.0, 8.0, 30.0, 100.0), ADVERSARY_BUDGET["erase_expansion"]),
          "hard core": ({"hard_core": 0.5}, (1.0, 3.0, 10.0, 30.0), 30.0)}
#: The curves compared with the plain one, each under its own summary key ("output metric" -> "output_metric_near").
_ROBUST = [c for c in CURVES if c != "plain"]


def grid(tiny: bool) -> list[tuple[str, dict]]:
    return [("ice", {"erase_expansion": a, **kw}) for kw, expansions, default in CURVES.values()
            for a in ((default,) if tiny else expansions)]  # fmt: skip


def _curve(config: str) -> str:
    """The curve a row's ``config`` ("ICE erase_expansion=30.0, harden_rounds=0") belongs to: the one whose settings
    are the row's, ``erase_expansion`` aside."""
    pairs = (kv.split("=", 1) for kv in config.split(" ", 1)[1].split(", "))
    items = {k: v for k, v in pairs if k != "erase_expansion"}
    return next(c for c, (kw, _, _) in CURVES.items() if items == {k: str(v) for k, v in kw.items()})


def summary(rows: list[dict]) -> list[dict]:
    """Per concept count: near collateral of each curve at the default's erasure."""
    out = []
    for n in dict.fromkeys(r["concepts"] for r in rows):
        at = [r for r in rows if r["concepts"] == n]
        reference = next(r for r in at if _curve(r["config"]) == "plain" and "=30.0" in r["config"])
        curves = {c: [(r["collateral_near"], r["erasure"]) for r in at if _curve(r["config"]) == c] for c in CURVES}
        plain = collateral_to_reach(curves["plain"], reference["erasure"])
        row = {"concepts": n, "erasure": reference["erasure"], "plain_near": plain}
        for curve in _ROBUST:
            key, robust = curve.replace(" ", "_"), collateral_to_reach(curves[curve], reference["erasure"])
            row[f"{key}_near"] = robust
            row[f"{key}_difference"] = None if plain is None or robust is None else robust - plain
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="3 artists, one expansion (tests)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = many_concepts(minilm_pipeline(), [3] if args.tiny else [10, 50], grid(args.tiny))
    summ = summary(rows)
    name = "hardening_tiny" if args.tiny else "hardening"
    md = [f"# Hardening at many concepts ({'tiny' if args.tiny else 'full'})", ""]
    md += table(["concepts", "config", "rank", "erasure", "collateral_near", "collateral_far", "seconds"],
                [[r["concepts"], r["config"], r["rank"], r["erasure"], r["collateral_near"], r["collateral_far"],
                  r["seconds"]] for r in rows])  # fmt: skip
    md += ["", "Near collateral each curve needs for the plain solve's erasure at its default expansion (interpolated; "
           "'-' if not reached):", ""]
    keys = ["plain_near", *(f"{c.replace(' ', '_')}_{what}" for c in _ROBUST for what in ("near", "difference"))]
    md += table(["concepts", "erasure", "plain", *(h for c in _ROBUST for h in (c, f"{c} - plain"))],
                [[s["concepts"], s["erasure"], *("-" if s[k] is None else s[k] for k in keys)]
                 for s in summ])  # fmt: skip
    write_report(args.out, name, {"rows": rows, "summary": summ}, md)
    return {"rows": rows, "summary": summ}


if __name__ == "__main__":
    main()
