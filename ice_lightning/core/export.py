"""Export an erased pipeline: diffusers ``save_pretrained`` + ``ice_manifest.json`` + the operators + a
model-card section; and :func:`verify_export`, which checks an export against its manifest.

The manifest records what was erased (concepts, method, hyperparameters, layers and the embedding space each
reads), the library versions, the sha256 of every file of the export and of each edited tensor, and the
concept residual of each erasure through the shipped layers. ``ice_operators.safetensors`` holds the
operators, so :func:`verify_export` can recompute that residual and confirm that the erasure is present, not
only that the bytes match.

Writing is safe: an export goes into a temporary sibling folder and is renamed into place at the end (an
interrupt or a full disk leaves the destination as it was); a non-empty destination that is not an earlier
export is refused unless ``overwrite=True``; the folder the pipeline was loaded from is never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .concepts import ConceptSpec
from .editing import is_sharded, tensor_sha256
from .layers import _is_lora
from .plan import ErasurePlan, ErasureResult, denoisers, edit_history, pipeline_spaces, resolve_layer
from .probe import concept_residual, residual_of_outputs
from .solver import DissociationOperator

__all__ = [
    "MANIFEST_NAME",
    "OPERATORS_NAME",
    "ExportVerificationError",
    "save_erased",
    "check_export_destination",
    "export_lock",
    "verify_export",
    "load_manifest",
    "gather_pipeline",
    "rebased",
    "without_adapters",
    "ADAPTERS_DIR",
    "Adapters",
    "ExportFormat",
    "LORA_NAME",
    "erasure_lora",
]

MANIFEST_NAME = "ice_manifest.json"
log = logging.getLogger(__name__)
OPERATORS_NAME = "ice_operators.safetensors"
_FORMAT = "ice-lightning/manifest-v2"
# The recomputed residual must match the recorded one this closely (same weights, same encoder, float64).
_RESIDUAL_RTOL, _RESIDUAL_ATOL = 1e-4, 1e-6
_CARD_MARK = "<!-- ice-lightning -->"
#: Where ``adapters="separate"`` puts each denoiser's LoRA weights: ``ice_adapters/<component>/``.
ADAPTERS_DIR = "ice_adapters"
Adapters = Literal["merge", "separate"]
ExportFormat = Literal["merged", "lora"]
#: The LoRA file of ``format="lora"`` (the name ``pipe.load_lora_weights(folder)`` looks for).
LORA_NAME = "pytorch_lora_weights.safetensors"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ice-lightning", "torch", "diffusers", "transformers", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class ExportVerificationError(ValueError):
    """An export does not match its manifest, or its manifest is malformed; the message says where."""


def _weight(pipeline, qualified: str) -> Tensor:
    return resolve_layer(pipeline, qualified).weight


def _source_folders(pipeline) -> list[Path]:
    """Local folders ``pipeline`` (or one of its components) was loaded from."""
    paths = [getattr(getattr(pipeline, "config", None), "_name_or_path", None)]
    for comp in getattr(pipeline, "components", {}).values():
        paths.append(getattr(getattr(comp, "config", None), "_name_or_path", None))
    out = []
    for p in paths:
        if isinstance(p, (str, os.PathLike)) and str(p) and Path(p).is_dir():
            out.append(Path(p).resolve())
    return out


def _files_of(folder: Path) -> set[str]:
    """Every file under ``folder`` (relative, POSIX), links included."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _why_not_replaceable(out: Path, format: str) -> str | None:
    """Why a non-empty ``out`` may not be replaced by an export of ``format`` without ``overwrite`` (None: it may).

    Only an earlier export of the same format whose manifest is valid, and only the files that manifest lists:
    anything else in the folder is the user's."""
    if not (out / MANIFEST_NAME).exists():
        return "is not empty and is not an earlier ice-lightning export"
    try:
        manifest = load_manifest(out)
    except (ExportVerificationError, OSError) as err:
        return f"holds an {MANIFEST_NAME} that is not a valid export manifest ({err})"
    earlier = manifest.get("export_format", "merged")
    if earlier != format:
        return f"holds an earlier {earlier} export; replacing it with a {format} export"
    extra = sorted(_files_of(out) - set(manifest["files"]) - {MANIFEST_NAME})
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        return f"holds files the earlier export did not write ({shown}), which replacing it would delete"
    return None


