"""Log-normal noise-level sampling: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models" (EDM), NeurIPS 2022 (arXiv 2206.00364), Table 1: ``ln(sigma) ~ N(P_mean, P_std^2)``, with
``P_mean = -1.2, P_std = 1.2``.

Mapped onto the discrete variance-preserving schedule through the noise level of each timestep,
``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`` (increasing in t: t = 0 clean, t = T-1 noisiest). Each timestep
receives the probability of the interval of ``ln(sigma)`` nearest to it: the cell edges are the midpoints of
neighbouring ``ln(sigma_t)`` and the two end cells are open, so every draw of EDM's sigma lands on its nearest
timestep and the masses sum to 1 exactly. A negative ``P_mean`` favours low noise, i.e. small t.

Deviations, stated once: the schedule's range of sigma is fixed (EDM's continuous sigma beyond it lands on the end
timesteps), and a timestep with ``sigma = inf`` (the last step of a zero-terminal-SNR schedule) or ``sigma = 0``
gets no mass, since every finite sigma is nearer to a neighbour.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.density_sampling import SAMPLER_NEEDS, install_fixed_distribution
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['LogNormalSampling', 'log_normal_probs', 'log_sigmas']


def _check(p_mean: float, p_std: float) -> None:
    if not math.isfinite(p_mean):
        raise ValueError(f'p_mean must be finite, got {p_mean}.')
    if not (p_std > 0 and math.isfinite(p_std)):
        raise ValueError(f'p_std must be positive and finite, got {p_std}.')


def log_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """``ln(sigma_t) = 0.5 ln((1 - alphabar_t) / alphabar_t)`` for all T timesteps, float64 (+-inf at the ends of
    schedules that reach alphabar = 0 or 1)."""
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log1p(-alphas_cumprod) - torch.log(alphas_cumprod))


def log_normal_probs(schedule: NoiseSchedule, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """EDM's log-normal sigma distribution on the T timesteps of ``schedule``, ``(T,)`` float64, summing to 1.

    Example:
        >>> p = log_normal_probs(NoiseSchedule('linear', 1000))
        >>> float((p * torch.arange(1000)).sum()) < 500  # P_mean = -1.2: mostly low noise
        True
    """
    _check(p_mean, p_std)
    log_sigma = log_sigmas(schedule)
    inner = 0.5 * (log_sigma[:-1] + log_sigma[1:])
    infinity = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-infinity, inner, infinity])
    cdf = torch.special.ndtr((edges - p_mean) / p_std)
    probs = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
    return probs / probs.sum()


class LogNormalSampling(DiffusionAlgorithm):
    """Owns the timestep sampler: draws t from EDM's log-normal sigma density mapped onto the schedule.

    No importance weights. Logs the mean timestep of the distribution as a hyperparameter.

    Args:
        p_mean: mean of ``ln(sigma)`` (-1.2 in EDM).
        p_std: standard deviation of ``ln(sigma)``, positive (1.2 in EDM).

    Example:
        >>> LogNormalSampling(p_mean=-1.2, p_std=1.2)
        LogNormalSampling(p_mean=-1.2, p_std=1.2)
    """

    needs = SAMPLER_NEEDS
    objectives = ('ddpm',)
    why = (
        "EDM's ln(sigma) density is mapped through the noise levels of a DDPM schedule; a rectified flow has no "
        'such table and no flow-matching form is derived here.'
    )
    instead = "use logit_normal_sampling (SD3's density for rectified flow)"
    owns_timestep_sampler = True

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        _check(p_mean, p_std)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, float]:
        probs = log_normal_probs(model.noise_schedule, self.p_mean, self.p_std)
        return {'log_normal_sampling/mean_t': install_fixed_distribution(model, probs, self.owner)}
