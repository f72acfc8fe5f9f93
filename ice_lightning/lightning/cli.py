"""The ``ice-lightning`` command line.

- ``ice-lightning erase --pipeline DIR --erase "Van Gogh" --family style --out DIR`` (or ``--config
  erase.yaml``) loads a diffusers pipeline with ``from_pretrained``, erases the concepts, exports the
  erased model with its manifest and prints a before/after table of the text-space metrics.
- ``ice-lightning verify DIR`` checks an export against its manifest (``verify_export``, erasure check on).
- ``ice-lightning fit|validate|test --config train.yaml`` is a ``LightningCLI`` over :class:`ICEModule` and
  any ``LightningDataModule``; add :class:`ICECallback` under ``trainer.callbacks``.

A pipeline plugin can register its own erase report (``ice_lightning.core.pipelines.erase_report``); the
shapes world's samples images before and after the edit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import get_args

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from ..core.concepts import FAMILIES
from ..core.export import check_export_destination, save_erased, verify_export
from ..core.solver import METHODS, ICEHyperParams, Objective, OverlapKind

__all__ = ["main", "build_erase_parser", "format_table", "ICELightningCLI"]

_USAGE = """usage: ice-lightning {erase,verify,fit,validate,test} ...

  erase      one-shot erase and export of a diffusers pipeline (ice-lightning erase --help)
  verify     check an export against its manifest: files, edited tensors, erasure present
  fit        fine-tune with LightningCLI (ice-lightning fit --config configs/tiny_t2i.yaml)
  validate   run the validation loop (the text-space metrics of docs/method.md)
  test       run the test loop
"""


def build_erase_parser() -> ArgumentParser:
    """Parser of ``ice-lightning erase`` (flags or ``--config`` YAML; ``--print_config`` prints it)."""
    er = ArgumentParser(
        prog="ice-lightning erase", description="Erase concepts from a diffusers pipeline and export it."
    )
    er.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    er.add_argument("--pipeline", default="shapes-image",
                    help="local diffusers folder or hub id (from_pretrained), or a shipped shapes-world model: "
                    "shapes-image (the default) or shapes-video")  # fmt: skip
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
    er.add_argument("--overlap", default=defaults.overlap, choices=list(get_args(OverlapKind)),
                    help="ICE overlap projector")  # fmt: skip
    er.add_argument("--objective", default=defaults.objective, choices=list(get_args(Objective)),
                    help="ICE objective: energy-weighted or plain Frobenius")  # fmt: skip
    er.add_argument("--device", default="cpu", help="device to run the text encoder and the edit on")
    er.add_argument("--out", required=True, help="output folder for the erased pipeline (new, empty, or an earlier "
                    "export; never the folder the pipeline was loaded from)")  # fmt: skip
    er.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out folder that is not an earlier export")  # fmt: skip
    er.add_argument("--samples", type=int, default=8,
                    help="shapes world: samples per prompt for the before/after detection rates")  # fmt: skip
    er.add_argument("--seed", type=int, default=0, help="shapes world: seed of the samples")
    er.add_argument("--grid", default=None,
                    help="shapes world: before/after image grid (PNG); default OUT/before_after.png")  # fmt: skip
    return er


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
    from ..core.pipelines import erase_report, load_pipeline
    from ..core.plan import erase
    from ..core.probe import erasure_metrics

    pipe = load_pipeline(cfg.pipeline).to(cfg.device)
    check_export_destination(pipe, cfg.out, cfg.overwrite)  # before any work: a refused --out costs nothing
    hparams = {}
    if cfg.method == "ice":
        hparams = {
            "lam": cfg.lam,
            "mu": cfg.mu,
            "erase_expansion": cfg.erase_expansion,
            "preserve_expansion": cfg.preserve_expansion,
            "overlap": cfg.overlap,
            "objective": cfg.objective,
        }
    report = erase_report(pipe)
    if report is not None:  # a pipeline whose plugin shows erasure its own way (the shapes world: samples)
        return report(pipe, cfg, hparams)
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
    out = save_erased(pipe, cfg.out, overwrite=cfg.overwrite)
    print(
        f"erased {result.spec.erase} ({cfg.method}) from {len(result.layers)} layers "
        f"in {result.timings['total_s']:.2f} s; operator ranks "
        f"{ {s: op.rank for s, op in result.operators.items()} }"
    )
    print(format_table(erasure_metrics(result)))
    print(f"saved to {out}")
    return 0


def build_verify_parser() -> ArgumentParser:
    """Parser of ``ice-lightning verify``."""
    vp = ArgumentParser(prog="ice-lightning verify", description="Check an erased export against its manifest.")
    vp.add_argument("path", help="the exported folder (with ice_manifest.json)")
    vp.add_argument("--no-check-erasure", dest="check_erasure", action="store_false",
                    help="only check hashes; skip recomputing each erasure through the shipped layers")  # fmt: skip
    return vp


def _run_verify(cfg) -> int:
    checks = verify_export(cfg.path, check_erasure=cfg.check_erasure)
    files = sum(k.startswith("file:") for k in checks)
    tensors = sum(k.endswith(".weight") for k in checks)
    erasures = sum(k.startswith("erasure:") for k in checks)
    print(f"verified {cfg.path}: {files} files and {tensors} edited tensors match the manifest"
          + (f"; {erasures} erasure(s) present in the shipped layers" if cfg.check_erasure else ""))  # fmt: skip
    return 0


class ICELightningCLI(LightningCLI):
    """``LightningCLI`` over :class:`ICEModule` and any ``LightningDataModule`` (``fit|validate|test``), given
    by ``class_path`` in the ``data`` section: :class:`~ice_lightning.CaptionFolderDataModule` (caption
    folders) or :class:`~ice_lightning.shapes.ShapesDataModule` (the shapes world)."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        from lightning.pytorch import LightningDataModule

        from .module import ICEModule

        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(ICEModule, LightningDataModule, args=args, subclass_mode_data=True, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ice-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] == "erase":
        return _run_erase(build_erase_parser().parse_args(args[1:]))
    if args[0] == "verify":
        return _run_verify(build_verify_parser().parse_args(args[1:]))
    if args[0] not in ("fit", "validate", "test", "predict"):
        print(f"ice-lightning: unknown command {args[0]!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    ICELightningCLI(args=args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
