"""Momentum decay with learning-rate compensation (arXiv 2404.07946; Demon rule)."""

from composer_algos.algorithms.momentum_decay.momentum_decay import (
    RULES,
    MomentumDecay,
    apply_momentum,
    compensation,
    decayed_momentum,
    demon_momentum,
    linear_momentum,
    momentum_key,
)

__all__ = [
    'MomentumDecay',
    'RULES',
    'apply_momentum',
    'compensation',
    'decayed_momentum',
    'demon_momentum',
    'linear_momentum',
    'momentum_key',
]
