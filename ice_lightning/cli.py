"""The ``ice-lightning`` command line.

``ice-lightning erase --pipeline DIR --erase "Van Gogh" --family style --out DIR`` loads a diffusers
pipeline with ``from_pretrained``, erases the concepts, exports the erased model with its manifest and
prints a before/after table of the text-space metrics.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser

from .concepts import FAMILIES
from .solver import METHODS, ICEHyperParams

__all__ = ["main", "build_parser", "format_table"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ice-lightning", description="Instant Concept Erasure for diffusion models")
    sub = parser.add_subcommands(required=True, dest="command")
    er = ArgumentParser(description="Erase concepts from a saved diffusers pipeline and export it.")
    er.add_argument("--pipeline", required=True, help="local diffusers folder or hub id (from_pretrained)")
    er.add_argument("--erase", action="append", required=True, help="a concept to erase (repeat for more)")
    er.add_argument("--preserve", action="append", default=None, help="a concept to keep (repeat for more)")
    er.add_argument("--family", default="custom", choices=list(FAMILIES), help="concept family")
    er.add_argument("--anchor", default=None, help="optional guide concept replacing the erased one")
    er.add_argument("--template", action="append", default=None, help="prompt template with one {}")
    er.add_argument("--include-eot", action="store_true", help="also use the end-of-text token")
    er.add_argument("--method", default="ice", choices=list(METHODS))
    defaults = ICEHyperParams()
    er.add_argument("--lam", type=float, default=defaults.lam, help="ICE overlap weight")
    er.add_argument("--mu", type=float, default=defaults.mu, help="ICE ridge weight")
    er.add_argument("--erase-expansion", type=float, default=defaults.erase_expansion)
    er.add_argument("--preserve-expansion", type=float, default=defaults.preserve_expansion)
    er.add_argument("--overlap", default=defaults.overlap)
    er.add_argument("--device", default="cpu", help="device to run the text encoder and the edit on")
    er.add_argument("--out", required=True, help="output folder for the erased pipeline")
    sub.add_subcommand("erase", er, help="one-shot erase and export")
    return parser


def format_table(metrics: dict[str, float]) -> str:
    """Before/after table of the text-space metrics (before is the unedited model)."""
    rows = [
        ("erasure (held-out concept tokens)", 0.0, metrics["erasure"], "higher = more removed"),
        ("collateral, near concepts", 0.0, metrics["collateral_near"], "lower = better kept"),
        ("collateral, unrelated prompts", 0.0, metrics["collateral_far"], "lower = better kept"),
        ("leakage (still closer to concept)", 1.0, metrics["leakage"], "lower = better"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  before   after  ", "-" * (width + 26)]
    lines += [f"{name:<{width}}  {b:6.3f}  {a:6.3f}  {note}" for name, b, a, note in rows]
    return "\n".join(lines)


def _run_erase(cfg) -> int:
    from diffusers import DiffusionPipeline

    from .erase import erase
    from .export import save_erased
    from .metrics import erasure_metrics

    pipe = DiffusionPipeline.from_pretrained(cfg.pipeline).to(cfg.device)
    hparams = {}
    if cfg.method == "ice":
        hparams = {
            "lam": cfg.lam,
            "mu": cfg.mu,
            "erase_expansion": cfg.erase_expansion,
            "preserve_expansion": cfg.preserve_expansion,
            "overlap": cfg.overlap,
        }
    result = erase(
        pipe,
        erase=cfg.erase,
        preserve=cfg.preserve,
        family=cfg.family,
        anchor=cfg.anchor,
        templates=cfg.template,
        include_eot=cfg.include_eot,
        method=cfg.method,
        **hparams,
    )
    out = save_erased(pipe, cfg.out)
    print(
        f"erased {result.spec.erase} ({cfg.method}) from {len(result.layers)} layers "
        f"in {result.timings['total_s']:.2f} s; operator ranks "
        f"{ {s: op.rank for s, op in result.operators.items()} }"
    )
    print(format_table(erasure_metrics(result)))
    print(f"saved to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ice-lightning`` console script."""
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if cfg.command == "erase":
        return _run_erase(cfg.erase)
    parser.error(f"unknown command {cfg.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
