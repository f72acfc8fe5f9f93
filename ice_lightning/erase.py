"""One-shot concept erasure of a diffusers pipeline: ``ice_lightning.erase(pipeline, erase=[...])``.

Example:
    >>> import ice_lightning
    >>> result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")  # doctest: +SKIP
    >>> result.layers[:1], result.timings["total_s"]  # doctest: +SKIP
    >>> result.undo()  # exact original weights  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .concepts import ConceptSpec, Prompt
from .editing import LayerEdit, apply_edits, undo_edits
from .layers import NoTextConditioningLayerError, TextConditioningLayers
from .solver import METHODS, DissociationOperator, build_operator
from .text_encoders import EmbeddingSpace, embedding_spaces

__all__ = [
    "ErasureResult",
    "erase",
    "find_text_conditioning",
    "pipeline_spaces",
    "resolve_layer",
    "text_conditioning_layers",
    "DENOISER_COMPONENTS",
]

#: Pipeline components that may hold a denoiser (Wan 2.2 has two experts).
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")


@dataclass
class ErasureResult:
    """What :func:`erase` did: operators per embedding space, edited layers, timings; ``undo()`` reverts."""

    spec: ConceptSpec
    method: str
    hparams: dict
    operators: dict[str, DissociationOperator]
    layers: list[str]
    timings: dict[str, float]
    spaces: dict[str, EmbeddingSpace] = field(repr=False)
    layer_spaces: dict[str, str] = field(repr=False)
    edits: list[LayerEdit] = field(repr=False)
    pipeline: object = field(repr=False, default=None)
    undone: bool = False

    def undo(self) -> None:
        """Restore the exact original weights of every edited layer (undo later erasures first)."""
        if self.undone:
            raise RuntimeError("this erasure was already undone")
        history = getattr(self.pipeline, "_ice_erasures", [])
        if history and history[-1] is not self and self in history:
            raise RuntimeError("undo the later erasures of this pipeline first (undo in reverse order)")
        undo_edits(self.edits)
        self.undone = True
        if self in history:
            history.remove(self)

    def weight_delta(self, name: str) -> tuple[Tensor, Tensor]:
        """``(L, R)`` with ``W_before = W_after + L @ R`` (float64) for the qualified layer ``name``."""
        e = next(e for e in self.edits if e.name == name)
        return e.L, e.R

    def modules(self) -> dict[str, nn.Linear]:
        return {e.name: e.module for e in self.edits}

    def reference_weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """``{name: (weight, bias)}`` of every edited layer as it was before this erasure (``W + L R``, float64;
        no copy of the original is kept, so it is rebuilt from the current weight)."""
        out = {}
        for e in self.edits:
            w = e.module.weight.detach().to(e.L.device, torch.float64)
            out[e.name] = (w + e.L @ e.R, e.module.bias)
        return out

    def to_manifest(self) -> dict:
        """JSON-ready record of this erasure (export manifest)."""
        return {
            "concepts": self.spec.to_dict(),
            "method": self.method,
            "hparams": self.hparams,
            "layers": self.layers,
            "operators": {s: {"dim": op.dim, "rank": op.rank} for s, op in self.operators.items()},
            "timings": self.timings,
        }


def _denoisers(pipeline) -> dict[str, nn.Module]:
    found = {n: getattr(pipeline, n) for n in DENOISER_COMPONENTS if getattr(pipeline, n, None) is not None}
    if not found:
        raise NoTextConditioningLayerError(
            f"{type(pipeline).__name__} has no denoiser component ({', '.join(DENOISER_COMPONENTS)}); "
            "no text-conditioning layer found"
        )
    return found


def resolve_layer(pipeline, qualified: str) -> nn.Module:
    """The module named ``"component.path.in.component"`` (e.g. ``"unet.mid_block...attn2.to_k"``)."""
    comp, sub = qualified.split(".", 1)
    return getattr(pipeline, comp).get_submodule(sub)


def find_text_conditioning(
    pipeline, verify: bool = True, layers: Iterable[str] | None = None
) -> dict[str, TextConditioningLayers]:
    """The text-conditioning layers of every denoiser of ``pipeline``, keyed by component name.

    ``layers`` overrides the table with explicit qualified names (``"unet.mid_block...to_k"``)."""
    found = {}
    names = list(layers) if layers is not None else None
    for comp, model in _denoisers(pipeline).items():
        if names is not None:
            own = [n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == comp]
            if not own:
                continue
            found[comp] = TextConditioningLayers.find(model, verify=verify, names=own)
        else:
            found[comp] = TextConditioningLayers.find(model, verify=verify)
    if not found:
        raise NoTextConditioningLayerError(f"none of the given layers {names} belongs to a denoiser component")
    return found


_ENCODER_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")


def text_conditioning_layers(pipeline, verify: bool = True) -> dict[str, tuple[nn.Linear, str]]:
    """``{qualified name: (layer, space)}`` over every denoiser of ``pipeline``."""
    return {
        f"{comp}.{name}": pair
        for comp, found in find_text_conditioning(pipeline, verify=verify).items()
        for name, pair in found.layers.items()
    }


def pipeline_spaces(pipeline) -> dict[str, EmbeddingSpace]:
    """Embedding spaces of ``pipeline``, built once and cached on it (the text encoders are frozen).

    The cache is keyed by the identity of the tokenizers and text encoders, so swapping one rebuilds it."""
    key = tuple(id(getattr(pipeline, n, None)) for n in _ENCODER_PARTS)
    cached = getattr(pipeline, "_ice_spaces", None)
    if cached is None or cached[0] != key:
        cached = (key, embedding_spaces(pipeline, next(iter(_denoisers(pipeline).values()))))
        pipeline._ice_spaces = cached
    return cached[1]


def _collect(space: EmbeddingSpace, prompts: list[Prompt], include_eot: bool, what: str) -> Tensor:
    rows = space.per_prompt(prompts, include_eot)
    if not space.pooled:
        by_name: dict[str, int] = {}
        for p, r in zip(prompts, rows, strict=True):
            if p.span is not None:
                name = p.text[p.span[0] : p.span[1]]
                by_name[name] = by_name.get(name, 0) + r.shape[0]
        empty = [n for n, k in by_name.items() if k == 0]
        if empty:
            raise ValueError(
                f"{what} concept(s) {empty} tokenize to nothing with this pipeline's tokenizer; check the "
                "spelling or use words the tokenizer knows"
            )
    E = torch.cat(rows, dim=0)
    if E.shape[0] == 0:
        raise ValueError(f"no {what} token states were collected; nothing defines the {what} subspace")
    if not torch.isfinite(E).all():
        raise ValueError(
            f"the {what} embeddings contain NaN or inf: the text encoder is broken or overflowed "
            "(run it in float32); the model was not changed"
        )
    return E


def _anchor_pairs(space: EmbeddingSpace, spec: ConceptSpec, include_eot: bool) -> tuple[Tensor, Tensor] | None:
    pairs = spec.anchor_prompts()
    if not pairs:
        return None
    src = space.per_prompt([a for a, _ in pairs], include_eot)
    dst = space.per_prompt([b for _, b in pairs], include_eot)
    keep = [i for i in range(len(pairs)) if src[i].shape[0] and dst[i].shape[0]]
    if not keep:
        raise ValueError(f"the anchor {spec.anchor!r} tokenizes to nothing with this pipeline's tokenizer")
    # Pair prompt by prompt: the mean state of the concept's tokens maps to the anchor's.
    return torch.stack([src[i].mean(0) for i in keep]), torch.stack([dst[i].mean(0) for i in keep])


def erase(
    pipeline,
    erase: list[str] | str | None = None,
    preserve: list[str] | None = None,
    family: str = "custom",
    *,
    spec: ConceptSpec | None = None,
    synonyms: dict[str, list[str]] | None = None,
    anchor: str | None = None,
    templates: list[str] | None = None,
    include_eot: bool = False,
    method: str = "ice",
    layers: Iterable[str] | None = None,
    verify: bool = True,
    **hparams,
) -> ErasureResult:
    """Erase concepts from ``pipeline`` in place with a closed-form edit of its text-conditioning layers.

    Args:
        pipeline: a diffusers pipeline (SD 1.x/2.x, SDXL, SD3, Flux, PixArt, TextToVideoSD, AnimateDiff,
            CogVideoX, Wan, LTX) or any pipeline of those denoisers built around another text encoder.
        erase, preserve, family, synonyms, anchor, templates, include_eot: the concept spec (see
            :class:`~ice_lightning.concepts.ConceptSpec`); or pass a ready ``spec``.
        method: ``"ice"`` (default) or a baseline: ``"cure"``, ``"uce"``, ``"projection"``.
        layers: explicit qualified layer names instead of the layer table.
        verify: confirm the layers with a forward hook.
        **hparams: solver hyperparameters (``ICEHyperParams`` fields for ICE).

    Returns:
        An :class:`ErasureResult`. On any error the pipeline is left exactly as it was.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if spec is None:
        spec = ConceptSpec(
            erase=erase if erase is not None else [],
            preserve=preserve,
            family=family,
            synonyms=synonyms or {},
            anchor=anchor,
            templates=templates,
            include_eot=include_eot,
        )
    targets = find_text_conditioning(pipeline, verify=verify, layers=layers)
    spaces = pipeline_spaces(pipeline)
    layer_spaces: dict[str, str] = {}
    for comp, found in targets.items():
        for name, (lin, space) in found.layers.items():
            if space not in spaces:
                raise ValueError(f"layer {comp}.{name} reads the {space!r} space, which this pipeline lacks")
            if lin.in_features != spaces[space].dim:
                raise ValueError(
                    f"dimension mismatch: layer {comp}.{name} reads {lin.in_features}-d states but the "
                    f"pipeline's {space!r} text states are {spaces[space].dim}-d; the denoiser and the text "
                    "encoder do not belong together"
                )
            layer_spaces[f"{comp}.{name}"] = space
    t1 = time.perf_counter()

    used = sorted(set(layer_spaces.values()))
    states = {}
    for s in used:
        E_e = _collect(spaces[s], spec.erase_prompts(), spec.include_eot, "erase")
        E_p = _collect(spaces[s], spec.preserve_prompts(), spec.include_eot, "preserve")
        states[s] = (E_e, E_p, _anchor_pairs(spaces[s], spec, spec.include_eot))
    t2 = time.perf_counter()

    operators = {}
    for s, (E_e, E_p, pairs) in states.items():
        try:
            operators[s] = build_operator(method, E_e, E_p, anchor=pairs, concepts=len(spec.erase), **hparams)
        except ValueError as err:
            raise ValueError(f"{s!r} space: {err}") from err
    t3 = time.perf_counter()

    plan = [(name, resolve_layer(pipeline, name), operators[space]) for name, space in layer_spaces.items()]
    edits = apply_edits(plan)
    t4 = time.perf_counter()

    result = ErasureResult(
        spec=spec,
        method=method,
        hparams=next(iter(operators.values())).hparams,
        operators=operators,
        layers=list(layer_spaces),
        timings={
            "find_layers_s": t1 - t0,
            "encode_s": t2 - t1,
            "solve_s": t3 - t2,
            "apply_s": t4 - t3,
            "total_s": t4 - t0,
        },
        spaces=spaces,
        layer_spaces=layer_spaces,
        edits=edits,
        pipeline=pipeline,
    )
    history = getattr(pipeline, "_ice_erasures", None)
    if history is None:
        history = []
        pipeline._ice_erasures = history
    history.append(result)
    return result
