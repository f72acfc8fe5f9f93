"""Text-encoder states per embedding space, collected through each pipeline's own tokenizer and encoder.

Each denoiser architecture reads one or two *embedding spaces* (``"text"``: per-token states; ``"pooled"``: one
vector per prompt), built from the pipeline's own tokenizers and encoders by that architecture's entry in
:mod:`ice_lightning.core.architectures` out of the sources defined here: :class:`SequenceSource` (one encoder's
per-token states), :class:`FeatureConcatSource` (several encoders concatenated per token, as SDXL and SD3
do) and :class:`PooledSource` (pooled prompt embeddings).

States are collected without gradients, in batches, and cached per prompt. The concept's tokens are
chosen by the tokenizer's character offsets against :attr:`Prompt.span`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import cache
from .concepts import Prompt
from .progress import progress
from .solver import Spectrum, compress_states

__all__ = [
    "SequenceSource",
    "FeatureConcatSource",
    "PooledSource",
    "EmbeddingSpace",
    "Request",
    "call_default",
    "model_max_length",
    "require_components",
    "select_tokens",
]

_BATCH = 32  # texts per encoder call

#: What to encode: a prompt, and whether its end-of-text token joins the chosen rows.
Request = tuple[Prompt, bool]


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _padding_invariant(encoder: torch.nn.Module, pass_mask: bool) -> bool:
    """Whether the states of real tokens do not depend on how much padding follows them: CLIP's text
    transformer is causal, and an encoder given the attention mask never attends to padding."""
    return pass_mask or type(encoder).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection")


def _longest(tokenizer, texts: Sequence[str], max_length: int) -> int:
    n = max(len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])
    return min(n, max_length)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict:
    try:
        return tokenizer(
            list(texts),
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
    except NotImplementedError as err:  # slow (Python) tokenizers have no offsets
        raise TypeError(
            f"{type(tokenizer).__name__} gives no character offsets; ICE needs a fast tokenizer to find the "
            "concept's own tokens (load the pipeline with its fast tokenizer, e.g. use_fast=True)"
        ) from err


def select_tokens(enc: dict, i: int, prompt: Prompt, include_eot: bool = False) -> list[int]:
    """Positions of the tokens of ``prompt.span`` (all real tokens if ``span`` is None) in row ``i``.

    A token belongs to the concept if its character offsets overlap the span; special and padding
    tokens never do. With ``include_eot`` the last attended special token (CLIP's end-of-text, T5's
    ``</s>``, BERT's ``[SEP]``) is added.
    """
    offsets = enc["offset_mapping"][i].tolist()
    special = enc["special_tokens_mask"][i].tolist()
    attended = enc["attention_mask"][i].tolist()
    lo, hi = prompt.span if prompt.span is not None else (0, len(prompt.text))
    chosen = [
        t
        for t, ((a, b), s, m) in enumerate(zip(offsets, special, attended, strict=True))
        if m and not s and b > a and a < hi and b > lo
    ]
    if include_eot:
        last = max((t for t, m in enumerate(attended) if m), default=None)
        if last is not None and special[last] and last not in chosen:
            chosen.append(last)
    return chosen


def _batches(texts: list[str]):
    """``texts`` in slices of ``_BATCH``, one encoder call each, with a progress bar."""
    starts = range(0, len(texts), _BATCH)
    for start in progress(starts, total=len(starts), desc="encoding prompts", unit="batch"):
        yield texts[start : start + _BATCH]


def read_positions(states: Tensor, attended: Tensor, padding: bool) -> Tensor:
    """The rows of one prompt's ``states`` (L, d) that a denoiser reads: every attended token, its start and
    end-of-text tokens included, and with ``padding`` one row for the positions after them, their mean (identical
    tokens, read alike: one row, not one per position, so that a long padding does not outweigh the words)."""
    rows = states[attended]
    if padding and not bool(attended.all()):
        rows = torch.cat([rows, states[~attended].mean(0, keepdim=True)])
    return rows


@dataclass
class SequenceSource:
    """One tokenizer + encoder giving per-token states (B, L, d).

    Args:
        hidden_state: ``None`` for the encoder's first output (last hidden state), or an index into
            ``hidden_states`` (``-2``: SDXL/SD3 penultimate layer).
        pass_mask: whether the pipeline passes the attention mask to the encoder.
        width: pad (or cut) the feature dimension to this width, as SD3 does for its CLIP states.
        reads_padding: whether the denoiser reads the padding positions (no mask between them: SD's UNet, SD3,
            Flux, CogVideoX). Their states are not blank: a causal encoder's padding follows the whole prompt, and an
            encoder without the mask mixes it in. ``False`` where the denoiser masks them or the pipeline zeroes them
            (PixArt, LTX, Wan).
    """

    tokenizer: object
    encoder: torch.nn.Module
    max_length: int
    hidden_state: int | None = None
    pass_mask: bool = False
    width: int | None = None
    reads_padding: bool = True

    @property
    def dim(self) -> int:
        if self.width is not None:
            return self.width
        cfg = self.encoder.config
        return int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    @property
    def padding_invariant(self) -> bool:
        return _padding_invariant(self.encoder, self.pass_mask)

    def length_for(self, texts: Sequence[str]) -> int:
        """Padding length: the batch's longest prompt where padding cannot change the states (the same
        states, several times faster than padding to 77 or 512), else the pipeline's own length."""
        return _longest(self.tokenizer, texts, self.max_length) if self.padding_invariant else self.max_length

    @torch.no_grad()
    def rows(self, requests: Sequence[Request]) -> list[Tensor]:
        """The chosen rows of each ``(prompt, include_eot)``; a text asked for with several spans is encoded once."""
        texts = list(dict.fromkeys(p.text for p, _ in requests))
        at = {t: i for i, t in enumerate(texts)}
        enc = _tokenize(self.tokenizer, texts, self.length_for(texts))
        states = self._states(enc)
        return [states[at[p.text], select_tokens(enc, at[p.text], p, eot)] for p, eot in requests]

    @torch.no_grad()
    def read_rows(self, texts: Sequence[str]) -> list[Tensor]:
        """Per text, the states of every position the denoiser reads (:func:`read_positions`)."""
        length = self.max_length if self.reads_padding else self.length_for(texts)
        enc = _tokenize(self.tokenizer, texts, length)
        states = self._states(enc)
        return [read_positions(states[i], enc["attention_mask"][i].bool(), self.reads_padding)
                for i in range(len(texts))]  # fmt: skip

    def _states(self, enc: dict) -> Tensor:
        dev = _device_of(self.encoder)
        kwargs = {"output_hidden_states": True} if self.hidden_state is not None else {}
        if self.pass_mask:
            kwargs["attention_mask"] = enc["attention_mask"].to(dev)
        out = _encode(self.encoder, enc["input_ids"].to(dev), **kwargs)
        states = out.hidden_states[self.hidden_state] if self.hidden_state is not None else out[0]
        states = states.to(torch.float64)
        if self.width is not None and states.shape[-1] != self.width:
            states = torch.nn.functional.pad(states, (0, self.width - states.shape[-1]))
        return states


