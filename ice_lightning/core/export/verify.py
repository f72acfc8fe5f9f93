"""Check an export against its manifest: files, edited tensors, and the erasure itself (its residual recomputed
through the shipped layers with the stored operators)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..editing import tensor_sha256
from ..solver import DissociationOperator
from .lora import kohya_prefixes
from .manifest import (
    OPERATORS_NAME,
    ExportVerificationError,
    _file_hashes,
    _load_operators,
    _recorded_residual_now,
    _weight,
    load_manifest,
)

__all__ = ["verify_export"]


# The recomputed residual must match the recorded one this closely (same weights, same encoder, float64).
_RESIDUAL_RTOL, _RESIDUAL_ATOL = 1e-4, 1e-6
# A single file that stores the edited layers in half precision (fp16 or bf16, rounded once on export).
_HALF_RTOL = 1e-2


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
    if manifest.get("export_format") in ("lora", "lora-kohya"):  # the edit alone: the recorded operators' change
        _check_lora(folder, manifest)
        checks["lora"] = True
        return checks
    if manifest.get("export_format") == "single-file":
        return _verify_single_file(folder, manifest, checks, pipeline, check_erasure)
    if pipeline is None:
        from ..pipelines import load_pipeline_folder

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
            _check_erasure_present(pipeline, i, e, operators[i], manifest["format"])
            checks[f"erasure:{i}"] = True
    return checks


def _verify_single_file(folder: Path, manifest: dict, checks: dict, pipeline, check_erasure: bool) -> dict[str, bool]:
    """Steps 3 and 4 for a single file: its edited tensors (at the keys the manifest records) against their hashes,
    then the erasure through the pipeline ``from_single_file`` loads from it. A file holding the edited layers in
    half precision (a patched fp16 checkpoint) is checked at that precision."""
    from safetensors import safe_open

    keys = manifest["single_file_keys"]
    dtypes = set()
    with safe_open(str(folder / manifest["single_file"]), framework="pt") as f:
        present = set(f.keys())
        for layer, key in keys.items():
            if key not in present:
                raise ExportVerificationError(f"{manifest['single_file']} has no tensor {key!r} (layer {layer})")
            t = f.get_tensor(key)
            dtypes.add(t.dtype)
            if tensor_sha256(t) != manifest["edited_tensors"].get(f"{layer}.weight"):
                raise ExportVerificationError(f"the edited tensor {key!r} of {manifest['single_file']} (layer "
                                              f"{layer}) does not match the manifest")  # fmt: skip
            checks[f"{layer}.weight"] = True
    if check_erasure:
        from .single_file import load_single_file

        pipeline = load_single_file(folder, manifest) if pipeline is None else pipeline
        half = any(d.itemsize < 4 for d in dtypes)
        operators = _load_operators(folder / manifest.get("operators_file", OPERATORS_NAME), manifest)
        for i, e in enumerate(manifest["erasures"]):
            _check_erasure_present(pipeline, i, e, operators[i], manifest["format"],
                                   rtol=_HALF_RTOL if half else _RESIDUAL_RTOL)
            checks[f"erasure:{i}"] = True
    return checks


def _check_lora(folder: Path, manifest: dict) -> None:
    """A LoRA export's file covers exactly the layers its erasures name, and each layer's ``lora_A`` rows lie in the
    span of the recorded operators of that layer's space (every edit's change ``-(W U) M V^T`` does: the row space
    of ``D``, :meth:`~ice_lightning.core.solver.DissociationOperator.row_space`)."""
    from safetensors.torch import load_file

    lora = load_file(str(folder / manifest["lora_file"]))
    named = {n for e in manifest["erasures"] for n in e["layers"]}
    if manifest["export_format"] == "lora-kohya":  # kohya's keys back to the layer names, by diffusers' conversion
        prefix = kohya_prefixes(sorted(named))
        expected = {f"{prefix[n]}.{x}" for n in named for x in ("lora_down.weight", "lora_up.weight", "alpha")}
        if set(lora) == expected:
            lora = {f"{n}.lora_{x}.weight": lora[f"{prefix[n]}.lora_{y}.weight"] for n in named
                    for x, y in (("A", "down"), ("B", "up"))}  # fmt: skip
    layers = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    if layers != named or set(lora) != {f"{n}.lora_{x}.weight" for n in named for x in "AB"}:
        raise ExportVerificationError(
            f"the LoRA file {manifest['lora_file']} does not hold exactly the {len(named)} layers the erasures name "
            f"(it holds {len(layers)})"
        )
    operators = _load_operators(folder / manifest.get("operators_file", OPERATORS_NAME), manifest)
    for name in sorted(named):
        spans = [ops[e["layer_spaces"][name]].row_space()
                 for e, ops in zip(manifest["erasures"], operators, strict=True) if name in e["layer_spaces"]]
        U = torch.linalg.svd(torch.cat(spans, 1), full_matrices=False)[0]
        A = lora[f"{name}.lora_A.weight"].to(torch.float64)
        off = float((A - (A @ U) @ U.T).norm() / A.norm().clamp_min(1e-300))
        if off > 1e-4:
            raise ExportVerificationError(
                f"the LoRA of layer {name!r} is not the recorded operators' change: {off:.2g} of it lies outside "
                "their span"
            )


def _check_erasure_present(pipeline, i: int, e: dict, operators: dict[str, DissociationOperator], fmt: str,
                           rtol: float = _RESIDUAL_RTOL) -> None:  # fmt: skip
    spec, now = _recorded_residual_now(pipeline, e, operators, fmt)
    recorded, before = e["concept_residual"], e.get("concept_residual_before")
    if abs(now - recorded) > _RESIDUAL_ATOL + rtol * abs(recorded):
        raise ExportVerificationError(
            f"erasure {i} ({spec.erase}): the shipped layers respond along the erased directions with residual "
            f"{now:.6g}, but the export recorded {recorded:.6g}: these are not the erased weights"
        )
    if before is not None and not recorded < before:
        raise ExportVerificationError(
            f"erasure {i} ({spec.erase}): the recorded residual {recorded:.6g} is not below the one before the "
            f"edit ({before:.6g}): the manifest does not describe an erasure"
        )
