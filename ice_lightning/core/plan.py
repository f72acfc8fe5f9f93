"""An erasure in three steps: plan (where to edit, from which states), solve (the operators), apply (the edit).

:func:`erase` is those three calls on one :class:`ErasurePlan`::

    plan = ErasurePlan(pipeline, spec)          # find and verify the layers; the embedding spaces
    result = plan.apply(plan.solve())           # encode the concepts, solve D per space; W <- W (I - D)

``ICECallback`` uses the same object: every rank plans, rank 0 solves, the operators are broadcast and
every rank applies; a re-application is ``plan.apply(operators, bases=weights_at_last_application)``.

Example:
    >>> import ice_lightning
    >>> result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")  # doctest: +SKIP
    >>> result.layers[:1], result.timings["total_s"]  # doctest: +SKIP
    >>> result.undo()  # exact original weights  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .architectures import lookup_architecture
from .concepts import ConceptSpec, Family, Prompt
from .context import context_requests, context_shifts, context_sides
from .editing import apply_edits, concept_responses
from .encoders import EmbeddingSpace
from .layers import NoTextConditioningLayerError, TextConditioningLayers, adapted_weight, lora_wrappers
from .parts import denoisers, history_of, pipeline_spaces
from .result import ErasureResult, TargetLayer
from .sharding import is_sharded, local_shard, reshard
from .solver import (
    DissociationOperator,
    ICEHyperParams,
    build_operator,
    dissociation_operator,
    layer_gram,
    method_params,
)
from .solver.ice import part_params
from .solver.spectral import _composed
from .triggers import erase_triggers

__all__ = [
    "Method",
    "ConceptStates",
    "ErasurePlan",
    "erase",
    "find_text_conditioning",
    "text_conditioning_layers",
]

#: A name in :data:`~ice_lightning.core.solver.METHODS` (the registry: ICE and the baselines, or one you registered).
Method = str

log = logging.getLogger(__name__)
#: An operator of at least this share of the space's width fills it (``solve`` warns).
_FULL_SHARE = 0.9

class ConceptStates(NamedTuple):
    """Token states of one embedding space: erase rows, preserve rows, optional (concept, anchor) pairs, the broad
    preserve base (compressed to at most d rows; ``None`` without one), and the concept's imprint on its context
    tokens (:func:`~.context.context_shifts`; ``None`` unless ``context_expansion > 0``)."""

    erase: Tensor
    preserve: Tensor
    anchor: tuple[Tensor, Tensor] | None
    base: Tensor | None = None
    context: Tensor | None = None


def find_text_conditioning(
    pipeline, verify: bool = True, layers: Iterable[str] | None = None
) -> dict[str, TextConditioningLayers]:
    """The text-conditioning layers of every denoiser of ``pipeline``, keyed by component name; the check pass
    feeds text states of the widths the pipeline's encoders give.

    ``layers`` overrides the table with explicit qualified names (``"unet.mid_block...to_k"``), which read the
    ``text`` space, or with ``{name: space}``."""
    found = {}
    spaces = dict(layers) if isinstance(layers, Mapping) else None  # {name: space}: spaces given, not "text"
    names = list(layers) if layers is not None else None
    dens = denoisers(pipeline)
    known = verify and all(lookup_architecture(m) is not None for m in dens.values())  # else nothing is verified
    dims = {s: space.dim for s, space in pipeline_spaces(pipeline).items()} if known else None
    for comp, model in dens.items():
        if names is not None:
            own = [n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == comp]
            if own and spaces is not None:
                own = {n: spaces[f"{comp}.{n}"] for n in own}
            if own:
                found[comp] = TextConditioningLayers.find(model, verify=verify, names=own, dims=dims)
        else:
            found[comp] = TextConditioningLayers.find(model, verify=verify, dims=dims)
    if not found:
        raise NoTextConditioningLayerError(f"none of the given layers {names} belongs to a denoiser component")
    return found


def text_conditioning_layers(
    pipeline, verify: bool = True, layers: Iterable[str] | None = None
) -> dict[str, TargetLayer]:
    """``{qualified name: TargetLayer(module, space)}`` over every denoiser of ``pipeline``."""
    return {
        f"{comp}.{name}": TargetLayer(lin, space)
        for comp, found in find_text_conditioning(pipeline, verify=verify, layers=layers).items()
        for name, (lin, space) in found.layers.items()
    }


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


def _erase_rank(E: Tensor) -> int:
    """How many directions the erase states span (0 while there are too few of them to fill 90 % of the space,
    so the common case costs no decomposition)."""
    n, d = E.shape
    if n < _FULL_SHARE * d:
        return 0
    s = torch.linalg.svdvals(E.to(torch.float64))
    return int((s > 1e-6 * s[0]).sum())


def _anchor_pairs(space: EmbeddingSpace, spec: ConceptSpec, context: bool = False) -> tuple[Tensor, Tensor] | None:
    """(concept, anchor) state pairs of the spec's anchor prompts, or ``None`` without an anchor. ``context``
    (``ICEHyperParams.anchor_context``): also every context token of each erase prompt with the same token of the
    anchor's prompt (matched by position before and after the concept, as :func:`~.context.context_shifts` matches
    them), so the map aims at what the whole anchor prompt reads like, not only at its anchor tokens."""
    pairs = spec.anchor_prompts()
    if not pairs:
        return None
    src = space.per_prompt([a for a, _ in pairs], spec.include_eot)
    dst = space.per_prompt([b for _, b in pairs], spec.include_eot)
    keep = [i for i in range(len(pairs)) if src[i].shape[0] and dst[i].shape[0]]
    if not keep:
        raise ValueError(f"the anchor {spec.anchor!r} tokenizes to nothing with this pipeline's tokenizer")
    # Pair prompt by prompt: the mean state of the concept's tokens maps to the anchor's.
    rows = [(src[i].mean(0)[None], dst[i].mean(0)[None]) for i in keep]
    if context and not space.pooled:
        # (erase prompt's side, the anchor prompt's same side): one template, so the same sides
        sides = [pair for a, b in (pairs[i] for i in keep)
                 for pair in zip(context_sides(a, spec.include_eot), context_sides(b, spec.include_eot), strict=True)]
        states = space.requested([r for pair in sides for r in pair])
        rows += [(x, y) for x, y in zip(states[::2], states[1::2], strict=True) if x.shape == y.shape]
    return torch.cat([a for a, _ in rows]), torch.cat([b for _, b in rows])


class ErasurePlan:
    """Where an erasure edits and from which states: step 1 of :func:`erase`, shared with ``ICECallback``.

    Construction finds (and by default verifies) the text-conditioning layers of every denoiser and checks
    them against the pipeline's embedding spaces; nothing is encoded and nothing is written. :meth:`states`
    encodes the concept prompts (once), :meth:`solve` computes one operator per space, :meth:`apply` writes.

    Args:
        pipeline: a diffusers pipeline, or any object holding a denoiser (``unet``, ``transformer``) and the
            tokenizers and text encoders its architecture reads.
        spec: what to erase and keep.
        method: a name in :data:`~ice_lightning.core.solver.METHODS` (``"ice"`` or a baseline).
        hparams: the method's hyperparameters (fields of its dataclass: ``ICEHyperParams`` for ICE).
        layers: explicit qualified layer names instead of the architecture table.
        verify: confirm the layers with the architecture's check pass.
    """

    def __init__(self, pipeline, spec: ConceptSpec, method: Method = "ice", hparams: dict | None = None,
                 layers: Iterable[str] | None = None, verify: bool = True) -> None:  # fmt: skip
        t0 = time.perf_counter()
        #: the method's typed hyperparameters (:func:`~ice_lightning.core.solver.method_params`), validated
        self.params = method_params(method, dict(hparams or {}))
        self.spec, self.method, self.hparams = spec, method, dict(hparams or {})
        self.targets = text_conditioning_layers(pipeline, verify=verify, layers=layers)
        self.spaces = pipeline_spaces(pipeline)
        for name, (lin, space) in self.targets.items():
            if space not in self.spaces:
                raise ValueError(f"layer {name} reads the {space!r} space, which this pipeline lacks")
            if lin.in_features != self.spaces[space].dim:
                raise ValueError(
                    f"dimension mismatch: layer {name} reads {lin.in_features}-d states but the pipeline's "
                    f"{space!r} text states are {self.spaces[space].dim}-d; the denoiser and the text encoder "
                    "do not belong together"
                )
        self.denoisers = denoisers(pipeline)
        self._history_key = next(iter(self.denoisers.values()))
        self._states: dict[str, ConceptStates] | None = None
        self._grams: dict[str, Tensor] | None = None
        #: ``{space: [prompt, ...]}`` found by the trigger search (``trigger_rounds > 0``) at the last :meth:`solve`
        self.triggers: dict[str, list[str]] = {}
        self.timings = {"find_layers_s": time.perf_counter() - t0}

    @property
    def layer_spaces(self) -> dict[str, str]:
        """``{qualified layer name: embedding space}``."""
        return {n: t.space for n, t in self.targets.items()}

    def modules(self) -> dict[str, nn.Linear]:
        """``{qualified layer name: linear module}``."""
        return {n: t.module for n, t in self.targets.items()}

    def states(self) -> dict[str, ConceptStates]:
        """The concept token states of every space the targets read (encoded once, then kept)."""
        if self._states is None:
            t0 = time.perf_counter()
            spec = self.spec
            context = self._uses_context()
            if context and not spec.preserve:
                log.warning("no preserve concept to measure the concept's imprint on its context tokens against: they "
                            "are left as they are (name preserve concepts, or set context_expansion=0)")  # fmt: skip
            for s in set(self.layer_spaces.values()):
                self.spaces[s].check_concept_tokens(spec.erase_prompts())
                self.spaces[s].check_concept_tokens(spec.preserve_prompts(), "preserve concept")
                self.spaces[s].check_concept_tokens([b for _, b in spec.anchor_prompts()], "anchor")
                if context and not self.spaces[s].pooled:  # the context's texts are the prompts': encode each once
                    eot = spec.include_eot
                    self.spaces[s].requested([*((p, eot) for p in (*spec.erase_prompts(), *spec.preserve_prompts())),
                                              *context_requests(spec, eot)])  # fmt: skip
            self._states = {
                s: ConceptStates(
                    _collect(self.spaces[s], spec.erase_prompts(), spec.include_eot, "erase"),
                    _collect(self.spaces[s], spec.preserve_prompts(), spec.include_eot, "preserve"),
                    _anchor_pairs(self.spaces[s], spec, getattr(self.params, "anchor_context", False)),
                    self.spaces[s].base_states(spec.base_prompts()) if self._uses_base() else None,
                    context_shifts(self.spaces[s], spec, spec.include_eot) if context else None,
                )
                for s in sorted(set(self.layer_spaces.values()))
            }
            self.timings["encode_s"] = time.perf_counter() - t0
        return self._states

    def _uses_base(self) -> bool:
        """Whether the solver reads the broad preserve base: ICE with a positive ``base_weight`` (else the 360
        everyday prompts are not encoded at all)."""
        return getattr(self.params, "base_weight", 0) > 0

    def _uses_context(self) -> bool:
        """Whether the solve erases the concept's imprint on its context tokens: ICE with ``context_expansion > 0``
        (else the context's prompts are not encoded)."""
        return getattr(self.params, "context_expansion", 0) > 0

    @property
    def needs_gram(self) -> bool:
        """Whether :meth:`solve` reads the target layers' weights (RECE; ICE hardened or in the output metric): see
        :meth:`grams`."""
        return self.params.needs_gram

    @torch.no_grad()
    def grams(self) -> dict[str, Tensor]:
        """``{space: sum_l W_l^T W_l}`` over the target layers reading each space, from the weights as they are now
        (computed once, then kept). Row-sharded (FSDP2) weights are summed over this rank's rows, then over every
        rank with an all-reduce: under a strategy every rank calls this (``ICECallback`` does, before rank 0
        alone solves)."""
        if self._grams is None:
            t0 = time.perf_counter()
            reshard(self.denoisers.values())
            spaces = sorted(set(self.layer_spaces.values()))
            sharded = any(is_sharded(t.module.weight) for t in self.targets.values())
            wrappers = None if sharded else lora_wrappers(self.denoisers.values())
            weights = {s: self._reader_weights(s, wrappers) for s in spaces}
            grams = {s: layer_gram(w) for s, w in weights.items()}
            if sharded:
                for G in grams.values():
                    torch.distributed.all_reduce(G)
            self._grams = grams
            self.timings["gram_s"] = time.perf_counter() - t0
        return self._grams

    def _reader_weights(self, space: str, wrappers: dict[int, nn.Module] | None) -> list[Tensor]:
        """The weights of the layers reading ``space`` as they act on it: a LoRA-wrapped layer (``wrappers``, from
        :func:`lora_wrappers`) counts once, as ``W + s B A`` (its base and ``lora_A`` are edited apart but read the
        states together), so an erasure of the adapted model solves the same operator as one of the fused model.
        Sharded (``wrappers=None``): each rank's own rows, with base and ``lora_A`` as separate readers (their rows
        do not align across ranks)."""
        targets = [t for t in self.targets.values() if t.space == space]
        if wrappers is None:
            return [local_shard(t.module.weight) for t in targets]
        out = []
        for t in targets:
            wrapper = wrappers.get(id(t.module))
            if wrapper is None:
                out.append(t.module.weight)
            elif t.module is wrapper.base_layer:
                out.append(adapted_weight(wrapper))
        return out

    def solve(self) -> dict[str, DissociationOperator]:
        """One operator per embedding space, from :meth:`states` (and :meth:`grams` where the method reads the
        layers)."""
        states = self.states()
        grams = self.grams() if self.needs_gram else {}
        t0 = time.perf_counter()
        self.triggers = {}
        self.timings.pop("trigger_search_s", None)
        operators = {}
        for s, st in states.items():
            try:
                operators[s] = build_operator(self.method, st.erase, st.preserve, anchor=st.anchor,
                                              concepts=len(self.spec.erase), E_base=st.base, gram=grams.get(s),
                                              **self.hparams)  # fmt: skip
            except ValueError as err:
                raise ValueError(f"{s!r} space: {err}") from err
            if st.context is not None:
                operators[s] = self._with_context(operators[s], st, grams.get(s))
            if isinstance(self.params, ICEHyperParams) and self.params.trigger_rounds:
                operators[s] = self._with_triggers(s, operators[s], grams[s])
            filled = _erase_rank(st.erase)
            if filled >= _FULL_SHARE * st.erase.shape[1]:
                log.warning(
                    "the %d concept(s) to erase span %d of the %d dimensions of the %r space: the edit reaches "
                    "nearly every direction the layers read, so unrelated prompts change too (and with every "
                    "preserve concept erased, near collateral has nothing to measure: nan). Erase fewer concepts at "
                    "once, or name the concepts to keep", len(self.spec.erase), filled, st.erase.shape[1],
                    s)  # fmt: skip
        self.timings["solve_s"] = time.perf_counter() - t0 - self.timings.get("trigger_search_s", 0.0)
        return operators

    def _erasure_apart(self, rows: Tensor, st: ConceptStates, gram: Tensor | None,
                       expansion: float) -> DissociationOperator:  # fmt: skip
        """``rows`` solved as an ICE erasure of their own, to compose with the concept's: ``erase_expansion =
        expansion``, plain (:func:`~.solver.ice.part_params`), in the erasure's metric, with the same preserve sets
        and base."""
        return dissociation_operator(rows, st.preserve, part_params(self.params, expansion),
                                     concepts=len(self.spec.erase), E_base=st.base, gram=gram)  # fmt: skip

    def _with_context(self, op: DissociationOperator, st: ConceptStates, gram: Tensor | None) -> DissociationOperator:
        """``op`` and the erasure of the concept's imprint on its context tokens (the shift rows, ``erase_expansion =
        context_expansion``), applied to what ``op`` leaves, ``I - D = (I - D_context)(I - D_op)``. In this order every
        development family kept its erasure; in the other the context's operator took 0.03 of the styles'
        (docs/method.md 9)."""
        imprint = self._erasure_apart(st.context, st, gram, self.params.context_expansion)
        return _composed(imprint, op, op.method, op.hparams)

    def _with_triggers(self, space: str, op: DissociationOperator, gram: Tensor) -> DissociationOperator:
        """``op`` after ``trigger_rounds`` rounds of trigger discovery (:func:`~.triggers.erase_triggers`): the found
        prompts' words erased with ``erase_expansion = trigger_expansion`` in the erasure's metric, the same preserve
        sets, composed after ``op``."""
        t0 = time.perf_counter()
        hp, st = self.params, self.states()[space]

        def solve_triggers(rows: Tensor) -> DissociationOperator:
            return self._erasure_apart(rows, st, gram, hp.trigger_expansion)

        op, found = erase_triggers(op, self.spaces[space], self.spec, gram, hp.trigger_rounds, solve_triggers,
                                   include_eot=self.spec.include_eot)  # fmt: skip
        self.triggers[space] = [p.text for p in found]
        self.timings["trigger_search_s"] = self.timings.get("trigger_search_s", 0.0) + time.perf_counter() - t0
        return op

    def apply(self, operators: dict[str, DissociationOperator], bases: dict[str, Tensor] | None = None,
              record: bool = True, keep_undo: bool = True) -> ErasureResult:  # fmt: skip
        """Write ``W <- W (I - D)`` to every target layer, or to none.

        With ``bases`` (``{name: weight after the last application}``) only what changed since is edited,
        ``W <- W - (W - base) D``: with no change an exact no-op, so a re-application never compounds.
        ``record`` adds the result to :func:`edit_history` (``save_erased`` exports what is recorded).
        ``keep_undo=False`` keeps no undo record once every layer is written (see
        :func:`~ice_lightning.core.editing.apply_edits`)."""
        missing = sorted(set(self.layer_spaces.values()) - set(operators))
        if missing:
            raise ValueError(f"no operator for space(s) {missing}; solve the plan first")
        t0 = time.perf_counter()
        reshard(self.denoisers.values())  # FSDP2: edit the persistent row shards, not gathered copies
        result = ErasureResult(self, operators, [], dict(self.timings))
        if not keep_undo:  # all an export needs of the weights before the edit: the concept's outputs through them
            spaces = set(self.layer_spaces.values())
            states = {s: self.spaces[s].token_states(self.spec.heldout_erase_prompts()) for s in spaces}
            weights = {n: (t.module.weight, t.module.bias) for n, t in self.targets.items()}
            result.pre_edit_responses = concept_responses(weights, self.layer_spaces, states, operators)
        history = history_of(self._history_key) if record else []
        history.append(result)  # before the first write: an interrupt after the last one still finds the edit
        try:
            apply_edits([(n, t.module, operators[t.space]) for n, t in self.targets.items()], bases=bases,
                        into=result.edits, keep_undo=keep_undo)  # fmt: skip
        except BaseException:
            if not result.edits:  # rolled back (or the error names the layers it could not restore)
                history.remove(result)
            raise  # an interrupt after the last write keeps the result in the history: it can be undone
        result.timings["apply_s"] = time.perf_counter() - t0
        result.timings["total_s"] = sum(v for k, v in result.timings.items() if k != "total_s")
        return result

    def restore(self, operators: dict[str, DissociationOperator], source: str = "checkpoint",
                record: bool = True) -> ErasureResult:  # fmt: skip
        """Describe, without writing anything, an erasure that the weights already hold: a model resumed from a
        checkpoint of an erased run (recorded in :func:`edit_history`, so ``save_erased`` knows of it), or the
        whole copy of a sharded model, or a model whose adapters were merged for an export (``source``;
        ``record=False``). Its original weights are not known, so it cannot be undone."""
        result = ErasureResult(self, operators, [], dict(self.timings), restored=True, source=source)
        if record:
            history_of(self._history_key).append(result)
        return result


def erase(
    pipeline,
    erase: list[str] | str | None = None,
    preserve: list[str] | None = None,
    family: Family | None = None,
    *,
    spec: ConceptSpec | None = None,
    synonyms: dict[str, list[str]] | None = None,
    anchor: str | None = None,
    templates: list[str] | None = None,
    include_eot: bool | None = None,
    method: Method = "ice",
    layers: Iterable[str] | None = None,
    verify: bool = True,
    keep_undo: bool = True,
    **hparams,
) -> ErasureResult:
    """Erase concepts from ``pipeline`` in place with a closed-form edit of its text-conditioning layers.

    Args:
        pipeline: a diffusers pipeline (SD 1.x/2.x, SDXL, SD3, Flux, PixArt, TextToVideoSD, AnimateDiff,
            CogVideoX, Wan, LTX) or any pipeline of those denoisers built around another text encoder.
        erase, preserve, family, synonyms, anchor, templates, include_eot: the concept spec (see
            :class:`~ice_lightning.core.concepts.ConceptSpec`; ``family`` defaults to ``"custom"``, ``include_eot``
            to ``False``); or pass a ready ``spec``, beside which none of them may be given.
        method: ``"ice"`` (default), a baseline (``"cure"``, ``"uce"``, ``"projection"``, ``"rece"``) or any name
            registered with :func:`~ice_lightning.core.solver.register_method`.
        layers: explicit qualified layer names instead of the architecture table.
        verify: confirm the layers with a forward hook.
        keep_undo: keep what :meth:`ErasureResult.undo` needs (the smaller of a low-rank record and a copy of the
            edited weights); ``False`` holds no extra memory afterwards, for a model you reload to undo.
        **hparams: the method's hyperparameters (the fields of its dataclass in
            :data:`~ice_lightning.core.solver.METHODS`: ``ICEHyperParams`` for ICE).

    Returns:
        An :class:`ErasureResult`. On any error the pipeline is left exactly as it was.
    """
    # None: not given, whatever its value; ConceptSpec keeps the defaults of what is not given
    given = {"erase": erase, "preserve": preserve, "family": family, "synonyms": synonyms, "anchor": anchor,
             "templates": templates, "include_eot": include_eot}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if spec is None:
        spec = ConceptSpec(**{"erase": [], **given})  # nothing to erase: ConceptSpec says so
    elif given:  # a keyword beside a ready spec was once dropped without a word
        raise ValueError(f"erase() got a spec and {', '.join(given)}: the spec holds those; set them in it "
                         f"(dataclasses.replace(spec, {next(iter(given))}=...)) or drop spec=")
    plan = ErasurePlan(pipeline, spec, method=method, hparams=hparams, layers=layers, verify=verify)
    return plan.apply(plan.solve(), keep_undo=keep_undo)