def _encode(encoder: torch.nn.Module, *args, **kwargs):
    """``encoder(*args, **kwargs)`` in eval mode (then its mode restored): a text encoder left in training mode
    (built from a config, or inside a module Lightning has put in training mode) would apply dropout (T5's is
    0.1), and the concept states, hence the operator, would be noise-dependent."""
    was = encoder.training
    encoder.eval()
    try:
        return encoder(*args, **kwargs)
    finally:
        encoder.train(was)


@dataclass
class FeatureConcatSource:
    """Several encoders whose per-token states are concatenated along features (SDXL, SD3's CLIPs)."""

    parts: list[SequenceSource]
    width: int | None = None

    @property
    def dim(self) -> int:
        return self.width if self.width is not None else sum(p.dim for p in self.parts)

    @property
    def reads_padding(self) -> bool:
        return any(p.reads_padding for p in self.parts)

    def _encoded(self, texts: list[str], full: bool = False) -> tuple[list[dict], Tensor]:
        """Each part's tokenization and the concatenated states (``full``: at the parts' longest length)."""
        # States are concatenated position by position: every part must be padded to the same length.
        length = max(p.length_for(texts) for p in self.parts)
        if full or not all(p.padding_invariant for p in self.parts):
            length = max(p.max_length for p in self.parts)
        encs = [_tokenize(p.tokenizer, texts, min(length, p.max_length)) for p in self.parts]
        states = torch.cat([p._states(e) for p, e in zip(self.parts, encs, strict=True)], dim=-1)
        if self.width is not None and states.shape[-1] != self.width:
            states = torch.nn.functional.pad(states, (0, self.width - states.shape[-1]))
        return encs, states

    @torch.no_grad()
    def read_rows(self, texts: Sequence[str]) -> list[Tensor]:
        """Per text, the states of every position the denoiser reads (:func:`read_positions`): a position any part
        attends to is a token, one that none does is padding."""
        encs, states = self._encoded(list(texts), full=self.reads_padding)
        attended = torch.stack([e["attention_mask"].bool() for e in encs]).any(0)
        return [read_positions(states[i], attended[i], self.reads_padding) for i in range(len(texts))]

    @torch.no_grad()
    def rows(self, requests: Sequence[Request]) -> list[Tensor]:
        texts = list(dict.fromkeys(q.text for q, _ in requests))  # each text once, whatever spans are asked of it
        at = {t: i for i, t in enumerate(texts)}
        encs, states = self._encoded(texts)
        out = []
        for q, eot in requests:
            # States are concatenated position by position, so take the union of each tokenizer's picks.
            picks = sorted(set().union(*(select_tokens(e, at[q.text], q, eot) for e in encs)))
            out.append(states[at[q.text], picks])
        return out


