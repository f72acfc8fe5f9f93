"""Text-space erasure of "Van Gogh" with the real MiniLM encoder: ICE variants against CURE, UCE, projection.

The evidence behind ICE's defaults in docs/method.md. Writes a JSON and a markdown table.

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
from ice_lightning.concepts import Prompt
from ice_lightning.metrics import erasure_metrics, relative_change
from ice_lightning.testing import build_tiny_pipeline

OUTSIDE_PRESERVE = ["Paul Gauguin", "Edvard Munch", "Georges Seurat"]
CONFIGS: list[tuple[str, dict]] = [
    ("ICE default (energy overlap, centred)", {}),
    ("ICE lam=3", {"lam": 3.0}),
    ("ICE lam=100", {"lam": 100.0}),
    ("ICE not centred", {"center": False}),
    ("ICE angles overlap (method file), centred", {"overlap": "angles", "lam": 10.0}),
    ("ICE angles overlap, not centred", {"overlap": "angles", "lam": 10.0, "center": False}),
    ("ICE no overlap (lam=0)", {"lam": 0.0, "center": False}),
    ("ICE hard erase subspace (a_e=inf)", {"erase_expansion": math.inf}),
    ("ICE + end-of-text token", {"include_eot": True}),
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
