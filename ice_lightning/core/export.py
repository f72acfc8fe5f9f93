"""Export an erased pipeline: diffusers ``save_pretrained`` + ``ice_manifest.json`` + a model-card section.

The manifest records what was erased (concepts, method, hyperparameters), the library versions, the
edited layers and the sha256 of each edited tensor, so a consumer can check with
:func:`verify_export` that the shipped weights are the erased ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from .plan import ErasureResult, edit_history, resolve_layer

__all__ = ["MANIFEST_NAME", "save_erased", "verify_export", "tensor_sha256", "load_manifest"]

MANIFEST_NAME = "ice_manifest.json"
_FORMAT = "ice-lightning/manifest-v1"
_CARD_MARK = "<!-- ice-lightning -->"


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's raw bytes in its own dtype (any dtype, bf16 included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ice-lightning", "torch", "diffusers", "transformers", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _weight(pipeline, qualified: str) -> Tensor:
    return resolve_layer(pipeline, qualified).weight


def _check_writable(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"export directory {out_dir} is not writable; choose another --out")


def save_erased(
    pipeline,
    out_dir: str | os.PathLike,
    results: Sequence[ErasureResult] | None = None,
    safe_serialization: bool = True,
    extra: dict | None = None,
) -> Path:
    """Save ``pipeline`` with ``save_pretrained`` and write the ICE manifest and model card.

    Args:
        results: the erasures to record; default: every live erasure applied to ``pipeline``.
        extra: more JSON-ready entries for the manifest (the callback records its applications here).

    Returns:
        the output directory.
    """
    results = list(results if results is not None else edit_history(pipeline))
    results = [r for r in results if not r.undone]
    if not results:
        raise ValueError("nothing was erased from this pipeline; call ice_lightning.erase(...) before save_erased")
    out = Path(out_dir)
    _check_writable(out)
    pipeline.save_pretrained(out, safe_serialization=safe_serialization)
    layers = list(dict.fromkeys(n for r in results for n in r.layers))
    manifest = {
        "format": _FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline_class": type(pipeline).__name__,
        "erasures": [r.to_manifest() for r in results],
        "erased_concepts": list(dict.fromkeys(c for r in results for c in r.spec.erase)),
        "versions": _versions(),
        "edited_tensors": {f"{n}.weight": tensor_sha256(_weight(pipeline, n)) for n in layers},
        **(extra or {}),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    _write_card(out, manifest)
    return out


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
    """Read ``ice_manifest.json`` from an exported folder."""
    p = Path(path) / MANIFEST_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: {path} was not exported with ice_lightning.save_erased")
    return json.loads(p.read_text())


def verify_export(path: str | os.PathLike, pipeline=None) -> dict[str, bool]:
    """Check the edited tensors of an exported model against the manifest hashes.

    Loads the pipeline from ``path`` with ``from_pretrained`` unless one is given.
    Returns ``{tensor: matches}``; raises ``ValueError`` if any hash differs.
    """
    manifest = load_manifest(path)
    if pipeline is None:
        from .pipelines import load_pipeline_folder

        pipeline = load_pipeline_folder(str(path))
    checks = {
        key: tensor_sha256(_weight(pipeline, key.removesuffix(".weight"))) == digest
        for key, digest in manifest["edited_tensors"].items()
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{len(bad)} edited tensor(s) do not match the manifest, e.g. {bad[:3]}")
    return checks