def check_export_destination(pipeline, out_dir: str | os.PathLike, overwrite: bool = False,
                             format: str = "merged") -> Path:  # fmt: skip
    """Refuse, before anything is written, a destination an export must not replace; returns it resolved.

    Refused: the folder ``pipeline`` was loaded from (or one inside or around it), a file, a non-empty folder
    that is not an earlier export of this package with a valid manifest, of the same ``format``, holding only the
    files that manifest lists (unless ``overwrite``), a place that cannot be created."""
    out = Path(out_dir).resolve()
    for src in _source_folders(pipeline):
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(
                f"the export folder {out} is (or holds, or lies inside) the folder the pipeline was loaded from, "
                f"{src}; an export never writes there. Choose another folder"
            )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"the export destination {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        reason = _why_not_replaceable(out, format)
        if reason is not None:
            raise FileExistsError(
                f"the export folder {out} {reason}; choose a new or empty folder, or pass overwrite=True "
                "(--overwrite) to replace it"
            )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"the export folder {out} cannot be created under {existing}; choose another")
    return out


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.ice-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Hold the lock file ``.NAME.ice-lock`` beside ``out`` for the whole export: a second export to the same
    folder is refused while the first runs. A lock left by a process that no longer runs (SIGKILL) is taken
    over, with one log line."""
    path = _lock_path(out)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, out, me)
            continue
        except OSError as err:  # the first write of an export: a place that takes none is refused by name
            raise PermissionError(f"the export folder {out} cannot be written ({err.strerror}); choose another "
                                  "folder") from None  # fmt: skip
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise FileExistsError(f"the lock file {path} of another export keeps coming back; export elsewhere")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _take_over_if_stale(path: Path, out: Path, me: dict) -> None:
    """Remove the lock ``path`` if the process that took it no longer runs on this machine; else refuse."""
    try:
        holder = json.loads(path.read_text())
        stale = holder.get("host") == me["host"] and not _alive(int(holder["pid"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        holder, stale = {}, False
    if not stale:
        raise FileExistsError(
            f"another export to {out} is in progress (process {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"lock file {path}); wait for it to finish, or export elsewhere. If no export is running, delete the "
            "lock file"
        )
    log.warning("taking over the lock %s left by process %s, which no longer runs", path, holder["pid"])
    path.unlink(missing_ok=True)


def _recover_leftovers(out: Path) -> None:
    """Finish what an export killed mid-way (SIGKILL, a power cut) left beside ``out``: an earlier export moved
    aside with nothing in its place is put back; our temporary folders are removed. Each step logs one line."""
    for aside in sorted(out.parent.glob(f".{out.name}.ice-replaced-*")):
        if (aside / out.name).is_dir() and not out.exists():
            os.replace(aside / out.name, out)
            log.warning("restored the earlier export %s from %s, left by an interrupted export", out, aside)
        shutil.rmtree(aside, ignore_errors=True)
        log.warning("removed %s, left by an interrupted export to %s", aside, out)
    for tmp in sorted(out.parent.glob(f".{out.name}.ice-export-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, a partial export left by an interrupted export to %s", tmp, out)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends (main thread; elsewhere Python
    delivers no signal anyway): the two renames of a swap are never separated by Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda num, frame: caught.append(num)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for num in caught[:1]:
            handler = previous[num]
            if callable(handler):
                handler(num, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(num)


def gather_pipeline(pipeline):
    """A copy of ``pipeline`` whose sharded components (FSDP2 ``DTensor`` parameters) are whole, on rank 0's
    CPU; ``None`` on the other ranks. A collective: every rank calls it. Each sharded component's full state
    dict is gathered with ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (``full_state_dict``,
    ``cpu_offload``: only rank 0 holds it) into a new instance of its class; the other components are shared."""
    import inspect

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank0 = dist.get_rank() == 0
    whole = {}
    for name, comp in pipeline.components.items():
        if isinstance(comp, torch.nn.Module) and any(is_sharded(p) for p in comp.parameters()):
            if any(_is_lora(m) for m in comp.modules()):
                raise NotImplementedError(
                    f"the sharded {name} holds LoRA adapters; exporting a sharded LoRA fine-tune is not supported: "
                    "train the adapters with DDP (they are small), or merge them before sharding"
                )
            state = get_model_state_dict(comp, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank0:
                cls = type(comp).__bases__[-1] if type(comp).__name__.startswith("FSDP") else type(comp)  # FSDP2's
                copy = cls.from_config(comp.config)  # class is a subclass made for the sharded instance
                # own copies, in their dtypes: on a CPU mesh a gathered tensor may alias FSDP's buffers
                copy.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
                whole[name] = copy.eval()
    if not rank0:
        return None
    components = {**pipeline.components, **whole}
    params = inspect.signature(type(pipeline).__init__).parameters  # e.g. Wan 2.2's boundary_ratio
    settings = {k: v for k, v in pipeline.config.items() if k in params and k not in components}
    return type(pipeline)(**components, **settings)


def _lora_wrappers(pipeline) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified name, parent, attribute, wrapper)`` of every PEFT LoRA wrapper in the denoisers."""
    out = []
    for comp, model in denoisers(pipeline).items():
        for name, mod in model.named_modules():
            if _is_lora(mod):
                parent, _, attr = name.rpartition(".")
                out.append((f"{comp}.{name}", model.get_submodule(parent) if parent else model, attr, mod))
    return out


