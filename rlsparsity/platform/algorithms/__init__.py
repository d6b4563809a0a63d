"""Algorithms registered by name; importing this package registers the built-in ones."""

from rlsparsity.platform.algorithms import policy_gradient, ppo_prime, preference, supervised  # noqa: F401  (registers)
from rlsparsity.platform.algorithms.registry import (
    ALGORITHMS,
    Algorithm,
    AlgorithmConfig,
    AuxModel,
    Models,
    PairBatch,
    PairSource,
    StepBatch,
    get_algorithm,
    register_algorithm,
)

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AlgorithmConfig",
    "AuxModel",
    "Models",
    "PairBatch",
    "PairSource",
    "StepBatch",
    "get_algorithm",
    "register_algorithm",
]
