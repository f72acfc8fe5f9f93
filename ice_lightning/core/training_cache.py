"""Latents and text conditioning of a fine-tune computed once and kept on disk, per sample, across epochs and runs
(``ICEModule(disk_cache=True)``), as diffusers' SDXL and Flux scripts precompute them; in the cache of
:mod:`ice_lightning.core.cache` (safetensors, each entry checked against its key and checksum on every read).

- **Latents**: each sample's latent *distribution* (the VAE's ``latent_dist.parameters``: mean and log-variance),
  keyed by the VAE's fingerprint (every byte of its weights) and the sha256 of the sample's pixels. The latent is
  still sampled at every step from that distribution with the step's generator, so a cached run draws exactly the
  latents an uncached one does; an augmented view (a random crop or flip) is its own sample.
- **Text conditioning**: each caption's denoiser arguments from the pipeline's ``encode_prompt``, keyed by the
  architecture, every text encoder's fingerprint and every tokenizer's vocabulary. What does not grow with the
  batch (Flux's ``txt_ids``, LTX's rope scale) is shared by every caption and kept once per run.

A changed VAE or text encoder weight changes the key: no stale entry is ever read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import cache
from .editing import tensor_sha256

__all__ = ["CachedVAE", "TextConditioningCache", "text_cache_key"]


class CachedVAE:
    """``vae`` whose ``encode`` reads each sample's latent distribution from the disk cache and encodes only the
    samples it has not seen (every other attribute is the VAE's own)."""

    def __init__(self, vae) -> None:
        self.vae = vae
        #: how many samples went through the VAE itself (the rest came from the cache)
        self.encoded = 0

    def __getattr__(self, name: str):
        return getattr(self.vae, name)

    @torch.no_grad()
    def encode(self, x: Tensor, *args, **kwargs):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        fp = cache.module_fingerprint(self.vae)
        if fp is None or cache.cache_dir() is None:  # sharded or meta weights, or the cache is off
            self.encoded += len(x)
            return self.vae.encode(x, *args, **kwargs)
        keys = [cache.key("latent-dist", 1, fp, tuple(row.shape), str(row.dtype), tensor_sha256(row)) for row in x]
        found: list[Tensor | None] = [(cache.load_tensors("latents", k) or {}).get("parameters") for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            dist = self.vae.encode(x[missing], *args, **kwargs).latent_dist
            if not isinstance(getattr(dist, "parameters", None), Tensor):
                raise ValueError(f"disk_cache: {type(self.vae).__name__}'s latent distribution has no parameters "
                                 "tensor to cache; train with disk_cache=False")  # fmt: skip
            self.encoded += len(missing)
            for j, i in enumerate(missing):
                found[i] = dist.parameters[j : j + 1].detach()
                cache.save_tensors("latents", keys[i], {"parameters": found[i].cpu()})
        params = torch.cat([f.to(x.device) for f in found])
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(params))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        *path, leaf = k.split("/")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


class TextConditioningCache:
    """The denoiser's text conditioning of a list of captions: ``encode(captions)`` (the pipeline's own, frozen
    text encoders) behind an in-memory cache of the last ``memory_size`` caption lists and, with ``disk_key``,
    the on-disk cache per caption. ``disk_key()`` names everything the conditioning depends on (``None``: not
    cacheable now, e.g. sharded encoders)."""

    def __init__(self, encode: Callable[[list[str]], dict], memory_size: int = 256,
                 disk_key: Callable[[], str | None] | None = None) -> None:  # fmt: skip
        self.encode, self.memory_size, self.disk_key = encode, memory_size, disk_key
        self._memory: OrderedDict[tuple, dict] = OrderedDict()
        self._shared: dict[str, dict[str, Any]] = {}  # per disk key: what every caption shares
        #: how many encoder calls were made (the rest came from a cache)
        self.calls = 0

    def __call__(self, captions: list[str], device: torch.device | None = None) -> dict:
        """The conditioning of ``captions``; what comes from the disk cache is moved to ``device``."""
        key = tuple(captions)
        cond = self._memory.get(key)
        if cond is not None:
            self._memory.move_to_end(key)
            return cond
        base = self.disk_key() if self.disk_key is not None and cache.cache_dir() is not None else None
        cond = self._from_disk(list(captions), base, device) if base is not None else self._encode(list(captions))
        if self.memory_size > 0:
            self._memory[key] = cond
            while len(self._memory) > self.memory_size:
                self._memory.popitem(last=False)
        return cond

    def _encode(self, captions: list[str]) -> dict:
        self.calls += 1
        return self.encode(captions)

    def _from_disk(self, captions: list[str], base: str, device: torch.device | None) -> dict:
        if base not in self._shared:  # which parts grow with the batch: one and two captions, once per run
            one, two = _flatten(self._encode([""])), _flatten(self._encode(["", ""]))
            self._shared[base] = {k: v for k, v in one.items()
                                  if not (isinstance(v, Tensor) and v.shape[:1] == (1,) and two[k].shape[:1] == (2,))}
            # the empty caption (classifier-free dropout) is then on disk from the start
            cache.save_tensors("text", _row_key(base, ""),
                               {k: v.detach().cpu() for k, v in one.items() if k not in self._shared[base]})
        shared = self._shared[base]
        keys = [_row_key(base, c) for c in captions]
        rows: list[dict | None] = [cache.load_tensors("text", k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            flat = _flatten(self._encode([captions[i] for i in missing]))
            for j, i in enumerate(missing):
                rows[i] = {k: v[j : j + 1].detach() for k, v in flat.items() if k not in shared}
                cache.save_tensors("text", keys[i], {k: v.cpu() for k, v in rows[i].items()})
        batched = {k: torch.cat([r[k].to(device) for r in rows]) for k in rows[0]}
        return _nest({**batched, **shared})


def _row_key(base: str, caption: str) -> str:
    """The disk-cache name of one caption's conditioning under the encoders' key ``base``."""
    return cache.key("text-conditioning", 1, base, caption)


def text_cache_key(pipeline, architecture: str) -> Callable[[], str | None]:
    """``disk_key`` of :class:`TextConditioningCache` for ``pipeline``: the architecture, every text encoder's
    fingerprint (recomputed only when a weight changes) and every tokenizer's vocabulary (read once)."""
    components = getattr(pipeline, "components", {})
    tokenizers = [[name, type(tok).__name__, cache.key(sorted(tok.get_vocab().items()))]
                  for name, tok in sorted(components.items())
                  if name.startswith("tokenizer") and hasattr(tok, "get_vocab")]  # fmt: skip
    encoders = [(name, m) for name, m in sorted(components.items())
                if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]  # fmt: skip

    def disk_key() -> str | None:
        prints = [(name, cache.module_fingerprint(m)) for name, m in encoders]
        if any(fp is None for _, fp in prints):
            return None
        return cache.key("text-conditioning", 1, architecture, tokenizers, prints)

    return disk_key
