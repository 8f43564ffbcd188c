"""Noise assignment (Immiscible Diffusion, its KNN variant, OT-CFM's minibatch coupling)."""

from composer_algos.algorithms.noise_assignment.noise_assignment import (
    COSTS,
    MODES,
    SCOPES,
    NoiseAssignment,
    candidate_costs,
    hungarian_assignment,
    pairwise_cost,
)

# The algorithm first: it is what the folder's name registers.
__all__ = ['NoiseAssignment', 'COSTS', 'MODES', 'SCOPES', 'candidate_costs', 'hungarian_assignment', 'pairwise_cost']
