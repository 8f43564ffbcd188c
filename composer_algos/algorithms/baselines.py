"""The established timestep samplers and loss weightings, as Composer Algorithms on the model contract.

- ``MinSNRWeighting``: Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy" (2023).
- ``P2Weighting``: Choi et al., "Perception Prioritized Training of Diffusion Models" (2022).
- ``SpeeD``: Wang et al., "A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model
  Training", arXiv 2405.17403: asymmetric sampling plus change-aware weights (see
  :func:`~composer_algos.diffusion.weighting.speed_weights` for our reading of the weights).
- ``LogitNormalSampling``: Esser et al., SD3 (2024). ``LogNormalSampling``: Karras et al., EDM (2022).
- ``LossSecondMomentSampling``: Nichol & Dhariwal, Improved DDPM (2021), ``LossSecondMomentResampler``.

The formulas live in :mod:`composer_algos.diffusion.weighting`; these classes decide when to install them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_algos.algorithms.common import ReprMixin, diffusion_model
from composer_algos.diffusion.samplers import FixedDistributionSampler, TimestepSampler
from composer_algos.diffusion.schedule import NoiseSchedule
from composer_algos.diffusion.weighting import (log_normal_probs, logit_normal_probs, min_snr_weight, p2_weight,
                                                speed_probs, speed_weights)

__all__ = ['MinSNRWeighting', 'P2Weighting', 'SpeeD', 'LogitNormalSampling', 'LogNormalSampling',
           'LossSecondMomentSampling', 'LossSecondMomentSampler']


class _InitOnly(ReprMixin, Algorithm):
    """An algorithm that only installs something in the model at INIT."""

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.install(diffusion_model(state, self))

    def install(self, model: Any) -> None:
        raise NotImplementedError


class MinSNRWeighting(_InitOnly):
    """Multiplies the loss by the Min-SNR-gamma weight for the model's prediction type.

    Args:
        gamma: the SNR cap (5 in the paper).
    """

    def __init__(self, gamma: float = 5.0):
        if gamma <= 0:
            raise ValueError(f'gamma must be positive, got {gamma}.')
        self.gamma = float(gamma)

    def weight(self, schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        return min_snr_weight(schedule.snr(t), self.gamma, prediction_type).float()

    def install(self, model: Any) -> None:
        model.add_loss_weighting(self.weight, owner=type(self).__name__)


class P2Weighting(_InitOnly):
    """Multiplies the loss by the P2 weight ``1 / (k + SNR)^gamma`` (converted for non-epsilon targets).

    Args:
        gamma: the exponent (1 in the paper's main setting).
        k: the offset (1).
    """

    def __init__(self, gamma: float = 1.0, k: float = 1.0):
        if gamma < 0 or k <= 0:
            raise ValueError(f'gamma must be >= 0 and k > 0, got gamma={gamma}, k={k}.')
        self.gamma = float(gamma)
        self.k = float(k)

    def weight(self, schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        return p2_weight(schedule.snr(t), self.gamma, self.k, prediction_type).float()

    def install(self, model: Any) -> None:
        model.add_loss_weighting(self.weight, owner=type(self).__name__)


class SpeeD(_InitOnly):
    """SpeeD: asymmetric timestep sampling and change-aware loss weights (arXiv 2405.17403).

    Args:
        tau: threshold timestep, given for T=1000 and scaled to the model's T.
        k: how much more likely timesteps below ``tau`` are than those above.
        lam: strength of the change-aware weights, in [0, 1] (0.6 from the paper's tuned configurations).
    """

    def __init__(self, tau: int = 700, k: float = 2.0, lam: float = 0.6):
        if not 0 < tau < 1000:
            raise ValueError(f'tau must be between 0 and 1000 (it is given for T=1000), got {tau}.')
        if k <= 0:
            raise ValueError(f'k must be positive, got {k}.')
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f'lam must be in [0, 1] so that every weight is non-negative, got {lam}.')
        self.tau = int(tau)
        self.k = float(k)
        self.lam = float(lam)
        self._weights: Optional[torch.Tensor] = None

    def weight(self, schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        if self._weights is None:
            self._weights = speed_weights(schedule, self.lam).float()
        return self._weights.to(t.device)[t]

    def install(self, model: Any) -> None:
        owner = type(self).__name__
        model.set_timestep_sampler(FixedDistributionSampler(speed_probs(model.num_timesteps, self.tau, self.k)), owner)
        model.add_loss_weighting(self.weight, owner=owner)


class LogitNormalSampling(_InitOnly):
    """Draws t from SD3's logit-normal density over ``u = t / T`` (mean ``m``, scale ``s``; m > 0 favours noise)."""

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if s <= 0:
            raise ValueError(f's must be positive, got {s}.')
        self.m = float(m)
        self.s = float(s)

    def install(self, model: Any) -> None:
        probs = logit_normal_probs(model.num_timesteps, self.m, self.s)
        model.set_timestep_sampler(FixedDistributionSampler(probs), type(self).__name__)


class LogNormalSampling(_InitOnly):
    """Draws t from EDM's log-normal density of sigma mapped onto the discrete schedule."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if p_std <= 0:
            raise ValueError(f'p_std must be positive, got {p_std}.')
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def install(self, model: Any) -> None:
        probs = log_normal_probs(model.noise_schedule, self.p_mean, self.p_std)
        model.set_timestep_sampler(FixedDistributionSampler(probs), type(self).__name__)


class LossSecondMomentSampler(TimestepSampler):
    """Improved DDPM's importance sampler: ``p_t ∝ sqrt(E[L_t^2])`` over the last ``history`` losses of each t,
    mixed with ``uniform_prob`` of uniform; uniform until every t has a full history."""

    importance = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.losses = torch.zeros(num_timesteps, self.history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warm(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probs(self, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = x0.device if x0 is not None else None
        if not self.warm():
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=device)
        weights = self.losses.pow(2).mean(1).sqrt()
        probs = weights / weights.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return probs.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append losses in order; each t keeps its last ``history`` values (a ring per timestep)."""
        for step, loss in zip(t.tolist(), losses.double().tolist()):
            self.losses[step, self.counts[step] % self.history] = loss
            self.counts[step] += 1


class LossSecondMomentSampling(ReprMixin, Algorithm):
    """Importance-samples t by the loss's second moment (Improved DDPM), reweighting by ``1 / (T p_t)``.

    Per-sample unweighted losses are read after each micro-batch's loss, all-gathered across ranks after the
    batch, and appended in rank order, so every rank holds the same history and distribution.

    Args:
        history: losses kept per timestep.
        uniform_prob: probability mass mixed in uniformly.
    """

    def __init__(self, history: int = 10, uniform_prob: float = 0.001):
        if history < 1:
            raise ValueError(f'history must be at least 1, got {history}.')
        if not 0.0 < uniform_prob <= 1.0:
            raise ValueError(f'uniform_prob must be in (0, 1], got {uniform_prob}.')
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.sampler: Optional[LossSecondMomentSampler] = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            model = diffusion_model(state, self)
            self.sampler = LossSecondMomentSampler(model.num_timesteps, self.history, self.uniform_prob)
            model.set_timestep_sampler(self.sampler, type(self).__name__)
        elif event == Event.AFTER_LOSS:
            self._pending.append((state.outputs['t'].detach(), state.outputs['per_sample_loss'].detach()))
        else:
            t = torch.cat([p[0] for p in self._pending])
            losses = torch.cat([p[1] for p in self._pending]).double()
            self._pending = []
            if dist.get_world_size() > 1:
                t = torch.cat(dist.all_gather(t))
                losses = torch.cat(dist.all_gather(losses))
            finite = torch.isfinite(losses)
            self.sampler.update(t[finite].cpu(), losses[finite].cpu())
            logger.log_metrics({'loss_second_moment/warm': float(self.sampler.warm())})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), 'losses': self.sampler.losses.clone(), 'counts': self.sampler.counts.clone()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        self.sampler.losses = state['losses'].clone()
        self.sampler.counts = state['counts'].clone()
