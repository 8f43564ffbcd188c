"""Min-SNR-gamma loss weighting: Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
ICCV 2023 (arXiv 2303.09556).

Every target is weighted so that the objective is the x0-space loss weighted by ``min(SNR, gamma)``. Since
``||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2`` and ``||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2``:

- epsilon: ``w = min(SNR, gamma) / SNR``
- v_prediction: ``w = min(SNR, gamma) / (SNR + 1)``
- sample (x0): ``w = min(SNR, gamma)``

Limits where a formula is undefined (SNR = 0 at the last step of a zero-terminal-SNR schedule; SNR = inf where
alphabar = 1):

- SNR -> 0: epsilon ``min(SNR, g) / SNR = SNR / SNR = 1``; v ``SNR / (SNR + 1) -> 0``; sample ``0``.
- SNR -> inf: epsilon ``g / SNR -> 0``; v ``g / (SNR + 1) -> 0``; sample ``g``.

So every weight is finite on every schedule. No deviation from the paper.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.weighting import (
    WEIGHTING_NEEDS,
    check_prediction_type,
    install_loss_weighting,
    weight_range,
)
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['MinSNRWeighting', 'min_snr_weight']


def _check_gamma(gamma: float) -> None:
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f'gamma must be positive and finite, got {gamma}.')


def min_snr_weight(
    schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str = 'epsilon', gamma: float = 5.0
) -> torch.Tensor:
    """Min-SNR-gamma weights ``(B,)`` (float64) at timesteps ``t`` for the loss on ``prediction_type``.

    Example:
        >>> s = NoiseSchedule('linear', 1000)
        >>> min_snr_weight(s, torch.tensor([999]), 'epsilon')  # SNR < 5 there: weight 1
        tensor([1.], dtype=torch.float64)
    """
    check_prediction_type(prediction_type)
    _check_gamma(gamma)
    snr = schedule.snr(t).to(torch.float64)
    clipped = snr.clamp(max=gamma)
    if prediction_type == 'sample':
        return clipped
    if prediction_type == 'v_prediction':
        return clipped / (snr + 1.0)  # gamma / inf = 0 at SNR = inf
    return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))


class MinSNRWeighting(DiffusionAlgorithm):
    """Multiplies the per-sample loss by the Min-SNR-gamma weight for the model's prediction type.

    Installs :func:`min_snr_weight` in the model's chain of loss weightings at ``Event.INIT`` (it multiplies with
    the others) and logs ``gamma`` and the range of the weights as hyperparameters.

    Args:
        gamma: the SNR cap (5 in the paper).

    Example:
        >>> MinSNRWeighting(gamma=5.0)
        MinSNRWeighting(gamma=5.0)
    """

    needs = WEIGHTING_NEEDS
    objectives = ('ddpm',)
    why = (
        'Min-SNR-gamma caps the SNR of a DDPM timestep, with a conversion per DDPM prediction type; no '
        'flow-matching form is derived here.'
    )
    instead = 'weight the flow-matching loss with sigma_sqrt_weighting or cosmap_weighting'
    adds_loss_weighting = True

    def __init__(self, gamma: float = 5.0):
        _check_gamma(gamma)
        self.gamma = float(gamma)

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, float]:
        weights = install_loss_weighting(model, functools.partial(min_snr_weight, gamma=self.gamma), self.owner)
        return {'min_snr_weighting/gamma': self.gamma, **weight_range('min_snr_weighting', weights)}
