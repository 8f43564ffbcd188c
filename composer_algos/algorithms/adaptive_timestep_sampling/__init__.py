"""Adaptive timestep sampling (arXiv 2411.09998): a learned policy over timesteps rewarded by VLB reduction."""

from composer_algos.algorithms.adaptive_timestep_sampling.adaptive_timestep_sampling import (
    POLICIES, AdaptiveTimestepSampling, BetaPolicy, GlobalPolicy, PolicySampler, beta_grid_log_probs,
    f_regression_scores, reinforce_loss, select_timesteps, tilted_log_probs)
from composer_algos.registry import algorithms

algorithms.register('adaptive_timestep_sampling', func=AdaptiveTimestepSampling)

__all__ = ['AdaptiveTimestepSampling', 'BetaPolicy', 'GlobalPolicy', 'PolicySampler', 'POLICIES',
           'beta_grid_log_probs', 'f_regression_scores', 'reinforce_loss', 'select_timesteps', 'tilted_log_probs']
