"""Registers every built-in part under its name: the one place that knows them all.

The YAML layer (``composer_algos.config``) imports this module; Python users who resolve names themselves import it
too. Nothing else in the package imports it, and it is the only module that writes to the registries.
"""

from __future__ import annotations

from composer import loggers as composer_loggers
from composer.algorithms import GradientClipping
from composer.optim import DecoupledAdamW, DecoupledSGDW
from composer.optim import scheduler as composer_schedulers
from torch import optim

from composer_algos import registry
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
from composer_algos.algorithms.p2_weighting import P2Weighting
from composer_algos.algorithms.sigma_sqrt_weighting import SigmaSqrtWeighting
from composer_algos.algorithms.speed import SpeeD
from composer_algos.callbacks import FID, BitsPerDim, LossBands, SampleGrid, TimestepHeatmap
from composer_algos.data import build_streaming_image_dataloader, build_vae_encoder
from composer_algos.diffusion.build import build_diffusion_model
from composer_algos.diffusion.denoisers import TimeConditionedConvNet, build_dit, build_unet
from composer_algos.evaluation.features import FEATURE_EXTRACTORS

__all__ = ['BUILTINS']

BUILTINS = {
    'models': {'diffusion': build_diffusion_model},
    'denoisers': {'unet': build_unet, 'dit': build_dit, 'conv': TimeConditionedConvNet},
    'encoders': {'vae': build_vae_encoder},
    'datasets': {'streaming_image': build_streaming_image_dataloader},
    'algorithms': {
        'adaptive_timestep_sampling': AdaptiveTimestepSampling,
        'curriculum_timestep_schedule': CurriculumTimestepSchedule,
        'momentum_decay': MomentumDecay,
        'loss_second_moment_sampling': LossSecondMomentSampling,
        'min_snr_weighting': MinSNRWeighting,
        'p2_weighting': P2Weighting,
        'speed': SpeeD,
        'logit_normal_sampling': LogitNormalSampling,
        'log_normal_sampling': LogNormalSampling,
        'mode_sampling': ModeSampling,
        'cosmap_sampling': CosMapSampling,
        'sigma_sqrt_weighting': SigmaSqrtWeighting,
        'cosmap_weighting': CosMapWeighting,
        'ema': WarmupEMA,
        'gradient_clipping': GradientClipping,
    },
    'callbacks': {'fid': FID, 'bits_per_dim': BitsPerDim, 'loss_bands': LossBands, 'sample_grid': SampleGrid,
                  'timestep_heatmap': TimestepHeatmap},
    'optimizers': {'adam': optim.Adam, 'adamw': optim.AdamW, 'sgd': optim.SGD, 'decoupled_adamw': DecoupledAdamW,
                   'decoupled_sgdw': DecoupledSGDW},
    'schedulers': {
        'constant': composer_schedulers.ConstantScheduler,
        'constant_with_warmup': composer_schedulers.ConstantWithWarmupScheduler,
        'cosine': composer_schedulers.CosineAnnealingScheduler,
        'cosine_with_warmup': composer_schedulers.CosineAnnealingWithWarmupScheduler,
        'linear': composer_schedulers.LinearScheduler,
        'linear_with_warmup': composer_schedulers.LinearWithWarmupScheduler,
        'multistep': composer_schedulers.MultiStepScheduler,
        'multistep_with_warmup': composer_schedulers.MultiStepWithWarmupScheduler,
        'polynomial_with_warmup': composer_schedulers.PolynomialWithWarmupScheduler,
    },
    'loggers': {'file': composer_loggers.FileLogger, 'tensorboard': composer_loggers.TensorboardLogger,
                'wandb': composer_loggers.WandBLogger, 'mlflow': composer_loggers.MLFlowLogger,
                'in_memory': composer_loggers.InMemoryLogger},
    'features': FEATURE_EXTRACTORS,
}

for _kind, _parts in BUILTINS.items():
    for _name, _part in _parts.items():
        registry.KINDS[_kind].register(_name, func=_part)