@dataclass
class PooledSource:
    """Pooled prompt embeddings, one row per prompt (Flux: CLIP pooler output; SD3: CLIP-L+G text_embeds)."""

    parts: list[tuple[object, torch.nn.Module, int]]

    @property
    def dim(self) -> int:
        total = 0
        for _, enc, _ in self.parts:
            cfg = enc.config
            total += int(getattr(cfg, "projection_dim", 0)) if hasattr(enc, "text_projection") else cfg.hidden_size
        return total

    @torch.no_grad()
    def rows(self, requests: Sequence[Request]) -> list[Tensor]:
        prompts = [p for p, _ in requests]  # one state per prompt: spans and end-of-text do not apply
        pooled = []
        for tokenizer, encoder, max_length in self.parts:
            enc = _tokenize(tokenizer, [p.text for p in prompts], max_length)
            out = _encode(encoder, enc["input_ids"].to(_device_of(encoder)))
            vec = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
            pooled.append(vec.to(torch.float64))
        states = torch.cat(pooled, dim=-1)
        return [states[i : i + 1] for i in range(len(prompts))]

    def read_rows(self, texts: Sequence[str]) -> list[Tensor]:
        """The one vector the denoiser reads of each text."""
        return self.rows([(Prompt(t), False) for t in texts])