def _merged_linear(wrapper: nn.Module) -> nn.Linear:
    """A plain linear layer holding ``W + sum of the active adapters' B A s`` (float64 sum, cast once)."""
    base = wrapper.base_layer
    w = base.weight.detach().to(torch.float64)
    for adapter in wrapper.active_adapters:
        if adapter in wrapper.lora_A:
            w = w + wrapper.get_delta_weight(adapter).detach().to(torch.float64)
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device,
                    dtype=base.weight.dtype)  # fmt: skip
    lin.weight = nn.Parameter(w.to(base.weight.dtype), requires_grad=False)
    if base.bias is not None:
        lin.bias = base.bias
    return lin


@contextmanager
def without_adapters(pipeline, adapters: Adapters = "merge") -> Iterator[dict[str, str | None]]:
    """Within the block, every PEFT LoRA wrapper of the denoisers is replaced by a plain linear layer, so that
    ``save_pretrained`` writes a plain model: ``"merge"``, the base weight with the adapters merged in (what
    an erased LoRA fine-tune ships: erased whatever adapter a user adds later); ``"separate"``, the base layer
    alone (the adapters then ship beside it). The wrappers are put back afterwards, untouched.

    Yields ``{name of an edited layer inside a wrapper: the name it has in the plain model, or None}``:
    ``x.base_layer`` becomes ``x``; ``x.lora_A.<adapter>`` is merged into ``x`` (``None``); empty when there
    is no adapter."""
    wrappers = _lora_wrappers(pipeline)
    renamed: dict[str, str | None] = {}
    for name, _, _, wrapper in wrappers:
        renamed[f"{name}.base_layer"] = name
        renamed.update({f"{name}.lora_A.{a}": None for a in wrapper.lora_A})
    swapped = []
    try:
        for _, parent, attr, wrapper in wrappers:
            plain = _merged_linear(wrapper) if adapters == "merge" else wrapper.base_layer
            setattr(parent, attr, plain)
            swapped.append((parent, attr, wrapper))
        yield renamed
    finally:
        for parent, attr, wrapper in swapped:
            setattr(parent, attr, wrapper)


def _adapter_files(pipeline, folder: Path) -> None:
    """Each denoiser's LoRA adapters in diffusers' format, ``ADAPTERS_DIR/<component>/`` (loadable with the
    denoiser's ``load_lora_adapter``); one file per adapter name."""
    wrappers = _lora_wrappers(pipeline)
    for comp, model in denoisers(pipeline).items():
        names = {a for n, _p, _a, w in wrappers if n.startswith(f"{comp}.") for a in w.lora_A}
        for adapter in sorted(names):
            out = folder / ADAPTERS_DIR / comp
            weight_name = "pytorch_lora_weights.safetensors" if adapter == "default" else f"{adapter}.safetensors"
            if hasattr(model, "save_lora_adapter"):
                model.save_lora_adapter(str(out), adapter_name=adapter, weight_name=weight_name)
            else:  # a denoiser class without diffusers' adapter mixin: PEFT's state dict, same file
                from peft.utils import get_peft_model_state_dict
                from safetensors.torch import save_file

                out.mkdir(parents=True, exist_ok=True)
                state = get_peft_model_state_dict(model, adapter_name=adapter)
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / weight_name))


def rebased(pipeline, results: Sequence[ErasureResult], source: str,
            renamed: dict[str, str | None] | None = None) -> list[ErasureResult]:  # fmt: skip
    """The erasures of ``results`` described over the layers ``pipeline`` holds now (renamed by
    :func:`without_adapters`, or whole copies made by :func:`gather_pipeline`), recording nothing; ``source``
    says which (the manifest's ``recorded_from``)."""
    renamed = renamed or {}
    out = []
    for r in results:
        spaces = {renamed.get(n, n): s for n, s in r.layer_spaces.items() if renamed.get(n, n) is not None}
        plan = ErasurePlan(pipeline, r.spec, method=r.method, hparams=r.plan.hparams, layers=spaces, verify=False)
        out.append(plan.restore(r.operators, source=source, record=False))
    return out


