"""Diffusion core: noise schedules, the DiffusionModel contract, timestep samplers and VLB terms."""

from composer_algos.diffusion.denoisers import TimeConditionedConvNet, build_dit, build_unet, count_parameters
from composer_algos.diffusion.model import PREDICTION_TYPES, DiffusionLoss, DiffusionModel, LossWeighting
from composer_algos.diffusion.samplers import (FixedDistributionSampler, TimestepSampler, UniformSampler,
                                               sample_from_probs, tilt)
from composer_algos.diffusion.schedule import SCHEDULE_KINDS, NoiseSchedule
from composer_algos.diffusion.utils import get_diffusion_model

__all__ = [
    'DiffusionLoss',
    'DiffusionModel',
    'FixedDistributionSampler',
    'LossWeighting',
    'NoiseSchedule',
    'PREDICTION_TYPES',
    'SCHEDULE_KINDS',
    'TimeConditionedConvNet',
    'TimestepSampler',
    'UniformSampler',
    'build_dit',
    'build_unet',
    'count_parameters',
    'get_diffusion_model',
    'sample_from_probs',
    'tilt',
]
