"""Log-normal noise-level sampling (EDM) mapped onto a discrete schedule."""

from composer_algos.algorithms.log_normal_sampling.log_normal_sampling import (
    LogNormalSampling,
    log_normal_probs,
    log_sigmas,
)

__all__ = ['LogNormalSampling', 'log_normal_probs', 'log_sigmas']
