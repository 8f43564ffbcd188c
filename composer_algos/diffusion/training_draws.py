"""The training draws of a DDPM model as a plain object, for a hand-written PyTorch or accelerate loop."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from composer_algos.diffusion.draw import (
    DrawRecord,
    NoiseCoupling,
    NoiseDraw,
    couple_noise,
    draw_levels,
    training_randoms,
)
from composer_algos.diffusion.model import LossWeighting
from composer_algos.diffusion.schedule import NoiseSchedule
from composer_algos.diffusion.timestep_samplers import TimestepSampler, UniformSampler

__all__ = ['TrainingDraws']


@runtime_checkable
class _LossHistory(Protocol):
    """A sampler that learns from losses (the loss-second-moment one): its history, and how to restore it. A fixed
    distribution (``FixedDistributionSampler``, the adaptive sampler's frozen average) has no state of its own."""

    losses: torch.Tensor
    counts: torch.Tensor

    def load(self, losses: torch.Tensor, counts: torch.Tensor) -> None: ...


class TrainingDraws:
    """What :class:`~composer_algos.diffusion.model.DiffusionModel` draws for a training batch, without Composer: the
    timesteps from one sampler, the keyed noise (paired with the data by a noise coupling, if one is given) and the
    loss weight of each sample.

    ``draw(x0)`` gives the batch's :class:`~composer_algos.diffusion.draw.DrawRecord` (``t``, ``noise``,
    ``importance_weight``, the distribution ``probs``, ``noise_pairing``); train the denoiser on ``t`` and ``noise``
    with any scheduler whose ``alphas_cumprod`` are the schedule's, multiply the per-sample loss by
    ``loss_weights(record)``, then hand the unweighted per-sample loss to ``update(record, losses)`` (a sampler that
    learns from losses, such as the loss-second-moment one, reads it there). Draw ``i`` depends only on ``(seed, i,
    the sample's place in the global batch)``: save ``state_dict()`` with the checkpoint and a resumed loop draws the
    same numbers.

    Args:
        noise_schedule: the DDPM schedule the weightings read (SNR) and the sampler covers (T).
        prediction_type: what the denoiser predicts, for the weightings.
        sampler: a :class:`~composer_algos.diffusion.timestep_samplers.TimestepSampler` (default uniform), e.g.
            ``LossSecondMomentSampler`` or ``FixedDistributionSampler``.
        weightings: loss weightings ``w(schedule, t, prediction_type)`` that multiply, e.g. ``min_snr_weight``.
        noise_coupling: pairs each batch's noise with its data (``coupling(NoiseDraw) -> (noise, pairing)``), e.g.
            ``NoiseAssignment()``.
        seed: the key of every draw.

    Example:
        >>> draws = TrainingDraws(NoiseSchedule('linear', 1000))
        >>> record = draws.draw(torch.zeros(4, 1, 8, 8))
        >>> record.t.shape, record.noise.shape, draws.loss_weights(record).tolist()
        (torch.Size([4]), torch.Size([4, 1, 8, 8]), [1.0, 1.0, 1.0, 1.0])
    """

    def __init__(
        self,
        noise_schedule: NoiseSchedule,
        prediction_type: str = 'epsilon',
        sampler: TimestepSampler | None = None,
        weightings: Sequence[LossWeighting] = (),
        noise_coupling: NoiseCoupling | None = None,
        seed: int = 0,
    ):
        self.noise_schedule = noise_schedule
        self.num_timesteps = noise_schedule.num_timesteps
        self.prediction_type = prediction_type
        self.sampler = sampler or UniformSampler(self.num_timesteps)
        if self.sampler.num_timesteps != self.num_timesteps:
            raise ValueError(
                f'sampler has {self.sampler.num_timesteps} timesteps but noise_schedule has '
                f'{self.num_timesteps}; build it with num_timesteps={self.num_timesteps}.'
            )
        self.weightings = list(weightings)
        self.noise_coupling = noise_coupling
        self.seed = int(seed)
        self.num_draws = 0
        # A sampler that corrects towards the weighted objective (loss second moment) reads the weights per timestep.
        self.sampler.set_loss_weights(self._weights(torch.arange(self.num_timesteps)))

    def __repr__(self) -> str:
        return (
            f'TrainingDraws(sampler={self.sampler!r}, weightings={len(self.weightings)}, '
            f'noise_coupling={type(self.noise_coupling).__name__ if self.noise_coupling else None}, '
            f'seed={self.seed})'
        )

    def _weights(self, t: torch.Tensor) -> torch.Tensor:
        weight = torch.ones(t.shape[0], device=t.device)
        for weighting in self.weightings:
            weight = weight * weighting(self.noise_schedule, t, self.prediction_type).to(weight)
        return weight

    def _uniform_log_probs(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.full((self.num_timesteps,), -math.log(self.num_timesteps), device=x0.device)

    def draw(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> DrawRecord:
        """The next draw for the batch ``x0`` (``labels``: class labels, for a coupling within classes)."""
        index = self.num_draws
        u, noise = training_randoms(self.seed, index, x0)
        self.num_draws += 1
        record = draw_levels(self.sampler, [], x0, u, self._uniform_log_probs)
        record.noise = noise
        if self.noise_coupling is not None:
            record.noise, record.noise_pairing = couple_noise(
                self.noise_coupling, NoiseDraw(x0, noise, labels, self.seed, index)
            )
        record.loss_weight = self.loss_weights(record)
        return record

    def loss_weights(self, record: DrawRecord) -> torch.Tensor:
        """``(B,)``: the sampler's importance weight times every weighting at the drawn ``t``."""
        return record.importance_weight * self._weights(record.t)

    def update(self, record: DrawRecord, per_sample_loss: torch.Tensor) -> None:
        """Show a sampler that learns from losses the batch's unweighted per-sample losses (gather them over ranks
        first in a distributed loop, as the Composer algorithm does)."""
        record.per_sample_loss = per_sample_loss
        update = getattr(self.sampler, 'update', None)
        if update is not None:
            update(record.t.detach(), per_sample_loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """The draw index and a loss-history sampler's history (tensors and numbers only)."""
        state: dict[str, Any] = {'num_draws': self.num_draws}
        if isinstance(self.sampler, _LossHistory):
            state['sampler'] = {'losses': self.sampler.losses.clone(), 'counts': self.sampler.counts.clone()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_draws = int(state['num_draws'])
        if 'sampler' in state:
            if not isinstance(self.sampler, _LossHistory):
                raise ValueError(
                    f'This state holds a loss history, but the sampler {type(self.sampler).__name__} keeps none: load '
                    'it into TrainingDraws with the sampler that saved it (e.g. LossSecondMomentSampler).'
                )
            self.sampler.load(state['sampler']['losses'], state['sampler']['counts'])
