"""The sigma_sqrt loss weighting of flow matching (diffusers' SD3 scripts)."""

from composer_algos.algorithms.sigma_sqrt_weighting.sigma_sqrt_weighting import SigmaSqrtWeighting, sigma_sqrt_weight

__all__ = ['SigmaSqrtWeighting', 'sigma_sqrt_weight']
