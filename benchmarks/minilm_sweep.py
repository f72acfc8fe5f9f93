"""Text-space erasure of "Van Gogh" with the real MiniLM encoder: ICE variants against CURE, UCE, projection.

A quick single-concept check of the variants (objective, centring, overlap kinds, end-of-text token); the
defaults are chosen on the whole development set by benchmarks/tradeoff.py. Writes a JSON and a markdown table.

    python benchmarks/minilm_sweep.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import ice_lightning
from ice_lightning.core.concepts import Prompt
from ice_lightning.core.probe import erasure_metrics  # noqa: E402
from ice_lightning.demos.tiny import build_tiny_pipeline
from ice_lightning.evaluation.metrics import relative_change

OUTSIDE_PRESERVE = ["Paul Gauguin", "Edvard Munch", "Georges Seurat"]
#: The method file's Frobenius objective at the project's previous defaults (docs/benchmarks.md replaced them).
FROB = {"objective": "frobenius", "erase_expansion": 1000.0, "preserve_expansion": 10.0, "lam": 30.0, "center": True}
CONFIGS: list[tuple[str, dict]] = [
    ("ICE default (weighted objective)", {}),
    ("ICE frobenius, energy overlap, centred (previous default)", FROB),
    ("ICE frobenius lam=3", {**FROB, "lam": 3.0}),
    ("ICE frobenius lam=100", {**FROB, "lam": 100.0}),
    ("ICE frobenius not centred", {**FROB, "center": False}),
    ("ICE frobenius angles overlap (method file), centred", {**FROB, "overlap": "angles", "lam": 10.0}),
    ("ICE frobenius angles overlap, not centred", {**FROB, "overlap": "angles", "lam": 10.0, "center": False}),
    ("ICE frobenius no overlap (lam=0)", {**FROB, "lam": 0.0, "center": False}),
    ("ICE frobenius hard erase subspace (a_e=inf)", {**FROB, "erase_expansion": math.inf}),
    ("ICE default + end-of-text token", {"include_eot": True}),
    ("CURE", {"method": "cure"}),
    ("UCE lam=1", {"method": "uce", "lam": 1.0}),
    ("UCE lam=10", {"method": "uce", "lam": 10.0}),
    ("projection", {"method": "projection"}),
]


def run(out: Path) -> list[dict]:
    warnings.filterwarnings("ignore")
    pipe = build_tiny_pipeline("sd-minilm")
    rows = []
    for label, kw in CONFIGS:
        t = time.perf_counter()
        result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", **kw)
        elapsed = time.perf_counter() - t
        m = erasure_metrics(result)
        m["collateral_outside_preserve"] = relative_change(
            result, [Prompt.fill("a sketch of a harbour, {}", a) for a in OUTSIDE_PRESERVE]
        )
        m["paraphrase"] = relative_change(result, [Prompt.fill("a landscape by {}", "the painter of The Starry Night")])
        rows.append(
            {
                "config": label,
                "kwargs": {k: str(v) for k, v in kw.items()},
                "rank": result.operators["text"].rank,
                "seconds": elapsed,
                **m,
            }
        )
        result.undo()
    out.mkdir(parents=True, exist_ok=True)
    (out / "minilm_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = ["erasure", "collateral_near", "collateral_far", "collateral_outside_preserve", "leakage", "paraphrase"]
    lines = ["| config | rank | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines += [f"| {r['config']} | {r['rank']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for r in rows]
    (out / "minilm_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    run(ap.parse_args().out)
