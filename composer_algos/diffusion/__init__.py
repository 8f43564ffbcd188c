"""Diffusion core: noise schedules, the DiffusionModel contract, timestep samplers, VLB terms and flow matching."""

from composer_algos.diffusion.contract import CONTRACT_MEMBERS, DiffusionContract, get_diffusion_model
from composer_algos.diffusion.denoisers import TimeConditionedConvNet, build_dit, build_unet, count_parameters
from composer_algos.diffusion.densities import (
    DENSITIES,
    CosMapDensity,
    LogitNormalDensity,
    ModeDensity,
    TimeDensity,
    UniformDensity,
)
from composer_algos.diffusion.draw import DrawRecord
from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.flow_model import FlowMatchingModel
from composer_algos.diffusion.model import PREDICTION_TYPES, DiffusionLoss, DiffusionModel, LossWeighting
from composer_algos.diffusion.schedule import SCHEDULE_KINDS, NoiseSchedule
from composer_algos.diffusion.timestep_samplers import (
    ContinuousTimestepSampler,
    FixedDistributionSampler,
    TimestepSampler,
    UniformSampler,
    sample_from_probs,
    sample_within_cells,
    tilt,
)

__all__ = [
    'CONTRACT_MEMBERS',
    'ContinuousTimestepSampler',
    'CosMapDensity',
    'DENSITIES',
    'DiffusionContract',
    'DiffusionLoss',
    'DiffusionModel',
    'DrawRecord',
    'FixedDistributionSampler',
    'FlowMatchingModel',
    'FlowSchedule',
    'LogitNormalDensity',
    'LossWeighting',
    'ModeDensity',
    'NoiseSchedule',
    'PREDICTION_TYPES',
    'SCHEDULE_KINDS',
    'TimeConditionedConvNet',
    'TimeDensity',
    'TimestepSampler',
    'UniformDensity',
    'UniformSampler',
    'build_dit',
    'build_unet',
    'count_parameters',
    'get_diffusion_model',
    'sample_from_probs',
    'sample_within_cells',
    'tilt',
]
