"""Evaluation beside the product: development-set metrics, red-teaming attacks, baselines on their published
recipes and the development set.

Nothing in :mod:`ice_lightning.core` or :mod:`ice_lightning.lightning` imports this package at load time;
``ICEModule(red_team=...)`` imports the attacks when it is asked for them.
"""

from .attacks import ATTACKS, RedTeam, RingABellConfig, embedding_attack, ring_a_bell_prompts, whitebox_inputs
from .baselines import uce_as_published
from .devset import DEV_SET, MANY_ARTISTS, DevConcept, dev_concept, dev_concepts
from .metrics import dev_concept_metrics, relative_change

__all__ = [
    "ATTACKS",
    "RedTeam",
    "RingABellConfig",
    "embedding_attack",
    "ring_a_bell_prompts",
    "whitebox_inputs",
    "uce_as_published",
    "DEV_SET",
    "MANY_ARTISTS",
    "DevConcept",
    "dev_concept",
    "dev_concepts",
    "dev_concept_metrics",
    "relative_change",
]
