"""SpeeD (arXiv 2405.17403): asymmetric timestep sampling and change-aware loss weights."""

from composer_algos.algorithms.speed.speed import (
    SpeeD,
    speed_epsilon_weights,
    speed_probs,
    speed_threshold,
    speed_weight,
)

__all__ = ['SpeeD', 'speed_epsilon_weights', 'speed_probs', 'speed_threshold', 'speed_weight']
