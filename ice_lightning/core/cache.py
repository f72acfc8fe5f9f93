"""What an erasure learns once and keeps on disk, so the first ``erase()`` in a new process skips work done before:
the broad preserve base's spectrum per text encoder (encoding 360 prompts is most of a cold call) and the verified
text-conditioning layers per denoiser architecture (the check pass is a forward pass).

Where: ``$ICE_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/ice_lightning``, else ``~/.cache/ice_lightning``;
``ICE_LIGHTNING_CACHE=off`` turns it off. Entries are named by a sha256 of everything they depend on (the
encoder's weights, tokenizer and settings; the denoiser's class and config), so a changed model never reads a
stale entry. Only files this module wrote are replaced, each written to a temporary file and renamed into place; a
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
from pathlib import Path

import torch
from torch import Tensor, nn

from .editing import is_sharded

__all__ = ["cache_dir", "key", "module_fingerprint", "load_tensors", "save_tensors", "load_json", "save_json"]

log = logging.getLogger(__name__)
_SAMPLES = 2048  # elements read from each tensor for a fingerprint: any other checkpoint differs in them
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
    """A fingerprint of ``module``'s class and weights: every tensor's name, shape and dtype, and an evenly spaced
    sample of its values (reading every byte of a 5B-parameter encoder would cost seconds). ``None`` for a module
    whose tensors are sharded or on the meta device (not cached)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict(keep_vars=True).items():
        t = t.detach()
        if t.is_meta or is_sharded(t):
            return None
        flat = t.reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step][:_SAMPLES].to("cpu", torch.float64).contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


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
    path = _path(kind, name, ".safetensors")
    if path is None or not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as err:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
        log.debug("ice_lightning cache: unreadable %s (%s)", path, err)
        return None


def save_tensors(kind: str, name: str, tensors: dict[str, Tensor]) -> bool:
    path = _path(kind, name, ".safetensors")
    if path is None:
        return False
    from safetensors.torch import save_file

    return _write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def load_json(kind: str, name: str):
    path = _path(kind, name, ".json")
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_json(kind: str, name: str, obj) -> bool:
    path = _path(kind, name, ".json")
    return path is not None and _write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))
