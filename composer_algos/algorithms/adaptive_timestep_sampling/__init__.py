"""Adaptive timestep sampling (arXiv 2411.09998): a learned policy over timesteps rewarded by each update's effect."""

from composer_algos.algorithms.adaptive_timestep_sampling.adaptive_timestep_sampling import (
    POLICIES,
    REWARDS,
    AdaptiveTimestepSampling,
    RewardSetting,
    read_time_averaged_distribution,
)
from composer_algos.algorithms.adaptive_timestep_sampling.functional import (
    beta_grid_log_probs,
    clipped_importance_weights,
    f_regression_scores,
    grid_timesteps,
    grid_weights,
    kl_divergence,
    mix_with_uniform,
    reinforce_loss,
    select_timesteps,
    sum_of_changes,
    time_averaged_distribution,
)
from composer_algos.algorithms.adaptive_timestep_sampling.policy import (
    BetaPolicy,
    FrozenSampler,
    GlobalPolicy,
    PolicyLearner,
    PolicySampler,
)
from composer_algos.algorithms.adaptive_timestep_sampling.probe import Probe, Prober
from composer_algos.algorithms.adaptive_timestep_sampling.selection import TimestepSelection

__all__ = [
    'AdaptiveTimestepSampling',
    'BetaPolicy',
    'FrozenSampler',
    'GlobalPolicy',
    'PolicyLearner',
    'PolicySampler',
    'POLICIES',
    'Probe',
    'Prober',
    'REWARDS',
    'RewardSetting',
    'TimestepSelection',
    'beta_grid_log_probs',
    'clipped_importance_weights',
    'f_regression_scores',
    'grid_timesteps',
    'grid_weights',
    'kl_divergence',
    'mix_with_uniform',
    'read_time_averaged_distribution',
    'reinforce_loss',
    'select_timesteps',
    'sum_of_changes',
    'time_averaged_distribution',
]
