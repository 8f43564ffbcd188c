"""FlowMatchingModel: the diffusion contract for rectified flow (flow matching) with continuous noise levels."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from composer_algos.diffusion.densities import UniformDensity
from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.model import _EVAL_STREAM, DiffusionModel, TimestepDraw
from composer_algos.diffusion.samplers import (ContinuousTimestepSampler, TimestepSampler, combined_prior,
                                               sample_within_cells, tilt_log_probs)
from composer_algos.diffusion.utils import reshard_fsdp2
from composer_algos.seeding import keyed_generator

__all__ = ['FlowMatchingModel', 'SOLVERS']

log = logging.getLogger(__name__)

SOLVERS = ('euler', 'heun')
# A drawn position stays this far inside its cell, so that float64 rounding of (cell + position) / T never moves it to
# a neighbouring cell (which may have no probability).
_INSIDE = 1e-9


class FlowMatchingModel(DiffusionModel):
    """Trains ``denoiser(x_sigma, sigma * N)`` to predict the velocity ``eps - x0`` (rectified flow, SD3's convention).

    The same contract as :class:`DiffusionModel`, with the noise level sigma in [0, 1] in place of the timestep
    (see :mod:`composer_algos.diffusion.flow` for the schedule and the shift):

    * ``noise_schedule`` is a :class:`FlowSchedule`; its T cells of sigma are the grid every sampler, prior and
      per-timestep table works on, and ``prediction_type`` is ``'velocity'``;
    * the default sampler draws the time ``u`` uniformly and shifts it, ``sigma = shift(u)``;
    * a draw: untilted, a closed-form sampler (:class:`ContinuousTimestepSampler`) gives sigma exactly by its inverse
      CDF at the keyed uniform; otherwise (curriculum priors, the adaptive policy, loss-aware samplers) the cell comes
      by inverse CDF of the tilted cell masses and the position inside it from the same uniform
      (:func:`~composer_algos.diffusion.samplers.sample_within_cells`), exact for the piecewise-constant density;
    * forward outputs: ``t`` (the cell of each sigma), ``sigma``, the unweighted ``per_sample_loss``, ``weight`` and
      the ``draw``; loss weightings are functions of sigma;
    * :meth:`training_losses` at given cells (their centre sigmas) or sigmas; there is no variational bound;
    * :meth:`generate`: Euler or Heun steps of the ODE ``dx / dsigma = v`` over the shifted grid from 1 to 0.

    Args:
        denoiser: as for :class:`DiffusionModel`; called with the float timestep ``sigma * num_train_timesteps``.
        noise_schedule: the :class:`FlowSchedule` (default: no shift, 1000 cells).
        prediction_type: ``'velocity'`` (the only target here).
        solver: ``'euler'`` or ``'heun'``: the ODE solver of :meth:`generate`.
        kwargs: :class:`DiffusionModel`'s other arguments (``image_key``, ``label_key``, ``encoder``, ``seed`` ...),
            by keyword.
    """

    objective = 'flow_matching'
    prediction_types = ('velocity',)

    def __init__(self, denoiser: nn.Module, noise_schedule: Optional[FlowSchedule] = None,
                 prediction_type: str = 'velocity', *, solver: str = 'euler', **kwargs: Any):
        if noise_schedule is not None and not isinstance(noise_schedule, FlowSchedule):
            raise TypeError(f'A flow-matching model takes a FlowSchedule, got {type(noise_schedule).__name__}.')
        if solver not in SOLVERS:
            raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
        super().__init__(denoiser, noise_schedule or FlowSchedule(), prediction_type, **kwargs)
        self.solver = solver

    # ----------------------------------------------------------------------------------------- contract
    def default_timestep_sampler(self) -> TimestepSampler:
        """Uniform time, shifted: the rectified-flow objective's own distribution of sigma."""
        return ContinuousTimestepSampler(UniformDensity(), self.noise_schedule)

    def grid_points(self) -> torch.Tensor:
        """The sigma each cell stands for (its centre): what loss weightings are tabulated at for samplers."""
        return self.noise_schedule.cell_centres()

    def draw_timesteps(self, x0: torch.Tensor, u: Optional[torch.Tensor] = None) -> TimestepDraw:
        """Draw sigma (and its cell ``t``) for a batch from the uniforms ``u`` (default: the next draw's)."""
        if u is None:
            u, _ = self.draw_randoms(x0)
        schedule = self.noise_schedule
        with torch.no_grad():
            sampler_probs = self._sampler.probs(x0)
            prior = combined_prior(self.timestep_priors(x0.device), sampler_probs)
            probs = tilt_log_probs(torch.log(sampler_probs), prior).exp()
            if prior is None and isinstance(self._sampler, ContinuousTimestepSampler):
                sigma = self._sampler.inverse_cdf(u.to(x0.device), x0)
                t = schedule.cells(sigma)
            else:
                t, position = sample_within_cells(probs, u)
                sigma = (t.double() + position.clamp(_INSIDE, 1 - _INSIDE)) / schedule.num_timesteps
            t, sigma = t.to(x0.device), sigma.to(x0.device)
            weight = torch.ones(x0.shape[0], device=x0.device)
            if self._sampler.importance:
                # Towards the prior-tilted objective's own distribution (shifted uniform time): q(t) / p(t).
                base = self.default_timestep_sampler().probs(x0)
                target = tilt_log_probs(torch.log(base), prior).exp()
                p_t = probs[t] if probs.dim() == 1 else probs.gather(1, t[:, None]).squeeze(1)
                weight = (target[t] / p_t.to(target.dtype)).float()
        return TimestepDraw(t=t, probs=probs, prior=prior, weight=weight, sigma=sigma)

    # ----------------------------------------------------------------------------------------- objective
    def _loss_terms(self, x0, sigma, noise, conditioning, weight) -> dict[str, torch.Tensor]:
        schedule = self.noise_schedule
        x_t = schedule.add_noise(x0, noise, sigma)
        prediction = self.denoise(x_t, schedule.timesteps(sigma), conditioning)
        target = schedule.target(x0, noise)
        per_sample_loss = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        return {'t': schedule.cells(sigma), 'sigma': sigma, 'per_sample_loss': per_sample_loss, 'weight': weight}

    def eval_forward(self, batch: Any, outputs: Optional[Any] = None) -> dict[str, torch.Tensor]:
        if outputs is not None:
            return outputs
        x0 = self.images(batch)
        # As the DDPM model: numbers seeded by the batch's content, so every evaluation of it draws the same ones;
        # sigma from the objective's own distribution.
        gen = keyed_generator(self.seed, _EVAL_STREAM, int(x0.detach().float().abs().sum().item() * 1000))
        u = torch.rand((x0.shape[0],), generator=gen, dtype=torch.float64)
        noise = torch.randn(tuple(x0.shape), generator=gen).to(x0.device, x0.dtype)
        sigma = self.default_timestep_sampler().inverse_cdf(u.to(x0.device), x0)
        with torch.no_grad():
            outputs = self._loss_terms(x0, sigma, noise, self.conditioning(batch), torch.ones_like(sigma).float())
        reshard_fsdp2(self)
        return outputs

    @torch.no_grad()
    def training_losses(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                        conditioning: Optional[dict] = None, denoiser: Optional[nn.Module] = None,
                        sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample unweighted flow-matching losses at the centres of cells ``t`` (or at ``sigma``), no grad."""
        schedule = self.noise_schedule
        if sigma is None:
            sigma = schedule.cell_centres().to(t.device)[t]
        x_t = schedule.add_noise(x0, noise, sigma)
        output = self.denoise(x_t, schedule.timesteps(sigma), conditioning, denoiser).float()
        reshard_fsdp2(self)
        return (output - schedule.target(x0.float(), noise.float())).pow(2).flatten(1).mean(1)

    def vlb_terms(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ValueError('A flow-matching model has no discrete variational bound: bits/dim and VLB rewards are '
                         "DDPM's (objective: ddpm). Remove the bits_per_dim callback; the adaptive sampler rewards "
                         'the flow-matching loss reduction on its own.')

    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        return self.vlb_terms()

    # ----------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        num_samples: int,
        shape: Sequence[int],
        num_steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        labels: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        clip: Optional[bool] = None,
        noise: Optional[torch.Tensor] = None,
        solver: Optional[str] = None,
    ) -> torch.Tensor:
        """Integrate ``dx / dsigma = v(x, sigma)`` from noise at sigma = 1 to sigma = 0 in ``num_steps`` steps.

        The levels are :meth:`FlowSchedule.inference_sigmas` (diffusers' grid for the same shift). ``solver``
        (default: the model's): ``'euler'``, ``x <- x + (sigma' - sigma) v``, one denoiser call a step, or
        ``'heun'``, the trapezoid of the velocities at both ends (Euler on the last step, which ends at sigma = 0):
        ``2 num_steps - 1`` calls. The ODE is deterministic: ``eta`` must be 0. ``clip`` (default: pixel models)
        clamps the predicted ``x0 = x - sigma v`` to [-1, 1] at each call, as the DDPM sampler does.
        """
        if eta != 0:
            raise ValueError(f'A flow-matching model samples with a deterministic ODE; eta must be 0, got {eta}.')
        solver = solver or self.solver
        if solver not in SOLVERS:
            raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
        device = device or next(self.denoiser.parameters()).device
        schedule = self.noise_schedule
        if noise is None:
            noise = torch.randn((num_samples, *shape), generator=torch.Generator().manual_seed(seed))
        x = noise.to(device).float()
        clip = self.encoder is None if clip is None else clip
        cond = {} if labels is None else {self.conditioning_kwarg: labels.to(device)}
        sigmas = schedule.inference_sigmas(num_steps, (num_samples, *shape)).tolist()

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            level = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=device)
            v = self.denoise(x, schedule.timesteps(level), cond).float()
            if clip:
                x0 = (x - sigma * v).clamp(-1, 1)
                v = (x - x0) / sigma
            return v

        for sigma, following in zip(sigmas[:-1], sigmas[1:]):
            v = velocity(x, sigma)
            step = x + (following - sigma) * v
            if solver == 'heun' and following > 0:
                step = x + (following - sigma) * 0.5 * (v + velocity(step, following))
            x = step
        reshard_fsdp2(self)
        return x
