"""Improved DDPM's importance sampling of timesteps by the loss's second moment."""

from composer_algos.algorithms.loss_second_moment_sampling.loss_second_moment_sampling import (
    LossSecondMomentSampler, LossSecondMomentSampling, append_losses, loss_second_moment_probs)

__all__ = ['LossSecondMomentSampler', 'LossSecondMomentSampling', 'append_losses', 'loss_second_moment_probs']
