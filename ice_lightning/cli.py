"""The ``ice-lightning`` command line.

- ``ice-lightning erase --pipeline DIR --erase "Van Gogh" --family style --out DIR`` (or ``--config
  erase.yaml``) loads a diffusers pipeline with ``from_pretrained``, erases the concepts, exports the
  erased model with its manifest and prints a before/after table of the text-space metrics.
- ``ice-lightning verify DIR`` checks an export against its manifest (``verify_export``, erasure check on).
- ``ice-lightning fit|validate|test --config train.yaml`` hands over to the ``LightningCLI`` of
  :mod:`ice_lightning.lightning.cli` (:class:`ICEModule` and any ``LightningDataModule``; add :class:`ICECallback`
  under ``trainer.callbacks``).

Erase and verify are not Lightning commands: this module sits at the package's root, beside the core and the
Lightning layer, and loads Lightning only for ``fit|validate|test``.

A pipeline plugin can register its own erase report (``ice_lightning.core.pipelines.erase_report``); the
shapes world's samples images before and after the edit.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

# Only the standard library at import time: ``ice-lightning --help``, ``--version`` and ``configs`` answer at
# once; torch, diffusers and Lightning load with the command that needs them.

__all__ = ["main", "run", "build_erase_parser", "packaged_configs", "resolve_config"]

_USAGE = """usage: ice-lightning {erase,verify,fit,validate,test,configs} ... [--version]

  erase      one-shot erase and export of a diffusers pipeline (ice-lightning erase --help)
  verify     check an export against its manifest: files, edited tensors, erasure present
  fit        fine-tune with LightningCLI (ice-lightning fit --config tiny_t2i)
  validate   run the validation loop (the text-space metrics of docs/method.md)
  test       run the test loop
  configs    list the configs shipped with the package (use one by name: --config NAME)

  --version  print the version
  --quiet    (erase, fit) no progress bars
  --debug    show the traceback of a refusal (without it: the message alone, exit 1)
"""

#: The YAML configs shipped with the package (``configs/`` in a checkout links here).
CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, str]:
    """``{name: first comment line}`` of every shipped config (``--config NAME`` uses one)."""
    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#")
        out[path.stem] = first.lstrip("# ").strip()
    return out


def resolve_config(value: str) -> str:
    """A ``--config`` value: a file that exists as given, else the shipped config of that name (``tiny_t2i`` or
    ``tiny_t2i.yaml``), else the value unchanged (the parser then reports it)."""
    path = Path(value)
    if path.exists() or not (path.parent == Path(".") or path.parts[0] == "configs"):  # a user's own path
        return value
    for candidate in (CONFIGS / path.name, CONFIGS / f"{path.name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return value


def _resolve_configs(args: list[str]) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + resolve_config(a.split("=", 1)[1])
    return out


def build_erase_parser():
    """Parser of ``ice-lightning erase`` (flags or ``--config`` YAML; ``--print_config`` prints it)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .core.concepts import FAMILIES
    from .core.solver import METHODS

    er = ArgumentParser(
        prog="ice-lightning erase", description="Erase concepts from a diffusers pipeline and export it."
    )
    er.add_argument("--config", action=ActionConfigFile,
                    help="YAML with any of the options below, or the name of a shipped config")  # fmt: skip
    er.add_argument("--pipeline", default="shapes-image",
                    help="local diffusers folder or hub id (from_pretrained), or a shipped shapes-world model: "
                    "shapes-image (the default) or shapes-video")  # fmt: skip
    er.add_argument("--erase", action="append", required=True, help="a concept to erase (repeat for more)")
    er.add_argument("--preserve", action="append", default=None,
                    help="a concept to keep (repeat for more); default: the family's preserve set")  # fmt: skip
    er.add_argument("--family", default="custom", choices=list(FAMILIES),
                    help="concept family: picks the prompt templates and the default preserve set")  # fmt: skip
    er.add_argument("--anchor", default=None,
                    help="optional guide concept replacing the erased one ('family': the family's generic one, "
                    "e.g. 'art' for a style)")
    er.add_argument("--template", action="append", default=None,
                    help="prompt template with one {} for the concept (repeat); default: the family's")  # fmt: skip
    er.add_argument("--include-eot", action="store_true", help="also use the end-of-text token's state")
    er.add_argument("--method", default="ice", choices=list(METHODS),
                    help="ice, or a baseline through the same edit (cure, uce, projection, rece), or a method "
                    "registered with ice_lightning.core.solver.register_method")  # fmt: skip
    add_method_arguments(er)
    er.add_argument("--device", default="cpu", help="device to run the text encoder and the edit on")
    er.add_argument("--out", required=True, help="output folder for the erased pipeline (new, empty, or an earlier "
                    "export; never the folder the pipeline was loaded from)")  # fmt: skip
    er.add_argument("--pipeline-config", default=None,
                    help="with a single-file --pipeline (.safetensors): the diffusers folder whose configs "
                    "from_single_file reads (it holds model_index.json)")  # fmt: skip
    er.add_argument("--format", default="merged", choices=["merged", "lora", "lora-kohya", "single-file"],
                    help="merged: the erased diffusers folder (ship this); lora: the edit alone as a diffusers/PEFT "
                    "LoRA that pipe.load_lora_weights loads onto the original model; lora-kohya: the same LoRA with "
                    "kohya's keys, for Automatic1111, Forge, ComfyUI, InvokeAI (SD 1.x/2.x, SDXL); single-file: one "
                    "original-layout checkpoint (model.safetensors) for the same tools and from_single_file; from a "
                    "single-file --pipeline, a copy of that file with only the edited tensors changed")  # fmt: skip
    er.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out folder that is not an earlier export")  # fmt: skip
    er.add_argument("--samples", type=int, default=4,
                    help="shapes world: samples per prompt for the before/after detection rates")  # fmt: skip
    er.add_argument("--seed", type=int, default=0, help="seed of the report's samples (shapes world)")
    er.add_argument("--grid", default=None,
                    help="where to write the report's before/after image grid (PNG, for pipelines whose plugin "
                    "draws one, as the shapes world's); default: inside the export, OUT/before_after.png")  # fmt: skip
    er.add_argument("--preview", type=int, default=0,
                    help="sample this many held-out prompts of the erased concepts (and half as many preserved ones) "
                    "before and after the edit, with fixed seeds, and ship the grid in the export as "
                    "before_after.png, shown in its model card (0: none, the default)")  # fmt: skip
    er.add_argument("--quiet", action="store_true", help="no progress bars")
    return er