def _file_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[p.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def _concept_states(pipeline, spec: ConceptSpec, spaces: set[str]) -> dict[str, Tensor]:
    all_spaces = pipeline_spaces(pipeline)
    return {s: all_spaces[s].token_states(spec.heldout_erase_prompts()) for s in spaces}


def _residuals(pipeline, result: ErasureResult) -> dict[str, float]:
    """The concept residual of ``result`` through the current layers (and, when known, through the weights
    it started from)."""
    states = _concept_states(pipeline, result.spec, set(result.layer_spaces.values()))
    now = {n: (m.weight, m.bias) for n, m in result.modules().items()}
    out = {"concept_residual": concept_residual(now, result.layer_spaces, states, result.operators)}
    if result.pre_edit_outputs is not None:  # keep_undo=False: recorded before the edit was written
        out["concept_residual_before"] = residual_of_outputs(result.pre_edit_outputs.values())
    elif not result.restored:
        before = result.reference_weights()
        out["concept_residual_before"] = concept_residual(before, result.layer_spaces, states, result.operators)
    return out


def save_erased(
    pipeline,
    out_dir: str | os.PathLike,
    results: Sequence[ErasureResult] | None = None,
    safe_serialization: bool = True,
    extra: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
    adapters: Adapters = "merge",
    format: ExportFormat = "merged",
) -> Path:
    """Save ``pipeline`` with ``save_pretrained``, its operators, the ICE manifest and a model card.

    Args:
        results: the erasures to record; default: every live erasure applied to ``pipeline``.
        extra: more JSON-ready entries for the manifest (the callback records its applications here).
        overwrite: replace a non-empty ``out_dir`` that is not an earlier export (refused otherwise).
        extra_files: ``{relative name: bytes}`` shipped with the export and covered by its hashes (a report).
        adapters: for denoisers with PEFT LoRA adapters (an ``ICEModule(lora_rank=...)`` fine-tune):
            ``"merge"`` ships one plain model with the erased adapters merged into the erased base weights;
            ``"separate"`` ships the erased base model and the erased adapters beside it, in
            ``ice_adapters/<component>/`` (diffusers' LoRA format). See :func:`without_adapters`.
        format: ``"merged"`` (default, what to ship): the erased diffusers folder. ``"lora"``: the edit alone, as
            the diffusers/PEFT LoRA it exactly is (``Delta W = -(W U) M U^T`` per layer: ``lora_A = U^T``,
            ``lora_B = Delta W U``), in ``pytorch_lora_weights.safetensors`` with the manifest: load it onto the
            original model with ``pipe.load_lora_weights(out_dir)`` and ``pipe.fuse_lora()`` to get the erased
            weights (see :func:`erasure_lora`).

    Returns:
        the output directory. Everything is written to a temporary sibling folder first and renamed into
        place at the end, so an error or an interrupt leaves ``out_dir`` as it was.
    """
    results = [r for r in (results if results is not None else edit_history(pipeline)) if not r.undone]
    if not results:
        raise ValueError("nothing was erased from this pipeline; call ice_lightning.erase(...) before save_erased")
    _check_results_belong(pipeline, results)
    if format not in ("merged", "lora"):
        raise ValueError(f"format must be 'merged' or 'lora', got {format!r}")
    if adapters not in ("merge", "separate"):
        raise ValueError(f"adapters must be 'merge' or 'separate', got {adapters!r}")
    lora = erasure_lora(pipeline, results) if format == "lora" else None  # checked before anything is written
    out = check_export_destination(pipeline, out_dir, overwrite, format)
    out.parent.mkdir(parents=True, exist_ok=True)
    with export_lock(out):
        _recover_leftovers(out)
        out = check_export_destination(pipeline, out, overwrite, format)  # what the recovery put back, too
        _write_export(pipeline, results, out, safe_serialization, extra, extra_files, adapters, lora)
    return out


def _write_export(pipeline, results, out: Path, safe_serialization: bool, extra, extra_files, adapters,
                  lora) -> None:  # fmt: skip
    """Write the export into a temporary sibling of ``out`` and swap it into place (the caller holds the lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ice-export-", dir=out.parent))
    inherited_ops: list[dict[str, DissociationOperator]] = []
    try:
        if lora is not None:
            manifest = _lora_files(pipeline, results, lora, tmp, extra)
        else:
            if adapters == "separate":
                _adapter_files(pipeline, tmp)
            with without_adapters(pipeline, adapters) as renamed:
                if renamed:
                    source = {"merge": "adapters merged", "separate": "adapters shipped beside"}[adapters]
                    results = rebased(pipeline, results, source, renamed)
                pipeline.save_pretrained(tmp, safe_serialization=safe_serialization)
                inherited, inherited_ops = _inherited(pipeline)
                manifest = _manifest(pipeline, results, extra, inherited)
                if renamed:
                    manifest["adapters"] = adapters
        _save_operators(tmp / OPERATORS_NAME, [*inherited_ops, *(r.operators for r in results)])
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        _write_card(tmp, manifest)
        manifest["files"] = _file_hashes(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_results_belong(pipeline, results: Sequence[ErasureResult]) -> None:
    """Refuse erasure records of another pipeline: a manifest may only claim what this pipeline's layers hold."""
    for i, r in enumerate(results):
        for name, module in r.modules().items():
            try:
                own = resolve_layer(pipeline, name)
            except AttributeError:
                own = None
            if own is not module:
                raise ValueError(
                    f"results[{i}] (the erasure of {r.spec.erase}) was applied to another pipeline: layer {name!r} "
                    "is not this pipeline's module. Export the pipeline it was applied to, or leave results=None "
                    "to export this pipeline's own erasures"
                )


def _check_lora_loadable(pipeline, results: Sequence[ErasureResult]) -> None:
    """Refuse ``format="lora"`` where diffusers cannot load the LoRA back exactly, before anything is written."""
    edited = {n.split(".", 1)[0] for r in results for n in r.layers}
    if "transformer_2" in edited:
        raise ValueError(
            f"format='lora' cannot ship this erasure of {type(pipeline).__name__}: it edits both experts "
            "(transformer and transformer_2), and diffusers' load_lora_weights loads one LoRA into transformer only "
            "(with load_into_transformer_2=True, the same weights into both, which are not the same edit). Export "
            "the merged model (format='merged')"
        )
    if not callable(getattr(pipeline, "load_lora_weights", None)):
        raise ValueError(
            f"format='lora': {type(pipeline).__name__} has no load_lora_weights, so no diffusers LoRA loads onto it; "
            "export the merged model (format='merged')"
        )
    for comp in sorted(edited):
        model = getattr(pipeline, comp)
        if not callable(getattr(model, "load_lora_adapter", None)):
            raise ValueError(
                f"format='lora': the {comp} of {type(pipeline).__name__} ({type(model).__name__}) has no "
                "load_lora_adapter, so diffusers cannot load a LoRA into it; export the merged model "
                "(format='merged')"
            )


def erasure_lora(pipeline, results: Sequence[ErasureResult] | None = None) -> dict[str, Tensor]:
    """The erasures ``results`` (default: every live one of ``pipeline``) as one LoRA in diffusers' format,
    ``{"<component>.<layer>.lora_A.weight": U^T, "<component>.<layer>.lora_B.weight": Delta W U}`` (float32).

    Each edit of a layer changes it by ``-(X U) M U^T``: its rows lie in the span of the operator's ``U``. The
    total change since before the first erasure, ``Delta W`` (rebuilt from the undo records, float64), therefore
    equals ``(Delta W U) U^T`` with ``U`` an orthonormal basis of every erasure's span for that layer, a LoRA of
    that rank with scale 1. Successive erasures (several ``erase()`` calls) give one LoRA."""
    results = [r for r in (results if results is not None else edit_history(pipeline)) if not r.undone]
    if not results:
        raise ValueError("nothing was erased from this pipeline; call ice_lightning.erase(...) before save_erased")
    _check_results_belong(pipeline, results)
    if any(r.restored for r in results):
        raise ValueError(
            "format='lora' needs the weights from before the erasure, which a model restored from a checkpoint (or "
            "a sharded or adapter fine-tune) does not have; export the merged model (format='merged')"
        )
    _check_lora_loadable(pipeline, results)
    if any(_is_lora(m) for comp in denoisers(pipeline).values() for m in comp.modules()):
        raise ValueError(
            "format='lora' exports the erasure of plain weights; this pipeline carries LoRA adapters: export the "
            "merged model (format='merged') or the adapters beside it (adapters='separate')"
        )
    if not all(e.undoable for r in results for e in r.edits):
        raise ValueError(
            "format='lora' rebuilds each edit from its undo record, and an erasure was applied with keep_undo=False; "
            "erase again with keep_undo=True, or export format='merged'"
        )
    out: dict[str, Tensor] = {}
    layers = list(dict.fromkeys(n for r in results for n in r.layers))
    for name in layers:
        chain = [(r, next(e for e in r.edits if e.name == name)) for r in results if name in r.layer_spaces]
        module = chain[-1][1].module
        if tensor_sha256(module.weight) != chain[-1][1].fingerprint:
            raise ValueError(
                f"layer {name!r} changed since it was erased (training?): its erasure is no longer the difference "
                "from the original weights; export the merged model (format='merged')"
            )
        now = module.weight.detach().to(torch.float64)
        w = now
        for _, edit in reversed(chain):  # walk back to the weight before the first erasure
            w = edit.before(after=w)
        spans = [r.operators[r.layer_spaces[name]].U.to(torch.float64) for r, _ in chain]
        U = spans[0] if len(spans) == 1 else torch.linalg.svd(torch.cat(spans, 1), full_matrices=False)[0]
        delta = now - w.to(now.device)
        out[f"{name}.lora_A.weight"] = U.T.to(torch.float32).contiguous().cpu()
        out[f"{name}.lora_B.weight"] = (delta @ U.to(now.device)).to(torch.float32).contiguous().cpu()
    return out


def _lora_files(pipeline, results: list[ErasureResult], lora: dict[str, Tensor], folder: Path,
                extra: dict | None) -> dict:  # fmt: skip
    """Write the LoRA file of ``format="lora"`` into ``folder``; return its manifest (files not yet hashed)."""
    from safetensors.torch import save_file

    save_file(lora, str(folder / LORA_NAME), metadata={"format": "pt", "ice_lightning": _FORMAT})
    return {
        "format": _FORMAT,
        "export_format": "lora",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline_class": type(pipeline).__name__,
        "erasures": [r.to_manifest() for r in results],
        "erased_concepts": list(dict.fromkeys(c for r in results for c in r.spec.erase)),
        "versions": _versions(),
        "operators_file": OPERATORS_NAME,
        "lora_file": LORA_NAME,
        "lora_bytes": (folder / LORA_NAME).stat().st_size,
        "lora_ranks": {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in lora.items()
                       if k.endswith(".lora_A.weight")},  # fmt: skip
        **(extra or {}),
    }


def _inherited(pipeline) -> tuple[list[dict], list[dict[str, DissociationOperator]]]:
    """The erasures of the earlier export ``pipeline`` was loaded from (its valid merged manifest), with their
    operators: an export of a model erased again carries them, its residuals recomputed through today's layers."""
    for folder in _source_folders(pipeline):
        if not (folder / MANIFEST_NAME).is_file():
            continue
        try:
            earlier = load_manifest(folder)
            if earlier.get("export_format", "merged") != "merged":
                continue
            operators = _load_operators(folder / earlier.get("operators_file", OPERATORS_NAME), earlier)
        except (ExportVerificationError, OSError) as err:
            log.warning("not carrying the erasures of %s: its manifest cannot be read (%s)", folder, err)
            continue
        out = []
        for e, ops in zip(earlier["erasures"], operators, strict=True):
            _, now = _recorded_residual_now(pipeline, e, ops)
            digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
            source = {"export": str(folder), "manifest_sha256": digest,
                      "concept_residual_at_export": e["concept_residual"]}  # fmt: skip
            out.append({**e, "concept_residual": now, "inherited_from": source})
        return out, operators
    return [], []


def _manifest(pipeline, results: list[ErasureResult], extra: dict | None,
              inherited: list[dict] | None = None) -> dict:  # fmt: skip
    erasures = [*(inherited or []), *({**r.to_manifest(), **_residuals(pipeline, r)} for r in results)]
    layers = list(dict.fromkeys([*(n for e in inherited or [] for n in e["layers"]),
                                 *(n for r in results for n in r.layers)]))  # fmt: skip
    return {
        "format": _FORMAT,
        "export_format": "merged",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline_class": type(pipeline).__name__,
        "erasures": erasures,
        "erased_concepts": list(dict.fromkeys(c for e in erasures for c in e["concepts"]["erase"])),
        "versions": _versions(),
        "operators_file": OPERATORS_NAME,
        "edited_tensors": {f"{n}.weight": tensor_sha256(_weight(pipeline, n)) for n in layers},
        **(extra or {}),
    }


def _save_operators(path: Path, operators: Sequence[dict[str, DissociationOperator]]) -> None:
    """The operators of each erasure, in the manifest's order (``{i}.{space}.U`` and ``.M``)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, ops in enumerate(operators):
        for space, op in ops.items():
            tensors[f"{i}.{space}.U"] = op.U.detach().cpu().contiguous()
            tensors[f"{i}.{space}.M"] = op.M.detach().cpu().contiguous()
    save_file(tensors, str(path))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (checked replaceable) is moved aside first and removed
    only once the new one is in place. Signals wait until both renames are done; a SIGKILL between them leaves
    the earlier export aside, which the next export to ``out`` puts back (:func:`_recover_leftovers`)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.ice-replaced-", dir=out.parent))
    try:
        with _signals_deferred():  # a signal caught here is raised as the block ends, after both renames
            os.replace(out, aside / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(aside / out.name, out)
                raise
    finally:
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)


def _write_card(out: Path, manifest: dict) -> None:
    lines = [
        _CARD_MARK,
        "## Concept erasure (ICE)",
        "",
        "This model was edited with [ice-lightning](https://pypi.org/project/ice-lightning/) "
        "(Instant Concept Erasure): a closed-form edit of the layers that read the text encoder's states.",
        "",
        "| erased | family | method | edited layers |",
        "|---|---|---|---|",
    ]
    for e in manifest["erasures"]:
        c = e["concepts"]
        lines.append(f"| {', '.join(c['erase'])} | {c['family']} | {e['method']} | {len(e['layers'])} |")
    lines += ["", f"Hashes of the edited tensors are in `{MANIFEST_NAME}`.", ""]
    card = out / "README.md"
    text = card.read_text() if card.exists() else ""
    if _CARD_MARK in text:
        text = text[: text.index(_CARD_MARK)]
    card.write_text((text.rstrip() + "\n\n" if text.strip() else "") + "\n".join(lines))


def load_manifest(path: str | os.PathLike) -> dict:
    """Read ``ice_manifest.json`` from an exported folder (checked against the manifest's schema)."""
    p = Path(path) / MANIFEST_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: {path} was not exported with ice_lightning.save_erased")
    try:
        manifest = json.loads(p.read_text())
    except ValueError as err:
        raise ExportVerificationError(f"{p} is not valid JSON ({err})") from err
    _check_schema(manifest)
    return manifest


def _need(cond: bool, field: str, what: str) -> None:
    if not cond:
        raise ExportVerificationError(f"malformed manifest: field {field!r} {what}; re-export the model")


def _is_digest(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _check_schema(m) -> None:
    _need(isinstance(m, dict), "(top level)", f"must be an object, got {type(m).__name__}")
    _need(m.get("format") == _FORMAT, "format", f"must be {_FORMAT!r}, got {m.get('format')!r}")
    _need(isinstance(m.get("pipeline_class"), str), "pipeline_class", "must be a string")
    _need(isinstance(m.get("erasures"), list) and len(m["erasures"]) > 0, "erasures", "must be a non-empty list")
    lora = m.get("export_format") == "lora"
    for i, e in enumerate(m["erasures"]):
        f = f"erasures[{i}]"
        _need(isinstance(e, dict), f, "must be an object")
        _need(isinstance(e.get("concepts"), dict) and isinstance(e["concepts"].get("erase"), list),
              f"{f}.concepts", "must be an object with an 'erase' list")  # fmt: skip
        _need(isinstance(e.get("layers"), list) and all(isinstance(n, str) for n in e["layers"]) and e["layers"],
              f"{f}.layers", "must be a non-empty list of layer names")  # fmt: skip
        spaces = e.get("layer_spaces")
        _need(isinstance(spaces, dict) and set(spaces) == set(e["layers"]), f"{f}.layer_spaces",
              "must map every edited layer to its embedding space")  # fmt: skip
        if not lora:
            _need(isinstance(e.get("concept_residual"), (int, float)), f"{f}.concept_residual", "must be a number")
            if not (e.get("restored_from_checkpoint") or e.get("recorded_from")):  # else no pre-edit weights
                _need(isinstance(e.get("concept_residual_before"), (int, float)), f"{f}.concept_residual_before",
                      "must be a number (the residual before the edit, which verify compares against)")  # fmt: skip
    _need(m.get("export_format", "merged") in ("merged", "lora"), "export_format", "must be 'merged' or 'lora'")
    if lora:
        _need(isinstance(m.get("lora_file"), str), "lora_file", "must name the LoRA file")
    for field in ("files",) if lora else ("edited_tensors", "files"):
        v = m.get(field)
        _need(isinstance(v, dict) and v and all(isinstance(k, str) and _is_digest(d) for k, d in v.items()),
              field, "must map names to sha256 hex digests")  # fmt: skip
    if lora:
        _need(m["lora_file"] in m["files"], "lora_file",
              f"must be one of the export's hashed files, got {m['lora_file']!r}")  # fmt: skip
        return
    named = {f"{n}.weight" for e in m["erasures"] for n in e["layers"]}
    _need(set(m["edited_tensors"]) == named, "edited_tensors",
          f"must list exactly the layers the erasures name ({len(named)}), got {len(m['edited_tensors'])}")  # fmt: skip


def verify_export(path: str | os.PathLike, pipeline=None, check_erasure: bool = True) -> dict[str, bool]:
    """Check an export against its manifest; raise :class:`ExportVerificationError` at the first mismatch.

    A LoRA export (``format="lora"``) holds no model: its schema and the sha256 of its files are checked.

    1. the manifest's schema, and that its edited tensors are exactly the layers its erasures name;
    2. the sha256 of every file of the export (weights, configs, tokenizer, operators), none missing and none
       added;
    3. the sha256 of every edited tensor as loaded (``from_pretrained`` unless ``pipeline`` is given);
    4. with ``check_erasure``: each erasure's concept residual, recomputed through the shipped layers with the
       stored operators and the shipped text encoder, equals the recorded one and is below the residual
       before the edit: the erasure is present, not only the bytes.

    Returns ``{check: True}`` for every check that ran.
    """
    folder = Path(path)
    manifest = load_manifest(folder)
    files = _file_hashes(folder)
    missing = sorted(set(manifest["files"]) - set(files))
    added = sorted(set(files) - set(manifest["files"]))
    changed = sorted(k for k in set(files) & set(manifest["files"]) if files[k] != manifest["files"][k])
    if missing or added or changed:
        raise ExportVerificationError(
            f"the files of {folder} do not match the manifest: changed {changed[:5]}, missing {missing[:5]}, "
            f"added {added[:5]}"
        )
    checks = {f"file:{k}": True for k in files}
    try:
        return _verify_contents(folder, manifest, checks, pipeline, check_erasure)
    except ExportVerificationError:
        raise
    except (OSError, AttributeError, KeyError, IndexError, ValueError, RuntimeError) as err:
        raise ExportVerificationError(f"{folder} cannot be verified: {type(err).__name__}: {err}") from err


def _verify_contents(folder: Path, manifest: dict, checks: dict, pipeline, check_erasure: bool) -> dict[str, bool]:
    """Steps 3 and 4 of :func:`verify_export` (the files already match the manifest)."""
    if manifest.get("export_format") == "lora":  # the edit alone: its file must be the recorded operators' change
        _check_lora(folder, manifest)
        checks["lora"] = True
        return checks
    if pipeline is None:
        from .pipelines import load_pipeline_folder

        pipeline = load_pipeline_folder(str(folder))
    for k in manifest["edited_tensors"]:
        try:
            _weight(pipeline, k.removesuffix(".weight"))
        except AttributeError:
            raise ExportVerificationError(f"the manifest names the edited tensor {k!r}, which the shipped pipeline "
                                          "does not have") from None  # fmt: skip
    bad = [k for k, d in manifest["edited_tensors"].items()
           if tensor_sha256(_weight(pipeline, k.removesuffix(".weight"))) != d]  # fmt: skip
    if bad:
        raise ExportVerificationError(f"{len(bad)} edited tensor(s) do not match the manifest, e.g. {bad[:3]}")
    checks.update({k: True for k in manifest["edited_tensors"]})
    if check_erasure:
        operators = _load_operators(folder / manifest.get("operators_file", OPERATORS_NAME), manifest)
        for i, e in enumerate(manifest["erasures"]):
            _check_erasure_present(pipeline, i, e, operators[i])
            checks[f"erasure:{i}"] = True
    return checks


def _check_lora(folder: Path, manifest: dict) -> None:
    """A LoRA export's file covers exactly the layers its erasures name, and each layer's ``lora_A`` rows lie in the
    span of the recorded operators of that layer's space (every edit's change ``-(W U) M U^T`` does)."""
    from safetensors.torch import load_file

    lora = load_file(str(folder / manifest["lora_file"]))
    layers = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    named = {n for e in manifest["erasures"] for n in e["layers"]}
    if layers != named or set(lora) != {f"{n}.lora_{x}.weight" for n in named for x in "AB"}:
        raise ExportVerificationError(
            f"the LoRA file {manifest['lora_file']} does not hold exactly the {len(named)} layers the erasures name "
            f"(it holds {len(layers)})"
        )
    operators = _load_operators(folder / manifest.get("operators_file", OPERATORS_NAME), manifest)
    for name in sorted(named):
        spans = [ops[e["layer_spaces"][name]].U for e, ops in zip(manifest["erasures"], operators, strict=True)
                 if name in e["layer_spaces"]]  # fmt: skip
        U = torch.linalg.svd(torch.cat(spans, 1), full_matrices=False)[0]
        A = lora[f"{name}.lora_A.weight"].to(torch.float64)
        off = float((A - (A @ U) @ U.T).norm() / A.norm().clamp_min(1e-300))
        if off > 1e-4:
            raise ExportVerificationError(
                f"the LoRA of layer {name!r} is not the recorded operators' change: {off:.2g} of it lies outside "
                "their span"
            )


def _load_operators(path: Path, manifest: dict) -> list[dict[str, DissociationOperator]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = []
    for i, e in enumerate(manifest["erasures"]):
        ops = {}
        for space in set(e["layer_spaces"].values()):
            U, M = tensors.get(f"{i}.{space}.U"), tensors.get(f"{i}.{space}.M")
            if U is None or M is None:
                raise ExportVerificationError(f"{path.name} has no operator for erasures[{i}], space {space!r}")
            ops[space] = DissociationOperator(U.to(torch.float64), M.to(torch.float64), e.get("method", "ice"), {})
        out.append(ops)
    return out


def _recorded_residual_now(pipeline, e: dict, operators: dict[str, DissociationOperator]) -> tuple[ConceptSpec, float]:
    """The spec of a manifest's erasure record ``e`` and its concept residual through ``pipeline``'s layers now."""
    spec = ConceptSpec(**{k: v for k, v in e["concepts"].items() if k in ConceptSpec.__dataclass_fields__})
    states = _concept_states(pipeline, spec, set(e["layer_spaces"].values()))
    mods = {n: resolve_layer(pipeline, n) for n in e["layers"]}
    return spec, concept_residual({n: (m.weight, m.bias) for n, m in mods.items()}, e["layer_spaces"], states,
                                  operators)  # fmt: skip


def _check_erasure_present(pipeline, i: int, e: dict, operators: dict[str, DissociationOperator]) -> None:
    spec, now = _recorded_residual_now(pipeline, e, operators)
    recorded, before = e["concept_residual"], e.get("concept_residual_before")
    if abs(now - recorded) > _RESIDUAL_ATOL + _RESIDUAL_RTOL * abs(recorded):
        raise ExportVerificationError(
            f"erasure {i} ({spec.erase}): the shipped layers respond along the erased directions with residual "
            f"{now:.6g}, but the export recorded {recorded:.6g}: these are not the erased weights"
        )
    if before is not None and not recorded < before:
        raise ExportVerificationError(
            f"erasure {i} ({spec.erase}): the recorded residual {recorded:.6g} is not below the one before the "
            f"edit ({before:.6g}): the manifest does not describe an erasure"
        )
