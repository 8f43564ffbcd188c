"""The training draws of a diffusion model (DDPM or flow matching) as a plain object, for a hand-written PyTorch or
accelerate loop."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from composer_algos.diffusion.draw import (
    DrawRecord,
    NoiseCoupling,
    NoiseDraw,
    couple_noise,
    draw_levels,
    objective_grid_points,
    objective_log_probs,
    objective_sampler,
    objective_sigma_grid,
    training_randoms,
)
from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.model import LossWeighting, loss_weight_product
from composer_algos.diffusion.schedule import NoiseSchedule, check_prediction_type
from composer_algos.diffusion.timestep_samplers import TimestepSampler

__all__ = ['TrainingDraws']


@runtime_checkable
class _LossHistory(Protocol):
    """A sampler that learns from losses (the loss-second-moment one): its history, and how to restore it. A fixed
    distribution (``FixedDistributionSampler``, the adaptive sampler's frozen average) has no state of its own."""

    losses: torch.Tensor
    counts: torch.Tensor

    def load(self, losses: torch.Tensor, counts: torch.Tensor) -> None: ...


class TrainingDraws:
    """What :class:`~composer_algos.diffusion.model.DiffusionModel` or
    :class:`~composer_algos.diffusion.flow_model.FlowMatchingModel` draws for a training batch, without Composer: the
    noise levels from one sampler, the keyed noise (paired with the data by a noise coupling, if one is given) and the
    loss weight of each sample.

    ``draw(x0)`` gives the batch's :class:`~composer_algos.diffusion.draw.DrawRecord` (``t``, ``noise``,
    ``importance_weight``, the distribution ``probs``, ``noise_pairing``; with a flow schedule also the continuous
    ``sigma``, of which ``t`` is the grid cell). Train the denoiser at ``record.level``: DDPM at the timesteps ``t``,
    with any scheduler whose ``alphas_cumprod`` are the schedule's; flow matching at ``sigma``, on
    ``noise_schedule.add_noise(x0, noise, sigma)`` with the velocity target ``noise_schedule.target(x0, noise)``, the
    denoiser seeing ``noise_schedule.timesteps(sigma)``. Multiply the per-sample loss by ``loss_weights(record)``, then
    hand the unweighted per-sample loss to ``update(record, losses)`` (a sampler that learns from losses, such as the
    loss-second-moment one, reads it there). Draw ``i`` depends only on ``(seed, i, the sample's place in the global
    batch)``: save ``state_dict()`` with the checkpoint and a resumed loop draws the same numbers.

    The defaults are the model's, from the schedule: the sampler is the objective's own distribution (DDPM: uniform
    over the T timesteps; flow: the time uniform, shifted), which an importance sampler's weights also correct
    towards; weightings take the noise level (DDPM: ``t``; flow: ``sigma``) and are tabulated for a sampler at the
    model's grid points (the timesteps; the cells' centre sigmas).

    Args:
        noise_schedule: a DDPM :class:`~composer_algos.diffusion.schedule.NoiseSchedule` (the weightings read its SNR,
            the sampler covers its T timesteps) or a :class:`~composer_algos.diffusion.flow.FlowSchedule` (the sampler
            covers its T cells of sigma, with its shift).
        prediction_type: what the denoiser predicts, for the weightings: one of the schedule's ``prediction_types``
            (DDPM: ``'epsilon'``, the default, ``'v_prediction'`` or ``'sample'``; flow: ``'velocity'``).
        sampler: a :class:`~composer_algos.diffusion.timestep_samplers.TimestepSampler` over the schedule's T (default:
            the objective's own), e.g. ``LossSecondMomentSampler``, ``FixedDistributionSampler`` or, for flow, a
            ``ContinuousTimestepSampler`` of a density (``LogitNormalDensity``) and the same schedule.
        weightings: loss weightings ``w(schedule, level, prediction_type)`` that multiply, e.g. ``min_snr_weight``
            (DDPM) or ``sigma_sqrt_weight`` (flow).
        noise_coupling: pairs each batch's noise with its data (``coupling(NoiseDraw) -> (noise, pairing)``), e.g.
            ``NoiseAssignment()``.
        seed: the key of every draw.

    Example:
        >>> draws = TrainingDraws(NoiseSchedule('linear', 1000))
        >>> record = draws.draw(torch.zeros(4, 1, 8, 8))
        >>> record.t.shape, record.noise.shape, draws.loss_weights(record).tolist()
        (torch.Size([4]), torch.Size([4, 1, 8, 8]), [1.0, 1.0, 1.0, 1.0])
        >>> flow = TrainingDraws(FlowSchedule(shift=3.0))
        >>> record = flow.draw(torch.zeros(4, 1, 8, 8))
        >>> flow.prediction_type, record.sigma.dtype, bool((record.t == flow.noise_schedule.cells(record.sigma)).all())
        ('velocity', torch.float64, True)
    """

    def __init__(
        self,
        noise_schedule: NoiseSchedule | FlowSchedule,
        prediction_type: str | None = None,
        sampler: TimestepSampler | None = None,
        weightings: Sequence[LossWeighting] = (),
        noise_coupling: NoiseCoupling | None = None,
        seed: int = 0,
    ):
        if not isinstance(noise_schedule, (NoiseSchedule, FlowSchedule)):
            raise TypeError(
                f'noise_schedule must be a NoiseSchedule (DDPM) or a FlowSchedule (flow matching), got '
                f'{type(noise_schedule).__name__}.'
            )
        self.noise_schedule = noise_schedule
        self.num_timesteps = noise_schedule.num_timesteps
        # The objective's default target is the first it trains: epsilon (DDPM), velocity (flow matching).
        self.prediction_type = noise_schedule.prediction_types[0] if prediction_type is None else prediction_type
        check_prediction_type(self.prediction_type, noise_schedule.prediction_types)
        self.sampler = sampler or objective_sampler(noise_schedule)
        if self.sampler.num_timesteps != self.num_timesteps:
            raise ValueError(
                f'sampler has {self.sampler.num_timesteps} timesteps but noise_schedule has '
                f'{self.num_timesteps}; build it with num_timesteps={self.num_timesteps}.'
            )
        self.weightings = list(weightings)
        self.noise_coupling = noise_coupling
        self.seed = int(seed)
        self.num_draws = 0
        # Flow matching draws continuous sigma inside the cells of this grid; DDPM (None) draws the timesteps.
        self._grid = objective_sigma_grid(noise_schedule)
        self._target_log_probs = functools.partial(objective_log_probs, noise_schedule)
        # A sampler that corrects towards the weighted objective (loss second moment) reads the weights per cell, at
        # the noise level each cell stands for.
        self.sampler.set_loss_weights(self._weights(objective_grid_points(noise_schedule)))

    def __repr__(self) -> str:
        return (
            f'TrainingDraws({self.noise_schedule!r}, prediction_type={self.prediction_type!r}, '
            f'sampler={self.sampler!r}, weightings={len(self.weightings)}, '
            f'noise_coupling={type(self.noise_coupling).__name__ if self.noise_coupling else None}, '
            f'seed={self.seed})'
        )

    def _weights(self, level: torch.Tensor) -> torch.Tensor:
        return loss_weight_product(self.weightings, self.noise_schedule, level, self.prediction_type)

    def draw(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> DrawRecord:
        """The next draw for the batch ``x0`` (``labels``: class labels, for a coupling within classes)."""
        index = self.num_draws
        u, noise = training_randoms(self.seed, index, x0)
        self.num_draws += 1
        record = draw_levels(self.sampler, [], x0, u, self._target_log_probs, self._grid)
        record.noise = noise
        if self.noise_coupling is not None:
            record.noise, record.noise_pairing = couple_noise(
                self.noise_coupling, NoiseDraw(x0, noise, labels, self.seed, index)
            )
        record.loss_weight = self.loss_weights(record)
        return record

    def loss_weights(self, record: DrawRecord) -> torch.Tensor:
        """``(B,)``: the sampler's importance weight times every weighting at the drawn noise level ``record.level``
        (``t``; flow matching: ``sigma``)."""
        return record.importance_weight * self._weights(record.level)

    def update(self, record: DrawRecord, per_sample_loss: torch.Tensor) -> None:
        """Show a sampler that learns from losses the batch's unweighted per-sample losses, at the drawn cells ``t``
        (gather them over ranks first in a distributed loop, as the Composer algorithm does)."""
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