def _field_docs(params: type) -> dict[str, str]:
    """``{field: its description}`` from the ``Attributes:`` section of a dataclass's Google-style docstring (the
    first sentence, whitespace collapsed), read by ``docstring_parser`` (jsonargparse's, as LightningCLI reads
    signatures): the hyperparameters are documented once, where they are defined."""
    import docstring_parser

    parsed = docstring_parser.parse(params.__doc__ or "")
    docs = {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}
    return {k: re.split(r"(?<=[a-z)`])\. ", v, maxsplit=1)[0].rstrip(".") for k, v in docs.items()}


def solver_flags() -> dict[str, tuple[str, ...]]:
    """``{hyperparameter: the methods that take it}`` over every registered method: one ``--flag`` each."""
    from .core.solver import METHODS

    flags: dict[str, tuple[str, ...]] = {}
    for method, params in METHODS.items():
        for name in params.__dataclass_fields__:
            flags[name] = (*flags.get(name, ()), method)
    return flags


#: The value of a solver flag that sets its field to None (``--harden-budget none``: the hardening at a fixed strength).
NONE = "none"


class _or_none:  # noqa: N801 (a type, as argparse shows it: "type: float or none")
    """``cast``, or :data:`NONE` kept as is (:func:`method_hparams` makes it None)."""

    def __init__(self, cast) -> None:
        self.cast, self.__name__ = cast, f"{cast.__name__} or {NONE}"

    def __call__(self, text):
        return NONE if str(text).lower() == NONE else self.cast(text)

    def __repr__(self) -> str:
        return self.__name__


