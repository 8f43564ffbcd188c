"""What every loss weighting here shares: converting an epsilon-space weight to the model's target, and installing.

A weighting stated for the epsilon loss (P2, SpeeD) weights the same objective for another target once multiplied
by ``c(SNR)``, where ``||eps - eps_hat||^2 = c * ||target - target_hat||^2`` at a fixed ``x_t``:

- epsilon: ``c = 1``;
- v_prediction: ``eps - eps_hat = sqrt(alphabar) (v - v_hat)``, so ``c = alphabar = SNR / (SNR + 1)`` (1 at SNR = inf);
- sample: ``eps - eps_hat = -sqrt(alphabar / (1 - alphabar)) (x0 - x0_hat)``, so ``c = SNR``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, ClassVar

import torch
from composer.algorithms.warnings import NoEffectWarning
from composer.core import State
from composer.loggers import Logger

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.diffusion.model import LossWeighting
from composer_algos.diffusion.schedule import check_prediction_type

__all__ = [
    'FlowLossWeighting',
    'WEIGHTING_NEEDS',
    'check_prediction_type',
    'epsilon_loss_factor',
    'from_epsilon_weight',
    'install_flow_loss_weighting',
    'install_loss_weighting',
    'weight_range',
]

log = logging.getLogger(__name__)

# The contract members install_loss_weighting uses.
WEIGHTING_NEEDS = ('add_loss_weighting', 'noise_schedule', 'num_timesteps', 'prediction_type')


def epsilon_loss_factor(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``c(SNR)`` with ``||eps - eps_hat||^2 = c ||target - target_hat||^2``: 1, ``SNR / (SNR + 1)`` or ``SNR``.

    float64; at SNR = inf the v factor is its limit 1 and the sample factor is inf.

    Example:
        >>> epsilon_loss_factor(torch.tensor([0.0, 1.0, float('inf')]), 'v_prediction')
        tensor([0.0000, 0.5000, 1.0000], dtype=torch.float64)
    """
    check_prediction_type(prediction_type)
    snr = snr.to(torch.float64)
    if prediction_type == 'epsilon':
        return torch.ones_like(snr)
    if prediction_type == 'v_prediction':
        return torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (snr + 1.0))
    return snr


def from_epsilon_weight(epsilon_weight: torch.Tensor, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The weight on the ``prediction_type`` loss that weights the same objective as ``epsilon_weight`` on the
    epsilon loss: ``epsilon_weight * c(SNR)``. Only the sample target at SNR = inf can give a non-finite value."""
    return epsilon_weight.to(torch.float64) * epsilon_loss_factor(snr, prediction_type)


def install_loss_weighting(model: Any, weighting: LossWeighting, owner: str) -> torch.Tensor:
    """Evaluate ``weighting`` on all T timesteps of ``model``, check it and add the table to the model's chain; return
    the (T,) weights.

    Non-finite or negative weights are an error naming ``owner``, the prediction type and the timesteps; weights
    that are all 1 raise a ``NoEffectWarning``.
    """
    schedule = model.noise_schedule
    t = torch.arange(model.num_timesteps)
    weights = weighting(schedule, t, model.prediction_type).to(torch.float64)
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        where = t[bad][:5].tolist()
        raise ValueError(
            f'{owner} gives loss weights that are negative or not finite for '
            f'prediction_type={model.prediction_type!r} at timesteps {where} (SNR there: '
            f'{schedule.snr(t[bad][:5]).tolist()}); choose other arguments or another prediction type.'
        )
    if bool((weights == 1).all()):
        warnings.warn(NoEffectWarning(f'{owner} weights every timestep by 1 with these arguments.'), stacklevel=2)
    # The weights depend on t only (for this schedule and prediction type): the model indexes this table at every
    # batch instead of recomputing the formula.
    model.add_loss_weighting(functools.partial(_table_lookup, weights.float()), owner=owner)
    log.info('%s: loss weights in [%.4g, %.4g].', owner, float(weights.min()), float(weights.max()))
    return weights


def install_flow_loss_weighting(model: Any, weighting: LossWeighting, owner: str) -> torch.Tensor:
    """Add ``weighting`` (a function of sigma) to a flow-matching ``model``'s chain; return its weights at the centres
    of the model's cells of sigma.

    The weighting is evaluated at each drawn sigma (not tabulated: sigma is continuous). Non-finite or negative
    weights at the cell centres are an error naming ``owner``.
    """
    sigma = model.grid_points()
    weights = weighting(model.noise_schedule, sigma, model.prediction_type).to(torch.float64)
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        raise ValueError(
            f'{owner} gives loss weights that are negative or not finite at sigma '
            f'{sigma[bad][:5].tolist()}; choose other arguments.'
        )
    model.add_loss_weighting(weighting, owner=owner)
    log.info(
        '%s: loss weights in [%.4g, %.4g] over the cells of sigma.', owner, float(weights.min()), float(weights.max())
    )
    return weights


def weight_range(prefix: str, weights: torch.Tensor) -> dict[str, float]:
    """The range of installed weights as hyperparameters ``<prefix>/weight_min`` and ``<prefix>/weight_max``."""
    return {f'{prefix}/weight_min': float(weights.min()), f'{prefix}/weight_max': float(weights.max())}


class FlowLossWeighting(DiffusionAlgorithm):
    """Base of the flow-matching loss weightings: installs :meth:`weighting`, a function of sigma, in a flow-matching
    model's chain at ``Event.INIT`` and logs the range of its weights over the cells of sigma as
    ``<prefix>/weight_min`` and ``<prefix>/weight_max``; a DDPM model is an error."""

    needs = ('add_loss_weighting', 'grid_points', 'noise_schedule', 'prediction_type')
    objectives = ('flow_matching',)
    why = 'it weights the velocity loss by the noise level sigma of a rectified flow.'
    instead = 'weight a DDPM loss with min_snr_weighting or p2_weighting'
    adds_loss_weighting = True
    prefix: ClassVar[str] = ''

    def weighting(self) -> LossWeighting:
        """The weighting ``(schedule, sigma, prediction_type) -> (B,)`` weights."""
        raise NotImplementedError

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, float]:
        return weight_range(self.prefix, install_flow_loss_weighting(model, self.weighting(), self.owner))


def _table_lookup(table: torch.Tensor, schedule: Any, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    return table.to(t.device)[t]
