"""What an erasure learns once and keeps on disk, so the first ``erase()`` in a new process skips work done before:
the broad preserve base's spectrum per text encoder (encoding 360 prompts is most of a cold call) and the verified
text-conditioning layers per denoiser architecture (the check pass is a forward pass).

Where: ``$ICE_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/ice_lightning``, else ``~/.cache/ice_lightning``;
``ICE_LIGHTNING_CACHE=off`` turns it off. Entries are named by a sha256 of everything they depend on (the
encoder's weights, every byte of every tensor; its tokenizer and settings; the denoiser's class and config), so a
changed model never reads a stale entry. Each entry also carries its full key and a sha256 of its content, checked
on every read: an entry edited by hand, damaged, or copied from another key is recomputed (one log line), never
trusted. Only files this module wrote are replaced, each written to a temporary file and renamed into place; a
folder that cannot be written, or an unreadable entry, only means the work is done again.

Example:
    >>> from ice_lightning.core import cache
    >>> key = cache.key("example", 1)
    >>> cache.save_json("doc", key, {"answer": 42}) and cache.load_json("doc", key)  # doctest: +SKIP
    {'answer': 42}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path

from torch import Tensor, nn

from .editing import tensor_sha256
from .sharding import is_sharded

__all__ = ["cache_dir", "key", "module_fingerprint", "load_tensors", "save_tensors", "load_json", "save_json"]

log = logging.getLogger(__name__)
# Fingerprints per module with the (identity, version) of every tensor they read: an in-place change of any tensor
# bumps its version, so a fingerprint is recomputed exactly when the weights may have changed.
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_OFF = ("off", "0", "false", "none", "")


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when ``ICE_LIGHTNING_CACHE=off``."""
    env = os.environ.get("ICE_LIGHTNING_CACHE")
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ice_lightning"


def key(*parts) -> str:
    """sha256 of ``parts`` (anything ``json`` can write, other objects by ``repr``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def module_fingerprint(module: nn.Module) -> str | None:
    """A fingerprint of ``module``'s class and weights: every tensor's name, shape, dtype and the sha256 of all its
    bytes (a single edited embedding row changes it), computed once per module until a tensor changes in place.
    ``None`` for a module whose tensors are sharded or on the meta device (not cached)."""
    tensors = list(module.state_dict(keep_vars=True).items())
    if any(t.is_meta or is_sharded(t) for _, t in tensors):
        return None
    stamp = tuple((id(t), t._version) for _, t in tensors)
    known = _FINGERPRINTS.get(module)
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in tensors:
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{tensor_sha256(t)}".encode())
    _FINGERPRINTS[module] = (stamp, h.hexdigest())
    return h.hexdigest()


def _content_sha256(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(f"{k}{tuple(tensors[k].shape)}{tensors[k].dtype}{tensor_sha256(tensors[k])}".encode())
    return h.hexdigest()


def _mismatch(path: Path, why: str) -> None:
    log.warning("ice_lightning cache: %s %s; recomputing it", path, why)


def _path(kind: str, name: str, suffix: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / kind / f"{name}{suffix}"


def _write(path: Path, write) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True
    except OSError as err:  # a read-only or full disk: the work is simply done again next time
        log.debug("ice_lightning cache: not written (%s)", err)
        return False


def load_tensors(kind: str, name: str) -> dict[str, Tensor] | None:
    """The tensors stored under ``name``, or ``None`` (missing, unreadable, or not what was stored there)."""
    path = _path(kind, name, ".safetensors")
    if path is None or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # one read: the metadata and the tensors
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as err:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
        _mismatch(path, f"is unreadable ({err})")
        return None
    if meta.get("ice_key") != name:
        _mismatch(path, "was stored under another key (or by an older version)")
        return None
    if meta.get("ice_sha256") != _content_sha256(tensors):
        _mismatch(path, "does not match its checksum")
        return None
    return tensors


def save_tensors(kind: str, name: str, tensors: dict[str, Tensor]) -> bool:
    path = _path(kind, name, ".safetensors")
    if path is None:
        return False
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"ice_key": name, "ice_sha256": _content_sha256(tensors)}
    return _write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_json(kind: str, name: str):
    """The value stored under ``name``, or ``None`` (missing, unreadable, or not what was stored there)."""
    path = _path(kind, name, ".json")
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        _mismatch(path, f"is unreadable ({err})")
        return None
    if not isinstance(entry, dict) or entry.get("key") != name:
        _mismatch(path, "was stored under another key (or by an older version)")
        return None
    if entry.get("sha256") != _json_sha256(entry.get("value")):
        _mismatch(path, "does not match its checksum")
        return None
    return entry["value"]


def _json_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def save_json(kind: str, name: str, obj) -> bool:
    path = _path(kind, name, ".json")
    entry = {"key": name, "sha256": _json_sha256(obj), "value": obj}
    return path is not None and _write(path, lambda tmp: Path(tmp).write_text(json.dumps(entry)))