@dataclass
class EmbeddingSpace:
    """One space of text states that a set of layers reads; ``token_states`` stacks the chosen rows."""

    name: str
    sources: list
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        dims = {s.dim for s in self.sources}
        if len(dims) != 1:
            raise ValueError(f"sources of space {self.name!r} disagree on width: {dims}")
        return dims.pop()

    @property
    def pooled(self) -> bool:
        return all(isinstance(s, PooledSource) for s in self.sources)

    def token_states(self, prompts: Sequence[Prompt], include_eot: bool = False) -> Tensor:
        """(n, d) float64 states of the concept tokens of every prompt (cached, no grad; (0, d) for none)."""
        rows = self.per_prompt(prompts, include_eot)
        return torch.cat(rows, dim=0) if rows else torch.zeros(0, self.dim, dtype=torch.float64)

    def per_prompt(self, prompts: Sequence[Prompt], include_eot: bool = False, cache: bool = True) -> list[Tensor]:
        """The chosen rows of each prompt separately (no grad). Kept for the next call unless ``cache=False`` (a
        search encodes thousands of one-off prompts); prompts already kept are reused either way."""
        return self.requested([(p, include_eot) for p in prompts], cache)

    def requested(self, requests: Sequence[Request], cache: bool = True) -> list[Tensor]:
        """:meth:`per_prompt` for ``(prompt, include_eot)`` pairs that need not share the flag. Each text is encoded
        once, however many spans of it are asked for: ask for every span of a text in one call (as
        :meth:`~ice_lightning.core.plan.ErasurePlan.states` does for the concept, its peers and their context)."""
        todo: dict[str, list[Request]] = {}  # per text not yet kept, its requests
        for r in dict.fromkeys(requests):
            if r not in self._cache:
                todo.setdefault(r[0].text, []).append(r)
        fresh = {}
        for texts in _batches(sorted(todo, key=len)):  # batches of similar length: less padding to encode
            batch = [r for t in texts for r in todo[t]]
            per_source = [src.rows(batch) for src in self.sources]
            for j, r in enumerate(batch):
                fresh[r] = torch.cat([rows[j] for rows in per_source], dim=0)
        if cache:
            self._cache.update(fresh)
        return [self._cache[r] if r in self._cache else fresh[r] for r in requests]

    @torch.no_grad()
    def read_rows(self, prompts: Sequence[Prompt]) -> list[Tensor]:
        """Per prompt, the states of every position the denoiser reads (each source's ``read_rows``: every attended
        token, the special ones included, and the padding where the denoiser reads it), not kept."""
        out = []
        for texts in _batches([p.text for p in prompts]):
            per_source = [src.read_rows(texts) for src in self.sources]
            out += [torch.cat(rows, dim=0) for rows in zip(*per_source, strict=True)]
        return out

    def base_states(self, prompts: Sequence[Prompt]) -> Spectrum | None:
        """Every position the denoiser reads of the broad preserve base ``prompts`` (:meth:`read_rows`: the words,
        the start and end-of-text tokens, and the padding where it is read) as a
        :class:`~ice_lightning.core.solver.Spectrum`
        (their SVD, at most ``d`` rows with the same Gram matrix: the energy subspace is unchanged), computed once
        per encoder and prompt set: kept here and in the on-disk cache (:mod:`ice_lightning.core.cache`), keyed by
        a fingerprint of the tokenizers, encoders and settings. ``None`` for no prompts or a pooled space (one
        vector per prompt: the preserve concepts suffice)."""
        if not prompts or self.pooled:
            return None
        key = ("base", tuple(prompts))
        if key not in self._cache:
            disk = self._disk_key(prompts)
            stored = cache.load_tensors("base", disk) if disk else None
            if stored is not None and stored["Vh"].shape[-1] == self.dim:
                self._cache[key] = Spectrum(stored["s"].to(torch.float64), stored["Vh"].to(torch.float64))
            else:
                spectrum = compress_states(torch.cat(self.read_rows(prompts), dim=0))
                self._cache[key] = spectrum
                if disk:
                    cache.save_tensors("base", disk, {"s": spectrum.s, "Vh": spectrum.Vh})
        return self._cache[key]

    def _disk_key(self, prompts: Sequence[Prompt]) -> str | None:
        """The on-disk cache key of states of ``prompts`` in this space: every source's tokenizer vocabulary,
        encoder weights (sampled) and settings; ``None`` when an encoder cannot be fingerprinted."""
        parts = []
        for src in self.sources:
            seq = src.parts if isinstance(src, FeatureConcatSource) else [src]
            for part in seq:
                if not isinstance(part, SequenceSource):
                    return None
                fp = cache.module_fingerprint(part.encoder)
                if fp is None:
                    return None
                vocab = part.tokenizer.get_vocab() if hasattr(part.tokenizer, "get_vocab") else {}
                parts.append([type(part.tokenizer).__name__, cache.key(sorted(vocab.items())), fp, part.max_length,
                              part.hidden_state, part.pass_mask, part.width, part.reads_padding])  # fmt: skip
            parts.append(getattr(src, "width", None))
        # version 2: every position the denoiser reads (version 1: the words alone)
        return cache.key("base-states", 2, parts, [(p.text, p.span) for p in prompts])

    def clear_cache(self) -> None:
        self._cache.clear()

    def _tokenizers(self) -> list[tuple[object, int]]:
        out = []
        for s in self.sources:
            parts = s.parts if isinstance(s, (FeatureConcatSource, PooledSource)) else [s]
            out += [(p[0], p[2]) if isinstance(p, tuple) else (p.tokenizer, p.max_length) for p in parts]
        return out

    def check_concept_tokens(self, prompts: Sequence[Prompt], what: str = "concept") -> None:
        """Refuse a concept that a tokenizer of this space maps to its unknown token (erasing it would erase
        every unknown word; preserving or anchoring to it would keep or aim at every unknown word) or cuts off at
        its maximum length (the concept would be erased only in part). ``what`` names the role in the error
        ("concept", "preserve concept", "anchor")."""
        if not prompts:
            return
        for tokenizer, max_length in self._tokenizers():
            unk = getattr(tokenizer, "unk_token_id", None)
            enc = _tokenize(tokenizer, [p.text for p in prompts], max_length)
            for i, p in enumerate(prompts):
                if p.span is None:
                    continue
                name, pos = p.text[p.span[0] : p.span[1]], select_tokens(enc, i, p)
                ids = enc["input_ids"][i, pos].tolist()
                if unk is not None and unk in ids:
                    tokens = tokenizer.convert_ids_to_tokens(ids)
                    raise ValueError(
                        f"{what} {name!r} maps to the unknown token {tokenizer.unk_token!r} of "
                        f"{type(tokenizer).__name__} (tokens {tokens}): it would stand for every unknown word, not "
                        f"for {name!r}. Name the {what} in words the tokenizer knows"
                    )
                if pos and int(enc["offset_mapping"][i][pos[-1]][1]) < p.span[1]:
                    short = name if len(name) <= 40 else name[:40] + "..."
                    raise ValueError(
                        f"{what} {short!r} is cut off by the maximum length of {type(tokenizer).__name__} "
                        f"({max_length} tokens) in {p.text[:60]!r}...: shorten the concept or the templates"
                    )


