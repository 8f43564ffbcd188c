"""Loss weightings and timestep densities as pure functions of the noise schedule and t.

One implementation per formula; the Composer algorithms in ``composer_algos.algorithms.baselines`` only install
them. Time runs from t=0 (clean) to t=T-1 (noisiest) throughout.
"""

from __future__ import annotations

import math

import torch

from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['min_snr_weight', 'p2_weight', 'epsilon_loss_factor', 'logit_normal_probs', 'log_normal_probs',
           'speed_probs', 'speed_weights', 'speed_threshold']


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ('epsilon', 'v_prediction', 'sample'):
        raise ValueError(f'Unknown prediction_type {prediction_type!r}; choose epsilon, v_prediction or sample.')


def epsilon_loss_factor(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``c(SNR)`` with ``||eps - eps_hat||^2 = c * ||target - prediction||^2`` for the given target.

    1 for epsilon, ``SNR / (SNR + 1)`` for v, ``SNR`` for the sample: a weighting stated for the epsilon loss
    becomes, for another target, that weighting times ``c``.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == 'epsilon':
        return torch.ones_like(snr)
    if prediction_type == 'v_prediction':
        return torch.where(torch.isinf(snr), torch.ones_like(snr), snr / (snr + 1))
    return snr


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, prediction_type: str = 'epsilon') -> torch.Tensor:
    """Min-SNR-gamma (Hang et al., 2023): ``min(SNR, g) / SNR`` (epsilon), ``min(SNR, g) / (SNR + 1)`` (v),
    ``min(SNR, g)`` (sample).

    The limits are used where the formula is undefined: at SNR = 0 (zero-terminal-SNR schedules) the epsilon
    weight is 1 and the others 0; at SNR = inf the epsilon and v weights are 0 and the sample weight is g.
    """
    _check_prediction_type(prediction_type)
    snr = snr.to(torch.float64)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == 'epsilon':
        safe = torch.where(snr > 0, snr, torch.ones_like(snr))
        return torch.where(snr > 0, clipped / safe, torch.ones_like(snr))
    if prediction_type == 'v_prediction':
        return torch.where(torch.isinf(snr), torch.zeros_like(snr), clipped / (snr + 1))
    return clipped


def p2_weight(snr: torch.Tensor, gamma: float = 1.0, k: float = 1.0, prediction_type: str = 'epsilon'):
    """P2 (Choi et al., 2022): ``1 / (k + SNR)^gamma`` on the epsilon loss, converted for other targets by
    :func:`epsilon_loss_factor` so the same epsilon-space objective is weighted. SNR is capped at 1e30 so the
    weight stays finite at SNR = inf."""
    snr = snr.to(torch.float64).clamp(max=1e30)
    return epsilon_loss_factor(snr, prediction_type) / (k + snr)**gamma


def logit_normal_probs(num_timesteps: int, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """SD3's logit-normal density of ``u = t / T`` (u -> 1 is noise), at the bin centres, normalised over T."""
    if s <= 0:
        raise ValueError(f's must be positive, got {s}.')
    u = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) / num_timesteps
    logit = torch.log(u) - torch.log1p(-u)
    log_density = -0.5 * ((logit - m) / s)**2 - torch.log(u) - torch.log1p(-u)
    return torch.softmax(log_density, dim=0)


def log_normal_probs(schedule: NoiseSchedule, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """EDM's ``ln(sigma) ~ N(P_mean, P_std^2)`` mapped onto the discrete schedule, ``sigma_t = sqrt((1 - ab) / ab)``.

    Each timestep receives the probability mass of the interval of ``ln(sigma)`` nearest to it (edges at the
    midpoints between neighbouring timesteps, the ends open), so the masses sum to 1 exactly.
    """
    if p_std <= 0:
        raise ValueError(f'p_std must be positive, got {p_std}.')
    ac = schedule.alphas_cumprod.to(torch.float64)
    log_sigma = 0.5 * (torch.log1p(-ac) - torch.log(ac))
    inner = 0.5 * (log_sigma[:-1] + log_sigma[1:])
    edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), inner,
                       torch.tensor([math.inf], dtype=torch.float64)])
    normal = torch.distributions.Normal(torch.tensor(p_mean, dtype=torch.float64),
                                        torch.tensor(p_std, dtype=torch.float64))
    cdf = torch.where(torch.isinf(edges), (edges > 0).to(torch.float64), normal.cdf(edges.clamp(-1e30, 1e30)))
    mass = (cdf[1:] - cdf[:-1]).clamp(min=0)
    return mass / mass.sum()


def speed_threshold(num_timesteps: int, tau: int = 700) -> int:
    """SpeeD's threshold ``tau`` (given for T=1000) on a schedule of T steps."""
    return int(round(tau * num_timesteps / 1000))


def speed_probs(num_timesteps: int, tau: int = 700, k: float = 2.0) -> torch.Tensor:
    """SpeeD's asymmetric sampling: timesteps below the threshold are ``k`` times as likely as those above it.

    Above ``tau`` (the "convergence area", near pure noise) the process increments barely change and the loss is
    small, so SpeeD samples them less.
    """
    if k <= 0:
        raise ValueError(f'k must be positive, got {k}.')
    threshold = speed_threshold(num_timesteps, tau)
    t = torch.arange(num_timesteps)
    probs = torch.where(t < threshold, torch.full((num_timesteps,), float(k), dtype=torch.float64),
                        torch.ones(num_timesteps, dtype=torch.float64))
    return probs / probs.sum()


def speed_weights(schedule: NoiseSchedule, lam: float = 0.6) -> torch.Tensor:
    """SpeeD's change-aware weights ``(1 - lam) + lam * g(t) / mean(g)``, ``g = |d sqrt(1 - alphabar_t) / dt|``.

    Timesteps whose noise level changes fastest get more weight; the mean weight over t is 1. The weights are
    non-negative exactly when ``0 <= lam <= 1`` (larger values, like the public code's default of 5, make them
    negative wherever the change is below average), so other values are rejected.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f'lam must be in [0, 1] so that every weight is non-negative, got {lam}.')
    noise_rate = (1.0 - schedule.alphas_cumprod.to(torch.float64)).sqrt()
    change = torch.gradient(noise_rate)[0].abs()
    return (1.0 - lam) + lam * change / change.mean()
