"""The solver: every erasure method's closed form, and the one registry that names them.

This package is the one home of the mathematics (``docs/method.md`` derives every formula). It is pure torch: no
Lightning, diffusers or transformers import, so the callback, the one-shot API, the benchmarks and the tests all
call the same code.

- :mod:`.spectral`: what every method shares (energy-weighted subspaces, overlap projectors, the low-rank operator
  ``D = U M U^T`` that edits a layer as ``W <- W (I - D) = W - (W U)(M U^T)``);
- :mod:`.hardening`: the layers' Gram matrix and the closed-form adversary (ICE's hardening, RECE);
- one module per method, each with its hyperparameter dataclass: :mod:`.ice` (:class:`ICEHyperParams`),
  :mod:`.cure`, :mod:`.uce`, :mod:`.rece`, :mod:`.projection`.

A method is registered once, by its hyperparameter dataclass (:func:`register_method`): the dataclass validates
its fields in ``__post_init__``, says whether it reads the layers' Gram matrix (``needs_gram``) and builds the
operator (``build``). :func:`erase`, the callback, the CLI's ``--method`` choices and the manifest all read
:data:`METHODS`.

Example:
    >>> import torch
    >>> from ice_lightning.core.solver import build_operator, method_params
    >>> method_params("cure", {"erase_expansion": 100.0})
    CUREParams(erase_expansion=100.0, preserve_expansion=10.0, rank_tol=1e-06)
    >>> g = torch.Generator().manual_seed(0)
    >>> op = build_operator("cure", torch.randn(12, 64, generator=g), torch.randn(40, 64, generator=g))
    >>> op.method, op.dim
    ('cure', 64)
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from .cure import CUREParams, cure_operator
from .hardening import adversarial_inputs, harden, layer_gram, metric_factor, output_erasure
from .ice import (
    ICEHyperParams,
    Metric,
    Objective,
    OverlapKind,
    dense_minimizer,
    dissociation_operator,
    ice_components,
    spectral_unlearning_objective,
)
from .projection import ProjectionParams, projection_operator
from .rece import RECEParams, rece_operator
from .spectral import (
    DissociationOperator,
    EnergySubspace,
    Overlap,
    Spectrum,
    anderson_duffin,
    compress_states,
    energy_overlap,
    energy_subspace,
    expansion,
    overlap_projector,
)
from .uce import UCEParams, uce_dense_edit, uce_operator

__all__ = [
    "METHODS",
    "MethodParams",
    "register_method",
    "method_params",
    "check_hparams",
    "needs_gram",
    "build_operator",
    "ICEHyperParams",
    "CUREParams",
    "UCEParams",
    "RECEParams",
    "ProjectionParams",
    "Metric",
    "Objective",
    "OverlapKind",
    "EnergySubspace",
    "Spectrum",
    "compress_states",
    "Overlap",
    "DissociationOperator",
    "expansion",
    "energy_subspace",
    "overlap_projector",
    "energy_overlap",
    "ice_components",
    "anderson_duffin",
    "spectral_unlearning_objective",
    "dense_minimizer",
    "dissociation_operator",
    "cure_operator",
    "projection_operator",
    "uce_operator",
    "uce_dense_edit",
    "rece_operator",
    "layer_gram",
    "adversarial_inputs",
    "harden",
    "output_erasure",
    "metric_factor",
]


class MethodParams(Protocol):
    """What a method's hyperparameter dataclass provides (fields validated in ``__post_init__``). Optionally also
    ``gram_optional`` (default False): with ``needs_gram``, whether :meth:`build` also solves without ``gram`` (ICE's
    default hardening, plain ICE for states alone), so that :func:`build_operator` does not refuse the call."""

    @property
    def needs_gram(self) -> bool:
        """Whether :meth:`build` reads ``gram``, the :func:`layer_gram` of the layers that read the space (the plan
        computes it for the solve)."""

    def build(self, E_erase: Tensor, E_preserve: Tensor, anchor: tuple[Tensor, Tensor] | None = None,
              concepts: int = 1, E_base: Tensor | Spectrum | None = None,
              gram: Tensor | None = None) -> DissociationOperator:  # fmt: skip
        """The operator for these states: ``concepts`` (how many concepts ``E_erase`` holds) and ``E_base`` (the
        broad preserve base) are read by methods that weigh them (ICE), ``anchor`` (paired source and guide
        states) by those that map the concept somewhere."""


#: name -> hyperparameter dataclass, in the order the CLI lists them.
METHODS: dict[str, type[MethodParams]] = {}
#: name -> how error messages call the method (its hyperparameters are "ICE hyperparameters", "uce ...").
_TITLES: dict[str, str] = {}


def register_method(name: str, params: type[MethodParams], title: str | None = None) -> None:
    """Make ``name`` a method of :func:`~ice_lightning.core.plan.erase`, the callback, the CLI and the manifest:
    ``params`` is a dataclass whose fields are the method's hyperparameters (defaults included), with ``needs_gram``
    and ``build`` as in :class:`MethodParams`."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    if not (hasattr(params, "__dataclass_fields__") and callable(getattr(params, "build", None))):
        raise TypeError(f"{params!r} is not a hyperparameter dataclass with a build() method (see MethodParams)")
    METHODS[name] = params
    _TITLES[name] = title or name


def method_params(method: str, hparams: dict[str, Any] | None = None) -> MethodParams:
    """The typed hyperparameters of ``method`` from keyword values (defaults for the rest), validated: an unknown
    method or field, or a value out of range, is a ``ValueError`` naming the valid ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(METHODS)}")
    params, hparams = METHODS[method], dict(hparams or {})
    unknown = sorted(set(hparams) - set(params.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown {_TITLES[method]} hyperparameter(s) {unknown}; choose from "
                         f"{sorted(params.__dataclass_fields__)}")  # fmt: skip
    return params(**hparams)


def check_hparams(method: str, hparams: dict) -> None:
    """Validate the solver hyperparameters of ``method`` before anything is computed; errors name the valid
    names or range."""
    method_params(method, hparams)


def needs_gram(method: str, hparams: dict) -> bool:
    """Whether ``build_operator(method, ...)`` reads ``gram=``: RECE always, ICE hardened (by default one round
    where the Gram is given), in the output metric, or with the plan's trigger search (``trigger_rounds > 0``)."""
    return method_params(method, hparams).needs_gram


def build_operator(
    method: str,
    E_erase: Tensor,
    E_preserve: Tensor,
    anchor: tuple[Tensor, Tensor] | None = None,
    concepts: int = 1,
    E_base: Tensor | Spectrum | None = None,
    gram: Tensor | None = None,
    **hparams,
) -> DissociationOperator:
    """The operator of one of :data:`METHODS` from the same inputs (used by ``erase`` and the benchmarks);
    ``concepts`` (the number of erased concepts) and ``E_base`` (the broad preserve base) are used by ICE only;
    ``gram`` (:func:`layer_gram` of the layers that read this space) by RECE and hardened ICE."""
    params = method_params(method, hparams)
    if params.needs_gram and gram is None and not getattr(params, "gram_optional", False):
        raise ValueError(f"{method!r} with these hyperparameters reads the edited layers: "
                         "pass gram=layer_gram(weights)")
    return params.build(E_erase, E_preserve, anchor=anchor, concepts=concepts, E_base=E_base, gram=gram)


register_method("ice", ICEHyperParams, title="ICE")
register_method("cure", CUREParams)
register_method("uce", UCEParams)
register_method("projection", ProjectionParams)
register_method("rece", RECEParams)