def add_method_arguments(parser) -> None:
    """One ``--flag`` per hyperparameter field of the registered methods' dataclasses (``lam`` -> ``--lam``), its
    type and choices from the field's annotation, its help from the dataclass's docstring, per method; a field that
    may be None also takes ``none``. Nothing is typed here: a field added to a dataclass, or a method registered, is
    a flag."""
    import dataclasses

    from .core.solver import METHODS

    helps: dict[str, dict[str, list[str]]] = {}  # field -> {its help: the methods it reads so}
    kinds: dict[str, dict] = {}
    for method, params in METHODS.items():
        hints, docs = get_type_hints(params), _field_docs(params)
        for f in dataclasses.fields(params):
            hint = hints[f.name]
            optional = get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)
            args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else []
            hint = args[0] if len(args) == 1 else hint
            if get_origin(hint) is Literal:
                kind = {"choices": [*get_args(hint), *([NONE] if optional else [])]}
            else:
                cast = hint if hint in (int, float, bool, str) else str
                kind = {"type": _or_none(cast) if optional else cast}
            kinds.setdefault(f.name, kind)
            default = "inf" if f.default == math.inf else f.default
            text = re.sub(r":\w+:`~?([^`]*)`", r"\1", docs.get(f.name, f.name)).replace("``", "")
            helps.setdefault(f.name, {}).setdefault(f"({default}): {text}", []).append(method)
    for name, kind in kinds.items():
        text = "; ".join(f"{', '.join(methods)} {doc}" for doc, methods in helps[name].items())
        parser.add_argument("--" + name.replace("_", "-"), default=None, help=text, **kind)


def method_hparams(cfg) -> dict:
    """The hyperparameters the given flags set for ``--method``; a flag that does not apply to it is refused
    (``--method uce --base-weight 5`` would otherwise run plain UCE and say nothing)."""
    flags = solver_flags()
    given = {k: getattr(cfg, k) for k in flags if getattr(cfg, k, None) is not None}
    given = {k: None if v == NONE else v for k, v in given.items()}  # --harden-budget none
    foreign = ["--" + k.replace("_", "-") for k in given if cfg.method not in flags[k]]
    if foreign:
        own = ", ".join("--" + k.replace("_", "-") for k, ms in flags.items() if cfg.method in ms)
        takers = sorted({m for k in given if cfg.method not in flags[k] for m in flags[k]})
        raise ValueError(
            f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to --method {cfg.method}: "
            f"it takes {own or 'none of the solver flags'}; drop the flag or choose --method "
            f"{' or '.join(takers)}"
        )
    return given


def _check_device(device: str) -> None:
    """Refuse a device this machine lacks, by name, before the pipeline is loaded."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: no MPS device is available on this machine; use --device cpu")


def _run_erase(cfg) -> int:
    from .core.concepts import ConceptSpec
    from .core.export import LORA_NAME, check_export_destination, save_erased
    from .core.pipelines import erase_report, is_single_file, load_pipeline
    from .core.plan import erase
    from .core.probe import erasure_table
    from .core.progress import set_quiet

    hparams = method_hparams(cfg)  # before loading anything: a flag of another method costs nothing
    _check_device(cfg.device)
    set_quiet(cfg.quiet)
    given = {"erase": cfg.erase, "preserve": cfg.preserve, "family": cfg.family, "anchor": cfg.anchor,
             "templates": cfg.template, "include_eot": cfg.include_eot}  # fmt: skip
    spec = ConceptSpec(**given)  # a bad spec is refused before the pipeline loads (minutes for a large one)
    pipe = load_pipeline(cfg.pipeline, config=cfg.pipeline_config).to(cfg.device)
    source_file = cfg.pipeline if is_single_file(cfg.pipeline) and cfg.format == "single-file" else None
    check_export_destination(pipe, cfg.out, cfg.overwrite, cfg.format)  # before any work: a refused --out costs nothing
    factory = erase_report(pipe)  # a pipeline whose plugin shows erasure its own way (the shapes world: samples)
    report = factory(pipe, samples=cfg.samples, seed=cfg.seed) if factory is not None else None
    preview = None
    if report is not None:
        spec = report.concept_spec(**given)  # the world's own spec, from the same inputs
        report.before()
    elif cfg.preview:  # any pipeline: the same prompts and seeds before and after
        from .core.preview import Preview

        preview = Preview(pipe, cfg.preview, seed=cfg.seed)
        preview.before(spec)
    result = erase(pipe, spec=spec, method=cfg.method, **hparams)
    print(
        f"erased {result.spec.erase} ({cfg.method}) from {len(result.layers)} layers "
        f"in {result.timings['total_s']:.2f} s; operator ranks "
        f"{ {s: op.rank for s, op in result.operators.items()} }"
    )
    text, files = report.after(result) if report is not None else (erasure_table(result), {})
    if preview is not None:
        files["before_after.png"] = preview.after()
    print(text)
    grid = files.pop("before_after.png", None) if cfg.grid else None
    out = save_erased(pipe, cfg.out, overwrite=cfg.overwrite, format=cfg.format, extra_files=files,
                      source_file=source_file)  # fmt: skip
    if cfg.format in ("lora", "lora-kohya"):
        lora_bytes = (out / LORA_NAME).stat().st_size
        print(f"saved the erasure as a LoRA to {out} ({_size(lora_bytes)}; the merged model's weights take "
              f"{_size(_weights_bytes(pipe))}): pipe.load_lora_weights({str(out)!r}); pipe.fuse_lora()")  # fmt: skip
    elif cfg.format == "single-file":
        print(f"saved the erased checkpoint to {out / 'model.safetensors'} (Automatic1111, Forge, ComfyUI, InvokeAI; "
              f"diffusers: from_single_file({str(out / 'model.safetensors')!r}, config={str(out / 'config')!r}))")
    else:
        print(f"saved to {out}")
    if grid is not None:  # a place of the user's choosing, not shipped
        Path(cfg.grid).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.grid).write_bytes(grid)
    if "before_after.png" in files or grid is not None:
        print(f"before/after grid: {cfg.grid or out / 'before_after.png'}")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _weights_bytes(pipe) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules (what a merged export writes)."""
    import torch

    mods = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in mods for t in [*m.parameters(), *m.buffers()])


