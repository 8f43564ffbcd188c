"""Logit-normal timestep sampling (Stable Diffusion 3)."""

from composer_algos.algorithms.logit_normal_sampling.logit_normal_sampling import (
    LogitNormalSampling,
    logit_normal_probs,
)

__all__ = ['LogitNormalSampling', 'logit_normal_probs']
