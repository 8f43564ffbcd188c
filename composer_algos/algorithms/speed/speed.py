"""SpeeD: Wang et al., "A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training",
arXiv 2405.17403; official code NUS-HPC-AI-Lab/SpeeD (``speed/diffusion/speed/__init__.py``).

The paper splits the timesteps by their process increments into acceleration, deceleration and convergence
areas. In the convergence area, above a threshold ``tau`` (700 of 1000 with the linear schedule), ``x_t`` is
almost pure noise, the increments barely change and training there helps little. Time runs from t = 0 (clean) to
t = T-1 (pure noise) as everywhere in this package.

- Asymmetric sampling: ``p(t) ∝ k`` for ``t < tau_T`` and ``∝ 1`` for ``t >= tau_T``: every timestep below the
  threshold (acceleration and deceleration areas) is ``k`` times as likely as any timestep of the convergence area.
  ``tau`` is given for T = 1000 and scaled, ``tau_T = round(tau T / 1000)``, kept within ``[1, T - 1]``.
- Change-aware weighting, on the epsilon loss: with ``g_t = d(1 - alphabar_t)/dt`` (central differences) min-max
  normalised over all T to ``g'_t`` in [0, 1],
  ``w_t = (1 - lam) + (2 lam - 1) g'_t`` for ``t < tau_T`` and ``w_t = 1`` for ``t >= tau_T``.
  Below the threshold the weights lie between ``1 - lam`` and ``lam``: the fastest-changing timestep gets ``lam``,
  the slowest ones approach ``1 - lam``. They are non-negative for every schedule and ``tau`` exactly when
  ``0 <= lam <= 1`` (``lam = 1.01`` already gives -0.01 at ``tau = 999`` on the linear schedule); other values are
  rejected (the official constructor's default ``lam=5`` gives weights down to -3.7 at ``tau = 700`` on the linear
  schedule, -4 at ``tau = 999``). ``lam`` in [0.5, 1] emphasises fast change, as the paper intends (its
  ablations use 0.5 to 1, its experiments 0.6); ``lam < 0.5`` reverses the emphasis.

Deviations from the official code, each stated once:

- The code also pairs half of each batch with a "dual" timestep ``|t_m - t|`` around a "meaningful step" t_m;
  that pairing is not part of the asymmetric density and is left out: t is drawn i.i.d. from ``p``.
- The weights are written for the epsilon loss (the paper's setting). For v and x0 targets they are converted
  (times ``SNR / (SNR + 1)`` or ``SNR``) so that the same epsilon-space objective is trained, as P2 here does.
- ``tau`` scales with T; the code hard-codes it on 1000 steps.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.density_sampling import install_fixed_distribution
from composer_algos.algorithms.weighting import (
    WEIGHTING_NEEDS,
    check_prediction_type,
    from_epsilon_weight,
    install_loss_weighting,
    weight_range,
)
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['SpeeD', 'speed_threshold', 'speed_probs', 'speed_epsilon_weights', 'speed_weight']


def _check_tau(tau: float) -> None:
    if not 0 < tau < 1000:
        raise ValueError(f'tau must be strictly between 0 and 1000 (it is given for T=1000), got {tau}.')


def _check_k(k: float) -> None:
    if not (k >= 1 and math.isfinite(k)):
        raise ValueError(
            f'k must be finite and >= 1 (timesteps below tau are k times as likely; k < 1 would favour '
            f'the convergence area, the opposite of SpeeD), got {k}.'
        )


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(
            f'lam must be in [0, 1]: the weights lie between 1 - lam and lam, so any other value can make '
            f"some of them negative (the official code's default lam=5 gives -3.7 on the linear "
            f'schedule), got {lam}.'
        )


def speed_threshold(num_timesteps: int, tau: float = 700) -> int:
    """``tau_T = round(tau T / 1000)`` within ``[1, T - 1]``: the first timestep of the convergence area.

    Example:
        >>> speed_threshold(1000), speed_threshold(100)
        (700, 70)
    """
    _check_tau(tau)
    return min(max(round(tau * num_timesteps / 1000), 1), num_timesteps - 1)


def speed_probs(schedule: NoiseSchedule, tau: float = 700, k: float = 2.0) -> torch.Tensor:
    """SpeeD's asymmetric sampling distribution ``(T,)`` (float64): ``k`` below ``tau_T``, 1 above, normalised.

    Example:
        >>> p = speed_probs(NoiseSchedule('linear', 1000))
        >>> float(p[0] / p[999])
        2.0
    """
    _check_k(k)
    threshold = speed_threshold(schedule.num_timesteps, tau)
    probs = torch.ones(schedule.num_timesteps, dtype=torch.float64)
    probs[:threshold] = k
    return probs / probs.sum()


def speed_epsilon_weights(schedule: NoiseSchedule, tau: float = 700, lam: float = 0.6) -> torch.Tensor:
    """The change-aware weights ``(T,)`` (float64) of all timesteps, on the epsilon loss."""
    _check_lam(lam)
    threshold = speed_threshold(schedule.num_timesteps, tau)
    change = torch.gradient(1.0 - schedule.alphas_cumprod.to(torch.float64))[0]
    span = change.max() - change.min()
    normalised = (change - change.min()) / span if span > 0 else torch.zeros_like(change)
    weights = (1.0 - lam) + (2.0 * lam - 1.0) * normalised
    weights[threshold:] = 1.0
    return weights


def speed_weight(
    schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str = 'epsilon', tau: float = 700, lam: float = 0.6
) -> torch.Tensor:
    """SpeeD's change-aware weights ``(B,)`` (float64) at timesteps ``t`` for the loss on ``prediction_type``.

    Example:
        >>> s = NoiseSchedule('linear', 1000)
        >>> speed_weight(s, torch.tensor([999]))  # the convergence area keeps weight 1
        tensor([1.], dtype=torch.float64)
    """
    check_prediction_type(prediction_type)
    weights = speed_epsilon_weights(schedule, tau, lam).to(t.device)[t]
    return from_epsilon_weight(weights, schedule.snr(t), prediction_type)


class SpeeD(DiffusionAlgorithm):
    """SpeeD: owns the timestep sampler (asymmetric sampling) and adds the change-aware loss weighting.

    At ``Event.INIT`` it installs :func:`speed_probs` as the model's timestep sampler (no importance correction:
    changing the training distribution is the point) and :func:`speed_weight` in its chain of loss weightings. Logs
    the scaled threshold, the probability mass below it and the range of the weights as hyperparameters.

    Args:
        tau: the start of the convergence area, given for T = 1000 (700 in the paper) and scaled to the model's T.
        k: how many times as likely each timestep below ``tau`` is as each one above it, ``>= 1`` (the paper's
            ablations use 1 to 25; 2 here).
        lam: strength of the change-aware weights, in [0, 1] (0.6 in the paper's experiments).

    Example:
        >>> SpeeD(tau=700, k=2.0, lam=0.6)
        SpeeD(tau=700, k=2.0, lam=0.6)
    """

    needs = (*WEIGHTING_NEEDS, 'set_timestep_sampler')
    objectives = ('ddpm',)
    why = (
        'its threshold tau and change-aware weights are stated on the timesteps of a DDPM schedule (T = 1000) and '
        'its d(1 - alphabar_t)/dt; no flow-matching form is derived here.'
    )
    instead = 'draw sigma from logit_normal_sampling or mode_sampling'
    owns_timestep_sampler = True
    adds_loss_weighting = True

    def __init__(self, tau: int = 700, k: float = 2.0, lam: float = 0.6):
        _check_tau(tau)
        _check_k(k)
        _check_lam(lam)
        self.tau = tau
        self.k = float(k)
        self.lam = float(lam)

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, Any]:
        probs = speed_probs(model.noise_schedule, self.tau, self.k)
        install_fixed_distribution(model, probs, self.owner)
        weights = install_loss_weighting(model, functools.partial(speed_weight, tau=self.tau, lam=self.lam), self.owner)
        threshold = speed_threshold(model.num_timesteps, self.tau)
        return {
            'speed/threshold': threshold,
            'speed/mass_below_threshold': float(probs[:threshold].sum()),
            **weight_range('speed', weights),
        }
