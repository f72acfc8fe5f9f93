"""RECE (Gong et al., ECCV 2024) on top of UCE, as a method of the registry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .hardening import _check_hardening, _largest_eigenvalue, adversarial_inputs
from .spectral import DissociationOperator, Spectrum, _check_states
from .uce import UCEParams, uce_operator

__all__ = ["RECEParams", "rece_operator"]


@dataclass(frozen=True)
class RECEParams(UCEParams):
    """RECE's hyperparameters: UCE's (it runs on top of UCE's closed form), its rounds and the adversary's ridge.

    Attributes:
        lam: the ridge weight of UCE's closed form (larger keeps the layer closer to the original).
        preserve_scale: the weight of the preserved rows.
        rounds: rounds of adversarial embeddings, each erased by a new UCE solve.
        gamma: the adversary's ridge, relative to the Gram matrix's largest eigenvalue.
    """

    rounds: int = 3
    gamma: float = 0.01

    needs_gram = True  # reads the layers' Gram matrix (its adversary)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_hardening(self.rounds, self.gamma)

    def build(self, E_erase: Tensor, E_preserve: Tensor, anchor: tuple[Tensor, Tensor] | None = None,
              concepts: int = 1, E_base: Tensor | Spectrum | None = None,
              gram: Tensor | None = None) -> DissociationOperator:  # fmt: skip
        erase, guide = (E_erase, None) if anchor is None else anchor
        return rece_operator(erase, E_preserve, gram, self.lam, self.preserve_scale, E_guide=guide,
                             rounds=self.rounds, gamma=self.gamma)  # fmt: skip


def rece_operator(E_erase: Tensor, E_preserve: Tensor, gram: Tensor, lam: float = 1.0,
                  preserve_scale: float = 1.0, E_guide: Tensor | None = None, rounds: int = 3,
                  gamma: float = 0.01) -> DissociationOperator:  # fmt: skip
    """RECE (Gong et al., ECCV 2024) on top of UCE: start from UCE's closed form, then ``rounds`` times derive the
    adversarial embeddings of the concept against the current edit (its closed form with the regulariser
    ``gamma``, :func:`adversarial_inputs`) and solve UCE again with them added to the erased rows, each mapped
    to the harmless guide (the anchor's states, or nothing: output zero) while the preserve rows are kept."""
    Ce = _check_states(E_erase, "E_erase")
    guide = None if E_guide is None else _check_states(E_guide, "E_guide")
    op = uce_operator(Ce, E_preserve, lam=lam, preserve_scale=preserve_scale, E_guide=guide)
    rows, guides, top = Ce, guide, _largest_eigenvalue(gram) if rounds else None
    for _ in range(rounds):
        x = adversarial_inputs(op, gram, Ce, gamma, top)
        rows = torch.cat([rows, x])
        if guides is not None:
            guides = torch.cat([guides, guide])
        op = uce_operator(rows, E_preserve, lam=lam, preserve_scale=preserve_scale, E_guide=guides)
    hp = {"lam": lam, "preserve_scale": preserve_scale, "guide": E_guide is not None, "rounds": rounds,
          "gamma": gamma}  # fmt: skip
    return DissociationOperator(U=op.U, M=op.M, method="rece", hparams=hp)
