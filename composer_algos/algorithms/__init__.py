"""Composer Algorithms for faster diffusion training (each registered by its folder's name)."""

from composer_algos.algorithms.adaptive_timestep_sampling import AdaptiveTimestepSampling
from composer_algos.algorithms.cosmap_sampling import CosMapSampling
from composer_algos.algorithms.cosmap_weighting import CosMapWeighting
from composer_algos.algorithms.curriculum_timestep_schedule import CurriculumTimestepSchedule
from composer_algos.algorithms.ema import WarmupEMA
from composer_algos.algorithms.log_normal_sampling import LogNormalSampling
from composer_algos.algorithms.logit_normal_sampling import LogitNormalSampling
from composer_algos.algorithms.loss_second_moment_sampling import LossSecondMomentSampling
from composer_algos.algorithms.min_snr_weighting import MinSNRWeighting
from composer_algos.algorithms.mode_sampling import ModeSampling
from composer_algos.algorithms.momentum_decay import MomentumDecay
from composer_algos.algorithms.noise_assignment import NoiseAssignment
from composer_algos.algorithms.p2_weighting import P2Weighting
from composer_algos.algorithms.sigma_sqrt_weighting import SigmaSqrtWeighting
from composer_algos.algorithms.speed import SpeeD

__all__ = [
    'AdaptiveTimestepSampling',
    'CosMapSampling',
    'CosMapWeighting',
    'CurriculumTimestepSchedule',
    'LogNormalSampling',
    'LogitNormalSampling',
    'LossSecondMomentSampling',
    'MinSNRWeighting',
    'ModeSampling',
    'MomentumDecay',
    'NoiseAssignment',
    'P2Weighting',
    'SigmaSqrtWeighting',
    'SpeeD',
    'WarmupEMA',
]
