"""Closed-form hardening at many concepts: does it raise near collateral at equal erasure? (real MiniLM encoder)

Erases 10 and 50 artists at once with ICE over ``erase_expansion``, plain and hardened (``harden_rounds=3``), and
reads each curve's near collateral (held-out artists) at the erasure the plain default reaches
(``docs/benchmarks.md``, section 2; ``docs/method.md``, section 9).

    python benchmarks/hardening.py [--tiny] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, minilm_pipeline, table, write_report  # noqa: E402
from tradeoff import collateral_to_reach, many_concepts  # noqa: E402

EXPANSIONS = (10.0, 30.0, 100.0, 300.0)


def grid(tiny: bool) -> list[tuple[str, dict]]:
    expansions = (30.0,) if tiny else EXPANSIONS
    return [("ice", {"erase_expansion": a, **h}) for h in ({}, {"harden_rounds": 3}) for a in expansions]


def summary(rows: list[dict]) -> list[dict]:
    """Per concept count: near collateral of the plain and the hardened curve at the plain default's erasure."""
    out = []
    for n in dict.fromkeys(r["concepts"] for r in rows):
        at = [r for r in rows if r["concepts"] == n]
        default = next(r for r in at if "harden" not in r["config"] and "=30.0" in r["config"])
        curves = {h: [(r["collateral_near"], r["erasure"]) for r in at if ("harden" in r["config"]) == h]
                  for h in (False, True)}  # fmt: skip
        plain, hard = (collateral_to_reach(curves[h], default["erasure"]) for h in (False, True))
        out.append({"concepts": n, "erasure": default["erasure"], "plain_near": plain, "hardened_near": hard,
                    "difference": None if plain is None or hard is None else hard - plain})  # fmt: skip
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
    md += ["", "Near collateral each curve needs for the plain default's erasure (interpolated; '-' if not reached):",
           ""]
    md += table(["concepts", "erasure", "plain", "hardened", "hardened - plain"],
                [[s["concepts"], s["erasure"], *("-" if s[k] is None else s[k]
                                                for k in ("plain_near", "hardened_near", "difference"))]
                 for s in summ])  # fmt: skip
    write_report(args.out, name, {"rows": rows, "summary": summ}, md)
    return {"rows": rows, "summary": summ}


if __name__ == "__main__":
    main()
