"""P2 (perception prioritized) loss weighting: Choi et al., "Perception Prioritized Training of Diffusion Models",
CVPR 2022 (arXiv 2204.00227).

The paper weights the epsilon loss by ``1 / (k + SNR)^gamma`` (``gamma = 1, k = 1`` here by default; the paper
also uses ``gamma = 0.5``): less weight on the nearly clean, high-SNR timesteps that only refine imperceptible
detail.

Other targets (stated once): the weight is converted so that it weights the same epsilon-space objective, i.e.
multiplied by ``c(SNR)`` with ``||eps - eps_hat||^2 = c ||target - target_hat||^2``
(:func:`~composer_algos.algorithms.weighting.epsilon_loss_factor`):

- epsilon: ``w = 1 / (k + SNR)^gamma``
- v_prediction: ``w = SNR / ((SNR + 1) (k + SNR)^gamma)``
- sample (x0): ``w = SNR / (k + SNR)^gamma``

Limits: at SNR = 0 the weights are ``k^-gamma``, 0 and 0. At SNR = inf the epsilon and v weights are 0 (1 when
``gamma = 0``); the sample weight ``SNR^(1 - gamma)`` tends to 0 for ``gamma > 1``, 1 for ``gamma = 1`` and inf for
``gamma < 1``: that one combination (sample target, ``gamma < 1``, a schedule with alphabar = 1) is rejected at
``Event.INIT`` with an error. Standard schedules never reach SNR = inf.
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
    from_epsilon_weight,
    install_loss_weighting,
    weight_range,
)
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['P2Weighting', 'p2_weight']


def _check(gamma: float, k: float) -> None:
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f'gamma must be non-negative and finite, got {gamma}.')
    if not (k > 0 and math.isfinite(k)):
        raise ValueError(f'k must be positive and finite (k = 0 gives an infinite weight at SNR = 0), got {k}.')


def p2_weight(
    schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str = 'epsilon', gamma: float = 1.0, k: float = 1.0
) -> torch.Tensor:
    """P2 weights ``(B,)`` (float64) at timesteps ``t`` for the loss on ``prediction_type``.

    Example:
        >>> s = NoiseSchedule('linear', 1000)
        >>> float(p2_weight(s, torch.tensor([0]))) < 1e-3  # SNR(0) is about 1e4
        True
    """
    check_prediction_type(prediction_type)
    _check(gamma, k)
    snr = schedule.snr(t).to(torch.float64)
    epsilon_weight = (k + snr) ** -gamma
    weight = from_epsilon_weight(epsilon_weight, snr, prediction_type)
    if prediction_type == 'sample':
        limit = 0.0 if gamma > 1 else 1.0 if gamma == 1 else math.inf
        weight = torch.where(torch.isinf(snr), torch.full_like(snr, limit), weight)
    return weight


class P2Weighting(DiffusionAlgorithm):
    """Multiplies the per-sample loss by the P2 weight ``1 / (k + SNR)^gamma`` (converted for v and x0 targets).

    Installs :func:`p2_weight` in the model's chain of loss weightings at ``Event.INIT`` (it multiplies with the
    others) and logs the arguments and the range of the weights as hyperparameters.

    Args:
        gamma: the exponent (1 here, 0.5 or 1 in the paper; 0 turns the weighting off).
        k: the offset, positive (1 in the paper).

    Example:
        >>> P2Weighting(gamma=1.0, k=1.0)
        P2Weighting(gamma=1.0, k=1.0)
    """

    needs = WEIGHTING_NEEDS
    objectives = ('ddpm',)
    why = (
        'P2 weights the epsilon loss of a DDPM schedule by 1 / (k + SNR)^gamma; no flow-matching form is derived here.'
    )
    instead = 'weight the flow-matching loss with sigma_sqrt_weighting or cosmap_weighting'
    adds_loss_weighting = True

    def __init__(self, gamma: float = 1.0, k: float = 1.0):
        _check(gamma, k)
        self.gamma = float(gamma)
        self.k = float(k)

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, float]:
        weights = install_loss_weighting(model, functools.partial(p2_weight, gamma=self.gamma, k=self.k), self.owner)
        return {'p2_weighting/gamma': self.gamma, 'p2_weighting/k': self.k, **weight_range('p2_weighting', weights)}