def build_verify_parser():
    """Parser of ``ice-lightning verify``."""
    from jsonargparse import ArgumentParser

    vp = ArgumentParser(prog="ice-lightning verify", description="Check an erased export against its manifest.")
    vp.add_argument("path", help="the exported folder (with ice_manifest.json)")
    vp.add_argument("--no-check-erasure", dest="check_erasure", action="store_false",
                    help="only check hashes; skip recomputing each erasure through the shipped layers")  # fmt: skip
    return vp


def _run_verify(cfg) -> int:
    from .core.export import verify_export

    checks = verify_export(cfg.path, check_erasure=cfg.check_erasure)
    files = sum(k.startswith("file:") for k in checks)
    tensors = sum(k.endswith(".weight") for k in checks)
    erasures = sum(k.startswith("erasure:") for k in checks)
    print(f"verified {cfg.path}: {files} files and {tensors} edited tensors match the manifest"
          + (f"; {erasures} erasure(s) present in the shipped layers" if cfg.check_erasure else ""))  # fmt: skip
    return 0


def _version() -> str:
    """The installed distribution's version (the package's ``__version__``, read without importing upwards)."""
    from importlib.metadata import version

    return version("ice-lightning")


def _list_configs() -> int:
    configs = packaged_configs()
    width = max(map(len, configs))
    print(f"configs shipped with ice-lightning {_version()} ({CONFIGS}); use one with --config NAME:\n")
    for name, about in configs.items():
        print(f"  {name:<{width}}  {about}")
    return 0


def _run_lightning(args: list[str]) -> int:
    from .core.progress import set_quiet

    if "--quiet" in args:
        args = [a for a in args if a != "--quiet"] + ["--trainer.enable_progress_bar=false"]
        set_quiet(True)
    from .lightning.cli import ICELightningCLI  # here: LightningCLI is slow to import, and erase never needs it

    # LightningCLI reads sys.argv itself, and warns when it is given args beside a command line of its own
    # (pytest's, a notebook's): the arguments go through sys.argv, restored afterwards.
    saved = sys.argv
    sys.argv = [saved[0] if saved else "ice-lightning", *args]
    try:
        ICELightningCLI()
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ice-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"ice-lightning {_version()}")
        return 0
    if args[0] == "configs":
        return _list_configs()
    args = _resolve_configs(args)
    if args[0] == "erase":
        return _run_erase(build_erase_parser().parse_args(args[1:]))
    if args[0] == "verify":
        return _run_verify(build_verify_parser().parse_args(args[1:]))
    if args[0] not in ("fit", "validate", "test", "predict"):
        print(f"ice-lightning: unknown command {args[0]!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    return _run_lightning(args)


def run() -> None:
    """The ``ice-lightning`` console script: :func:`main`, with a refusal printed as its message alone (exit 1) and
    Ctrl-C as one line (exit 130); ``--debug`` anywhere shows the traceback instead."""
    args = sys.argv[1:]
    debug = "--debug" in args
    try:
        code = main([a for a in args if a != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print("ice-lightning: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:  # noqa: BLE001 - every refusal ends here, as one line
        if debug:
            raise
        print(f"ice-lightning: error: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
