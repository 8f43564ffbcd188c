"""Adaptive timestep sampling (arXiv 2411.09998): a learned policy over timesteps rewarded by each update's effect."""

from composer_algos.algorithms.adaptive_timestep_sampling.adaptive_timestep_sampling import (
    POLICIES, REWARDS, AdaptiveTimestepSampling, RewardSetting)
from composer_algos.algorithms.adaptive_timestep_sampling.functional import (
    beta_grid_log_probs, f_regression_scores, grid_timesteps, grid_weights, reinforce_loss, select_timesteps,
    sum_of_changes)
from composer_algos.algorithms.adaptive_timestep_sampling.policy import (BetaPolicy, GlobalPolicy, PolicyLearner,
                                                                        PolicySampler)
from composer_algos.algorithms.adaptive_timestep_sampling.probe import Probe, Prober
from composer_algos.algorithms.adaptive_timestep_sampling.selection import TimestepSelection

__all__ = ['AdaptiveTimestepSampling', 'BetaPolicy', 'GlobalPolicy', 'PolicyLearner', 'PolicySampler', 'POLICIES',
           'Probe', 'Prober', 'REWARDS', 'RewardSetting', 'TimestepSelection', 'beta_grid_log_probs',
           'f_regression_scores', 'grid_timesteps', 'grid_weights', 'reinforce_loss', 'select_timesteps',
           'sum_of_changes']
