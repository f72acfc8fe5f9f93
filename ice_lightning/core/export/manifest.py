"""The export's manifest: what was erased (concepts, method, hyperparameters, layers and the space each reads),
the library versions, the sha256 of every file and of each edited tensor, each erasure's concept residual through
the shipped layers; the operators file beside it; its schema; the model card's section."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..concepts import ConceptSpec
from ..editing import layer_outputs, tensor_sha256
from ..parts import edit_history, pipeline_spaces, resolve_layer
from ..probe import concept_residual, residual_of_responses
from ..record import ErasureRecord
from ..sharding import like_weight, local_shard
from ..solver import DissociationOperator

if TYPE_CHECKING:
    from ..result import ErasureResult

__all__ = ["MANIFEST_NAME", "OPERATORS_NAME", "ExportVerificationError", "load_manifest"]

log = logging.getLogger(__name__)


MANIFEST_NAME = "ice_manifest.json"


OPERATORS_NAME = "ice_operators.safetensors"


_FORMAT = "ice-lightning/manifest-v3"


# v2 recorded the concept residual as ||W D c|| / ||W c + b||, which a soft operator need not lower (see
# concept_residual); its exports still verify, against the quantity they recorded.
_FORMAT_V2 = "ice-lightning/manifest-v2"


_CARD_MARK = "<!-- ice-lightning -->"


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


def _to_export(pipeline, results: Sequence[ErasureResult | ErasureRecord] | None) -> list:
    """``results`` (default: the pipeline's erasure history) without the undone ones; refused when empty."""
    results = [r for r in (results if results is not None else edit_history(pipeline)) if not getattr(r, "undone", 0)]
    if not results:
        raise ValueError("nothing was erased from this pipeline; call ice_lightning.erase(...) before save_erased")
    return results


def record_of(result: ErasureResult | ErasureRecord) -> ErasureRecord:
    """The plain record of an erasure (an :class:`ErasureRecord` is its own)."""
    return result if isinstance(result, ErasureRecord) else result.record


def _check_results_belong(pipeline, results: Sequence[ErasureResult | ErasureRecord]) -> None:
    """Refuse erasure records of another pipeline: a manifest may only claim what this pipeline's layers hold. A
    live result names its modules (they must be this pipeline's); a plain record names layers, which must exist
    here and read states of its operators' width."""
    for i, r in enumerate(results):
        if isinstance(r, ErasureRecord):
            _check_record_fits(pipeline, i, r)
            continue
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


def _check_record_fits(pipeline, i: int, record: ErasureRecord) -> None:
    for name, space in record.layer_spaces.items():
        try:
            width = resolve_layer(pipeline, name).weight.shape[-1]
        except AttributeError:
            width = None
        if width != record.operators[space].dim:
            raise ValueError(
                f"results[{i}] (the erasure of {record.spec.erase}) names layer {name!r}, which this pipeline "
                f"{'lacks' if width is None else f'has reading {width}-d states, not {record.operators[space].dim}-d'}"
                ": export the pipeline it describes"
            )


def _residuals(pipeline, result: ErasureResult | ErasureRecord) -> dict[str, float]:
    """The concept residual of ``result`` through the pipeline's layers now (and, for a live result that knows
    them, through the weights it started from)."""
    record = record_of(result)
    states = _concept_states(pipeline, record.spec, set(record.layer_spaces.values()))
    modules = {n: resolve_layer(pipeline, n) for n in record.layers}
    now = {n: (m.weight, m.bias) for n, m in modules.items()}
    out = {"concept_residual": concept_residual(now, record.layer_spaces, states, record.operators)}
    if isinstance(result, ErasureRecord):
        before = _record_before(pipeline, result)
        if before is not None:
            out["concept_residual_before"] = concept_residual(before, record.layer_spaces, states, record.operators)
        elif not record.restored:  # the layers changed since, or a direction was erased completely
            out["recorded_from"] = "a record whose pre-edit weights are not known"
        return out
    if result.pre_edit_responses is not None:  # keep_undo=False: recorded before the edit was written
        out["concept_residual_before"] = residual_of_responses(result.pre_edit_responses.values())
    elif not result.restored:
        before = result.reference_weights()
        out["concept_residual_before"] = concept_residual(before, result.layer_spaces, states, result.operators)
    return out


def _record_before(pipeline, record: ErasureRecord) -> dict[str, tuple[Tensor, Tensor | None]] | None:
    """``{layer: (weight, bias)}`` before a plain record's erasure, rebuilt from the weights it wrote (checked by
    hash) and its operators; ``None`` when the layers changed since or the erasure cannot be inverted."""
    out = {}
    for name in record.layers:
        module = resolve_layer(pipeline, name)
        if record.restored or tensor_sha256(module.weight) != record.hashes.get(name):
            return None
        try:
            w = record.weight_before(name, local_shard(module.weight).detach())
        except ValueError:
            return None
        out[name] = (like_weight(w, module.weight), module.bias)
    return out


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
        fmt = earlier["format"]
        for e, ops in zip(earlier["erasures"], operators, strict=True):
            _, now = _recorded_residual_now(pipeline, e, ops)
            digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
            source = {"export": str(folder), "manifest_sha256": digest, "manifest_format": fmt,
                      "concept_residual_at_export": e["concept_residual"]}  # fmt: skip
            carried = {**e, "concept_residual": now, "inherited_from": source}
            if fmt != _FORMAT and "concept_residual_before" in carried:  # another quantity: no longer comparable
                carried.pop("concept_residual_before")
                carried["recorded_from"] = f"a {fmt} export, whose residual before the edit was another quantity"
            out.append(carried)
        return out, operators
    return [], []


def _manifest(pipeline, results: list[ErasureResult | ErasureRecord], extra: dict | None,
              inherited: list[dict] | None = None) -> dict:  # fmt: skip
    erasures = [*(inherited or []), *({**record_of(r).to_manifest(), **_residuals(pipeline, r)} for r in results)]
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
    """The operators of each erasure, in the manifest's order (``{i}.{space}.U`` and ``.M``, and ``.V``
    for a two-sided one)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, ops in enumerate(operators):
        for space, op in ops.items():
            tensors[f"{i}.{space}.U"] = op.U.detach().cpu().contiguous()
            tensors[f"{i}.{space}.M"] = op.M.detach().cpu().contiguous()
            if op.V is not None:  # the two-sided form, D = U M V^T
                tensors[f"{i}.{space}.V"] = op.V.detach().cpu().contiguous()
    save_file(tensors, str(path))


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
            V = tensors.get(f"{i}.{space}.V")
            ops[space] = DissociationOperator(U.to(torch.float64), M.to(torch.float64), e.get("method", "ice"), {},
                                              V=None if V is None else V.to(torch.float64))  # fmt: skip
        out.append(ops)
    return out


def _recorded_residual_now(pipeline, e: dict, operators: dict[str, DissociationOperator],
                           fmt: str = _FORMAT) -> tuple[ConceptSpec, float]:  # fmt: skip
    """The spec of a manifest's erasure record ``e`` and its concept residual through ``pipeline``'s layers now,
    as the manifest's format ``fmt`` defines it."""
    spec = ConceptSpec(**{k: v for k, v in e["concepts"].items() if k in ConceptSpec.__dataclass_fields__})
    states = _concept_states(pipeline, spec, set(e["layer_spaces"].values()))
    weights = {n: (m.weight, m.bias) for n, m in ((n, resolve_layer(pipeline, n)) for n in e["layers"])}
    residual = _v2_residual if fmt == _FORMAT_V2 else concept_residual
    return spec, residual(weights, e["layer_spaces"], states, operators)


@torch.no_grad()
def _v2_residual(weights, layer_spaces, states, operators) -> float:
    """A v2 manifest's concept residual: the mean of ``||W D c|| / ||W c + b||`` over every layer's rows."""
    rows = []
    for name, (W, b) in weights.items():
        op, x = operators[layer_spaces[name]], states[layer_spaces[name]]
        if x.shape[0]:
            x = x.to(op.U.device, torch.float64)
            full, along = layer_outputs(W, b, x), layer_outputs(W, None, op.rows_times(x))
            rows.append(along.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12))
    return residual_of_responses(rows)


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
    if (out / "before_after.png").is_file():  # a preview shipped with the export (its files are hashed too)
        lines += ["", "Before (left) and after (right) the erasure, same seeds:", "",
                  "![before/after](before_after.png)"]  # fmt: skip
    if manifest.get("export_format") == "single-file":
        lines += ["", f"`{manifest['single_file']}` is one checkpoint in the original (LDM/SGM) layout: Automatic1111, "
                  "Forge, ComfyUI and InvokeAI load it as any checkpoint; diffusers with `from_single_file(path, "
                  "config=\"config\")` (the configs shipped beside it)."]  # fmt: skip
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
    _need(m.get("format") in (_FORMAT, _FORMAT_V2), "format", f"must be {_FORMAT!r} (or the earlier {_FORMAT_V2!r}), "
          f"got {m.get('format')!r}")  # fmt: skip
    _need(isinstance(m.get("pipeline_class"), str), "pipeline_class", "must be a string")
    _need(isinstance(m.get("erasures"), list) and len(m["erasures"]) > 0, "erasures", "must be a non-empty list")
    lora = m.get("export_format") in ("lora", "lora-kohya")
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
    _need(m.get("export_format", "merged") in ("merged", "lora", "lora-kohya", "single-file"), "export_format",
          "must be 'merged', 'lora', 'lora-kohya' or 'single-file'")  # fmt: skip
    if m.get("export_format") == "single-file":
        _need(isinstance(m.get("single_file"), str) and isinstance(m.get("single_file_keys"), dict), "single_file",
              "must name the checkpoint file, with the key of each edited layer in single_file_keys")  # fmt: skip
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