def call_default(pipeline, name: str, fallback: int) -> int:
    # Look in the class's own MRO: ``getattr(cls, "__call__")`` would find the metaclass's ``type.__call__``
    # for a plain holder object (say a SimpleNamespace) that has no pipeline ``__call__``.
    call = next((k.__dict__["__call__"] for k in type(pipeline).__mro__ if "__call__" in k.__dict__), None)
    if call is None:
        return fallback
    try:
        param = inspect.signature(call).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if param is not None and isinstance(param.default, int):
        return param.default
    return fallback


def model_max_length(tokenizer, encoder, cap: int = 512) -> int:
    n = getattr(tokenizer, "model_max_length", None)
    if not n or n > 10**6:  # "no limit" sentinel of tokenizers without a configured length
        n = cap
    pos = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    return int(min(n, pos) if pos else n)


def require_components(pipeline, *names: str) -> list:
    # A diffusers pipeline answers a removed component with its config entry, a (library, class) tuple.
    comps = [getattr(pipeline, n, None) for n in names]
    comps = [None if isinstance(c, (tuple, list)) else c for c in comps]
    missing = [n for n, c in zip(names, comps, strict=True) if c is None]
    if missing:
        raise ValueError(
            f"{type(pipeline).__name__} has no {', '.join(missing)}; ICE encodes the concepts with the "
            "pipeline's own tokenizer and text encoder, so load the pipeline with them"
        )
    return comps
