"""Write an export safely: the destination checked before any work, a lock beside it, everything written into a
temporary sibling folder and renamed into place at the end (an interrupt or a full disk leaves the destination as
it was); a non-empty destination that is not an earlier export is refused unless ``overwrite=True``; the folder the
pipeline was loaded from is never written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..solver import DissociationOperator
from .adapters import Adapters, _adapter_files, without_adapters
from .lora import LORA_FORMATS, _check_kohya, _lora_files, erasure_lora
from .manifest import (
    MANIFEST_NAME,
    OPERATORS_NAME,
    ExportVerificationError,
    _check_results_belong,
    _file_hashes,
    _inherited,
    _manifest,
    _save_operators,
    _source_folders,
    _to_export,
    _write_card,
    load_manifest,
    record_of,
)
from .single_file import SINGLE_FILE_NAME, check_single_file, write_single_config, write_single_file

if TYPE_CHECKING:
    from ..record import ErasureRecord
    from ..result import ErasureResult

__all__ = ["ExportFormat", "save_erased", "check_export_destination", "export_lock"]

log = logging.getLogger(__name__)


ExportFormat = Literal["merged", "lora", "lora-kohya", "single-file"]
_FORMATS = ("merged", *LORA_FORMATS, "single-file")


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


def save_erased(
    pipeline,
    out_dir: str | os.PathLike,
    results: Sequence[ErasureResult | ErasureRecord] | None = None,
    safe_serialization: bool = True,
    extra: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
    adapters: Adapters = "merge",
    format: ExportFormat = "merged",
    source_file: str | os.PathLike | None = None,
) -> Path:
    """Save ``pipeline`` with ``save_pretrained``, its operators, the ICE manifest and a model card.

    Args:
        results: the erasures to record (live results or plain :class:`~ice_lightning.core.record.ErasureRecord`
            s of the layers ``pipeline`` holds); default: every live erasure applied to ``pipeline``.
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
            weights (see :func:`erasure_lora`). ``"lora-kohya"``: the same LoRA with kohya's keys
            (``lora_unet_..._lora_down/up`` plus ``alpha``), the file Automatic1111, Forge, ComfyUI and InvokeAI load
            (and ``load_lora_weights`` too); UNets only (SD 1.x/2.x, SDXL). ``"single-file"``: the erased model as
            one checkpoint in the original (LDM/SGM) layout, ``model.safetensors``, the file Automatic1111, Forge,
            ComfyUI, InvokeAI and ``from_single_file`` load (SD 1.x/2.x, SDXL), with the diffusers configs
            ``from_single_file`` reads offline in ``config/``: ``StableDiffusionPipeline.from_single_file(
            out_dir / "model.safetensors", config=out_dir / "config")``. See :mod:`.single_file`.
        source_file: with ``format="single-file"``, the single file ``pipeline`` was loaded from
            (``from_single_file``): the export is a copy of it in which only the edited tensors differ (in the
            file's own dtype). Without it the whole checkpoint is written from the pipeline.

    Returns:
        the output directory. Everything is written to a temporary sibling folder first and renamed into
        place at the end, so an error or an interrupt leaves ``out_dir`` as it was.
    """
    results = _to_export(pipeline, results)
    _check_results_belong(pipeline, results)
    if format not in _FORMATS:
        raise ValueError(f"format must be 'merged' or 'lora' (diffusers/PEFT keys), or 'lora-kohya', or 'single-file', "
                         f"got {format!r}")  # fmt: skip
    if source_file is not None and format != "single-file":
        raise ValueError(f"source_file is the single file a format='single-file' export patches; with "
                         f"format={format!r} nothing reads it: drop it, or export format='single-file'")  # fmt: skip
    if format == "single-file" and adapters != "merge":
        raise ValueError("format='single-file' ships one checkpoint: adapters are merged into it (adapters='merge'); "
                         "ship them beside the model with the diffusers folder (format='merged', adapters='separate')")
    if adapters not in ("merge", "separate"):
        raise ValueError(f"adapters must be 'merge' or 'separate', got {adapters!r}")
    if format == "lora-kohya":
        _check_kohya(pipeline, results)
    if format == "single-file":  # on the model the file gets: adapters merged, the layers under their plain names
        with without_adapters(pipeline, adapters) as renamed:
            plain = [record_of(r).renamed(renamed, "adapters merged") for r in results] if renamed else results
            check_single_file(pipeline, source_file, _edited_layers(plain))
    lora = erasure_lora(pipeline, results) if format in LORA_FORMATS else None  # checked before anything is written
    out = check_export_destination(pipeline, out_dir, overwrite, format)
    out.parent.mkdir(parents=True, exist_ok=True)
    with export_lock(out):
        _recover_leftovers(out)
        out = check_export_destination(pipeline, out, overwrite, format)  # what the recovery put back, too
        _write_export(pipeline, results, out, safe_serialization, extra, extra_files, adapters, lora, format,
                      source_file)  # fmt: skip
    return out


def _edited_layers(results) -> list[str]:
    """Every layer the erasures edited, once, in order."""
    return list(dict.fromkeys(n for r in results for n in r.layers))


def _write_export(pipeline, results, out: Path, safe_serialization: bool, extra, extra_files, adapters,
                  lora, format: str = "merged", source_file=None) -> None:  # fmt: skip
    """Write the export into a temporary sibling of ``out`` and swap it into place (the caller holds the lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.ice-export-", dir=out.parent))
    inherited_ops: list[dict[str, DissociationOperator]] = []
    try:
        if lora is not None:
            manifest = _lora_files(pipeline, results, lora, tmp, extra, format)
        else:
            if adapters == "separate":
                _adapter_files(pipeline, tmp)
            with without_adapters(pipeline, adapters) as renamed:
                if renamed:
                    source = {"merge": "adapters merged", "separate": "adapters shipped beside"}[adapters]
                    results = [record_of(r).renamed(renamed, source) for r in results]
                if format == "single-file":
                    written = write_single_file(pipeline, tmp / SINGLE_FILE_NAME, source_file, _edited_layers(results))
                    write_single_config(pipeline, tmp / "config")
                else:
                    pipeline.save_pretrained(tmp, safe_serialization=safe_serialization)
                inherited, inherited_ops = _inherited(pipeline)
                manifest = _manifest(pipeline, results, extra, inherited)
                if format == "single-file":
                    manifest.update(written)  # the edited tensors as the file holds them
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
