"""Composer Algorithms for faster diffusion training; importing this module registers them by name."""

from composer.algorithms import GradientClipping

from composer_algos.registry import algorithms

algorithms.register('gradient_clipping', func=GradientClipping)

# Each algorithm package registers itself when imported below.
import composer_algos.algorithms.ema  # noqa: E402,F401
from composer_algos.algorithms.adaptive import AdaptiveTimestepSampling  # noqa: E402
from composer_algos.algorithms.baselines import (LogitNormalSampling, LogNormalSampling,  # noqa: E402
                                                  LossSecondMomentSampling, MinSNRWeighting, P2Weighting, SpeeD)
from composer_algos.algorithms.curriculum import CurriculumTimestepSchedule  # noqa: E402
from composer_algos.algorithms.momentum import MomentumDecay  # noqa: E402

algorithms.register('adaptive_timestep_sampling', func=AdaptiveTimestepSampling)
algorithms.register('curriculum_timestep_schedule', func=CurriculumTimestepSchedule)
algorithms.register('momentum_decay', func=MomentumDecay)
algorithms.register('loss_second_moment_sampling', func=LossSecondMomentSampling)
algorithms.register('min_snr_weighting', func=MinSNRWeighting)
algorithms.register('p2_weighting', func=P2Weighting)
algorithms.register('speed', func=SpeeD)
algorithms.register('logit_normal_sampling', func=LogitNormalSampling)
algorithms.register('log_normal_sampling', func=LogNormalSampling)
