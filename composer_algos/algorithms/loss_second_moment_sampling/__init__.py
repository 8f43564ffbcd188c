"""Improved DDPM's importance sampling of timesteps by the loss's second moment."""

from composer_algos.algorithms.loss_second_moment_sampling.loss_second_moment_sampling import (
    LossSecondMomentSampler,
    LossSecondMomentSampling,
    append_losses,
    loss_second_moment_probs,
)

# The algorithm first: it is what the folder's name registers.
__all__ = ['LossSecondMomentSampling', 'LossSecondMomentSampler', 'append_losses', 'loss_second_moment_probs']
