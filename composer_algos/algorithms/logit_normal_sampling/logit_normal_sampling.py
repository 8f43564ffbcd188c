"""Logit-normal timestep sampling: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (Stable Diffusion 3), ICML 2024 (arXiv 2403.03206), section 3.1.

SD3 draws its time ``u`` in (0, 1) with ``logit(u) ~ N(m, s^2)`` (``m = 0, s = 1`` by default), where u -> 1 is pure
noise. On a flow-matching model that is the method as published: ``sigma = shift(u)``, drawn exactly by the inverse
CDF ``sigmoid(m + s Phi^-1(v))`` at the model's keyed uniform (on the model's grid of sigma when a curriculum prior
tilts it). On a DDPM model ``u`` is the position ``t / T`` on the discrete schedule, with t = 0 clean and t = T-1
pure noise, so ``m > 0`` moves mass to noisier timesteps and ``m < 0`` to cleaner ones; ``m = 0`` is symmetric about
(T-1)/2.

The density is evaluated on the grid of T timesteps as the mass of each timestep's cell:
``p(t) = P(t / T <= u < (t + 1) / T) = Phi((logit((t+1)/T) - m) / s) - Phi((logit(t/T) - m) / s)``, the
distribution of ``floor(u T)`` (how diffusers' training scripts turn u into a timestep index). The masses sum to 1
exactly and need no endpoint handling.

Deviation, stated once (DDPM only): SD3's u is a rectified-flow time, not a DDPM index; like diffusers, we map it by
position on the schedule, not by matching noise levels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger

from composer_algos.algorithms.common import objective_of
from composer_algos.algorithms.density_sampling import DensitySampling, install_fixed_distribution
from composer_algos.diffusion.densities import LogitNormalDensity, TimeDensity
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['LogitNormalSampling', 'logit_normal_probs']


def _check(m: float, s: float) -> None:
    if not math.isfinite(m):
        raise ValueError(f'm must be finite, got {m}.')
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f's must be positive and finite, got {s}.')


def logit_normal_probs(schedule: NoiseSchedule, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """The logit-normal distribution over the T timesteps of ``schedule``, ``(T,)`` float64, summing to 1.

    Example:
        >>> p = logit_normal_probs(NoiseSchedule('linear', 1000), m=1.0)
        >>> float((p * torch.arange(1000)).sum()) > 500  # m > 0: noisier timesteps
        True
    """
    _check(m, s)
    num_timesteps = schedule.num_timesteps
    edges = torch.logit(torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps)
    cdf = torch.special.ndtr((edges - m) / s)
    probs = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
    return probs / probs.sum()


class LogitNormalSampling(DensitySampling):
    """Owns the timestep sampler: draws sigma = shift(u) (flow matching) or t (DDPM, ``u = t / T``) from SD3's
    logit-normal density of ``u`` (no importance weights).

    Logs the mean ``u`` (flow matching) or the mean timestep (DDPM) as a hyperparameter.

    Args:
        m: location of ``logit(u)``; ``m > 0`` favours noisier timesteps (0 in SD3).
        s: scale of ``logit(u)``, positive (1 in SD3).

    Example:
        >>> LogitNormalSampling(m=0.0, s=1.0)
        LogitNormalSampling(m=0.0, s=1.0)
    """

    prefix = 'logit_normal_sampling'

    def __init__(self, m: float = 0.0, s: float = 1.0):
        _check(m, s)
        self.m = float(m)
        self.s = float(s)

    def density(self) -> TimeDensity:
        return LogitNormalDensity(self.m, self.s)

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, float]:
        if objective_of(model) == 'flow_matching':
            return super().install(model, state, logger)
        probs = logit_normal_probs(model.noise_schedule, self.m, self.s)
        return {'logit_normal_sampling/mean_t': install_fixed_distribution(model, probs, self.owner)}
