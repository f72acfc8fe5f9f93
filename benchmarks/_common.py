"""What every benchmark script shares: the MiniLM pipeline, the report writer, the environment record."""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
#: UCE's closed form on UCE's own recipe (``ice_lightning.evaluation.baselines``): a method of the benchmarks beside
#: those of ``erase()``, one point, not swept and not part of the UCE curve (which is the same formula on this
#: project's token sets, without a guide).
UCE_PUBLISHED = "uce_published"

#: The default's solve without its hardening (the default until 2026-12-06; ``docs/benchmarks.md``, section 2).
PLAIN = {"harden_rounds": 0}
#: The hardening as the options below were measured before it became the default: its rows erased in the erasure's
#: own metric, at a fixed ``harden_expansion``.
FIXED = {"harden_metric": None, "harden_budget": None}
#: The robust settings measured beside the default (``docs/benchmarks.md``, section 2; not the default, see there):
#: ICE in the output metric with one hardening round, and the default's token-state erasure with one hardening
#: round erased in the output metric at a fixed strength.
OUTPUT_METRIC = {"metric": "output", "harden_rounds": 1, "erase_expansion": 2.0, "harden_budget": None}
OUTPUT_ADVERSARY = {"harden_rounds": 1, "harden_metric": "output", "harden_expansion": 0.3, "erase_expansion": 10.0,
                    "harden_budget": None}
#: The output-metric adversary with its strength chosen per concept within a collateral budget (``harden_budget``).
ADVERSARY_BUDGET = {"harden_rounds": 1, "harden_metric": "output", "harden_budget": 0.01, "erase_expansion": 8.0}
#: One round of the product's own trigger search (``ice_lightning.core.triggers``), added to a setting.
TRIGGERS = {"trigger_rounds": 1}
#: The family's guide concept (``ConceptSpec(anchor="family")``: the erased concept is mapped onto "art", "an object",
#: "someone" or "a dressed person", never onto the metrics' neutral word), added to a method's row.
ANCHOR = {"anchor": "family"}
#: ICE with the family's guide concept, its concept erasure softer (``erase_expansion`` 3) and its hardening's budget
#: larger (0.007): the text-space point found inside the robustness issue's collateral bounds (``docs/method.md``,
#: section 9). Not the default: on the shapes image model the image-level attack restores both concepts more often
#: than through the default (``docs/benchmarks.md``, section 4).
ANCHORED = {**ANCHOR, "erase_expansion": 3.0, "harden_budget": 0.007}


def erase_with(pipe, spec, method: str, kw: dict):
    """Erase ``spec`` (a ``ConceptSpec``) with one of ``erase()``'s methods, or with UCE as published
    (``UCE_PUBLISHED``, its own recipe); an ``"anchor"`` among ``kw`` replaces the spec's (``"family"``: the family's
    generic concept, ``FAMILY_ANCHOR``); the layers are not re-checked by a forward hook (``verify=False``: the same
    edit, sooner). Imports the product here, as the scripts do after their own set-up."""
    import ice_lightning
    from ice_lightning.evaluation.baselines import uce_as_published

    if "anchor" in kw:  # a field of the spec, not a hyperparameter: a row may map the concept onto a guide concept
        kw = dict(kw)
        spec = dataclasses.replace(spec, anchor=kw.pop("anchor"))
    if method == UCE_PUBLISHED:
        return uce_as_published(pipe, spec)
    return ice_lightning.erase(pipe, spec=spec, method=method, verify=False, **kw)


def ice_settings(ap, items: list[str], taken) -> dict[str, tuple[str, dict]]:
    """``--ice-setting LABEL=JSON`` items as extra rows ``{label: ("ice", hyperparameters)}`` (the JSON may also name
    an ``"anchor"``: :func:`erase_with`); ``ap.error`` on a malformed item or a label among ``taken`` (the built-in
    rows)."""
    extra = {}
    for item in items:
        label, sep, setting = item.partition("=")
        try:
            kw = json.loads(setting) if sep and label else None
        except json.JSONDecodeError:
            kw = None
        if not isinstance(kw, dict):
            ap.error(f"--ice-setting takes LABEL=JSON with a JSON object of ICE hyperparameters, got {item!r} (a "
                     "label holds no '=')")
        if label in taken:
            ap.error(f"--ice-setting label {label!r} names a built-in row; choose another label")
        extra[label] = ("ice", kw)
    return extra


def keep_saved_settings(methods: dict[str, tuple[str, dict]], report: dict) -> None:
    """Add an earlier run's own rows (``report["methods"]``: label -> ``(method, hyperparameters)``, its
    ``--ice-setting`` ones among them) to ``methods`` where the label is free, so that the rows it kept stay defined in
    this run's report."""
    for label, (method, kw) in report.get("methods", {}).items():
        methods.setdefault(label, (method, kw))


def minilm_pipeline():
    """A tiny SD pipeline whose text encoder is the real pretrained all-MiniLM-L6-v2 (384-d)."""
    from ice_lightning.demos.tiny import build_tiny_pipeline

    warnings.filterwarnings("ignore")
    return build_tiny_pipeline("sd-minilm")


def with_layer_rows(pipe, rows: int, seed: int = 0):
    """``pipe`` with every projection that reads the text states (each cross-attention's ``to_k`` and ``to_v``)
    replaced by a random one of ``rows`` output rows, drawn at that weight's own scale (its standard deviation) from
    ``seed``. The MiniLM pipeline's tiny UNet reads 160 of the text's 384 directions in all (16 or 32 rows per
    projection); SD's read every direction of theirs. The text-space benchmarks read these weights only: the UNet
    itself no longer runs (its attention heads expect the old width). Returns ``pipe``."""
    if rows < 1:
        raise ValueError(f"a projection needs at least one output row, got rows={rows}")
    g = torch.Generator().manual_seed(seed)
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            old = module.weight.detach()
            new = torch.randn(rows, old.shape[1], generator=g, dtype=old.dtype) * float(old.float().std())
            module.weight = torch.nn.Parameter(new, requires_grad=False)
            module.out_features = rows
            if module.bias is not None:
                module.bias = torch.nn.Parameter(torch.zeros(rows, dtype=old.dtype), requires_grad=False)
    return pipe


def environment() -> dict:
    import diffusers
    import transformers

    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs, and the last return value."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def write_report(out: Path, name: str, data: dict, markdown: list[str]) -> None:
    """``out/name.json`` (with the environment) and ``out/name.md``; prints the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table; floats with three decimals."""

    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows),
    ]
