"""FlowMatchingModel: the diffusion contract for rectified flow (flow matching) with continuous noise levels."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch import nn

from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.model import DiffusionModel

__all__ = ['FlowMatchingModel', 'SOLVERS']

log = logging.getLogger(__name__)

SOLVERS = ('euler', 'heun')


class FlowMatchingModel(DiffusionModel):
    """Trains ``denoiser(x_sigma, sigma * N)`` to predict the velocity ``eps - x0`` (rectified flow, SD3's convention).

    The same contract as :class:`DiffusionModel`, with the noise level sigma in [0, 1] in place of the timestep
    (see :mod:`composer_algos.diffusion.flow` for the schedule and the shift):

    * ``noise_schedule`` is a :class:`FlowSchedule`; its T cells of sigma are the grid every sampler, prior and
      per-timestep table works on, and ``prediction_type`` is ``'velocity'``;
    * the default sampler draws the time ``u`` uniformly and shifts it, ``sigma = shift(u)``; it, the importance
      target (its distribution) and the grid points (the cells' centres) follow from the schedule
      (:func:`~composer_algos.diffusion.draw.objective_sampler` and its neighbours, which
      :class:`~composer_algos.diffusion.training_draws.TrainingDraws` reads too);
    * a draw: untilted, a closed-form sampler (:class:`ContinuousTimestepSampler`) gives sigma exactly by its inverse
      CDF at the keyed uniform; otherwise (curriculum priors, the adaptive policy, loss-aware samplers) the cell comes
      by inverse CDF of the tilted cell masses and the position inside it from the same uniform
      (:func:`~composer_algos.diffusion.timestep_samplers.sample_within_cells`), exact for the piecewise-constant
      density (:func:`~composer_algos.diffusion.draw.draw_levels`);
    * the forward's draw record holds ``sigma`` and its cell ``t``; loss weightings are functions of sigma;
    * :meth:`training_losses` at given cells (their centre sigmas); there is no variational bound;
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
    prediction_types = FlowSchedule.prediction_types
    # A FlowSchedule where the base class has a NoiseSchedule (also as the constructor's argument): the members that
    # read a DDPM schedule (vlb_terms, prior_term, prediction_target, _sample) are all overridden here; the draws'
    # defaults (sampler, grid, importance target) take either schedule.
    noise_schedule: FlowSchedule  # type: ignore[assignment]

    def __init__(
        self,
        denoiser: nn.Module,
        noise_schedule: FlowSchedule | None = None,
        prediction_type: str = 'velocity',
        *,
        solver: str = 'euler',
        **kwargs: Any,
    ):
        if noise_schedule is not None and not isinstance(noise_schedule, FlowSchedule):
            raise TypeError(f'A flow-matching model takes a FlowSchedule, got {type(noise_schedule).__name__}.')
        if solver not in SOLVERS:
            raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
        schedule = noise_schedule or FlowSchedule()
        super().__init__(denoiser, schedule, prediction_type, **kwargs)  # type: ignore[arg-type]
        self.solver = solver

    # ----------------------------------------------------------------------------------------- objective
    def denoiser_timesteps(self, level: torch.Tensor) -> torch.Tensor:
        """The denoiser sees ``sigma * num_train_timesteps``."""
        return self.noise_schedule.timesteps(level)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The velocity ``eps - x0``."""
        return self.noise_schedule.target(x0, noise)

    def vlb_terms(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ValueError(
            'A flow-matching model has no discrete variational bound: bits/dim and VLB rewards are '
            "DDPM's (objective: ddpm). Remove the bits_per_dim callback; the adaptive sampler rewards "
            'the flow-matching loss reduction on its own.'
        )

    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        return self.vlb_terms()

    # ----------------------------------------------------------------------------------------- generation
    def _sample(
        self,
        x: torch.Tensor,
        cond: dict,
        num_steps: int,
        eta: float,
        clip: bool,
        gen: torch.Generator,
        solver: str | None,
    ) -> torch.Tensor:
        """Integrate ``dx / dsigma = v(x, sigma)`` from noise at sigma = 1 to sigma = 0 in ``num_steps`` steps.

        The levels are :meth:`FlowSchedule.inference_sigmas` (diffusers' grid for the same shift). ``solver``
        (default: the model's): ``'euler'``, ``x <- x + (sigma' - sigma) v``, one denoiser call a step, or
        ``'heun'``, the trapezoid of the velocities at both ends (Euler on the last step, which ends at sigma = 0):
        ``2 num_steps - 1`` calls. The ODE is deterministic: ``eta`` must be 0. ``clip`` clamps the predicted
        ``x0 = x - sigma v`` to [-1, 1] at each call, as the DDPM sampler does.
        """
        if eta != 0:
            raise ValueError(f'A flow-matching model samples with a deterministic ODE; eta must be 0, got {eta}.')
        solver = solver or self.solver
        if solver not in SOLVERS:
            raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
        schedule = self.noise_schedule
        x = x.float()
        sigmas = schedule.inference_sigmas(num_steps, tuple(x.shape)).tolist()

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            level = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
            v = self.denoise(x, schedule.timesteps(level), cond).float()
            if clip:
                x0 = (x - sigma * v).clamp(-1, 1)
                v = (x - x0) / sigma
            return v

        for sigma, following in itertools.pairwise(sigmas):
            v = velocity(x, sigma)
            step = x + (following - sigma) * v
            if solver == 'heun' and following > 0:
                step = x + (following - sigma) * 0.5 * (v + velocity(step, following))
            x = step
        return x
