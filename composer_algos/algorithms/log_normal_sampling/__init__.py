"""Log-normal noise-level sampling (EDM) mapped onto a discrete schedule."""

from composer_algos.algorithms.log_normal_sampling.log_normal_sampling import (LogNormalSampling, log_normal_probs,
                                                                               log_sigmas)
from composer_algos.registry import algorithms

algorithms.register('log_normal_sampling', func=LogNormalSampling)

__all__ = ['LogNormalSampling', 'log_normal_probs', 'log_sigmas']
