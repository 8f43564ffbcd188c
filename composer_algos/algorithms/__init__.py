"""Composer Algorithms for faster diffusion training; importing this module registers them by name."""

from composer.algorithms import GradientClipping

from composer_algos.registry import algorithms

algorithms.register('gradient_clipping', func=GradientClipping)

# Each algorithm package registers itself when imported below.
import composer_algos.algorithms.ema  # noqa: E402,F401
from composer_algos.algorithms.adaptive_timestep_sampling import AdaptiveTimestepSampling  # noqa: E402,F401
from composer_algos.algorithms.log_normal_sampling import LogNormalSampling  # noqa: E402,F401
from composer_algos.algorithms.logit_normal_sampling import LogitNormalSampling  # noqa: E402,F401
from composer_algos.algorithms.loss_second_moment_sampling import LossSecondMomentSampling  # noqa: E402,F401
from composer_algos.algorithms.min_snr_weighting import MinSNRWeighting  # noqa: E402,F401
from composer_algos.algorithms.p2_weighting import P2Weighting  # noqa: E402,F401
from composer_algos.algorithms.speed import SpeeD  # noqa: E402,F401
from composer_algos.algorithms.curriculum_timestep_schedule import CurriculumTimestepSchedule  # noqa: E402
from composer_algos.algorithms.momentum_decay import MomentumDecay  # noqa: E402

algorithms.register('curriculum_timestep_schedule', func=CurriculumTimestepSchedule)
algorithms.register('momentum_decay', func=MomentumDecay)
