"""Drawing a batch's noise levels and noise, for DDPM's discrete timesteps and flow matching's continuous sigma.

Training draws are keyed (:mod:`composer_algos.seeding`): sample ``i`` of this rank's batch gets the uniform and noise
of ``(seed, draw index, its position in the global batch)``. The timestep sampler's distribution over the T grid
cells, tilted by the curriculum priors, is drawn by inverse CDF at that uniform: a discrete timestep, or (flow
matching) a cell and the position inside it, which is the exact inverse CDF of the piecewise-constant density; an
untilted closed-form density is drawn exactly instead. Samplers that declare ``importance`` get the weights
``q(t) / p(t)`` towards the objective's own distribution tilted by the same priors. Evaluation draws come from a
generator seeded by the batch's content, so every evaluation of a batch draws the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.timestep_samplers import (ContinuousTimestepSampler, TimestepSampler, combined_prior,
                                               sample_from_probs, sample_within_cells, tilt_log_probs)
from composer_algos.distributed import global_positions
from composer_algos.seeding import keyed_generator, keyed_uniform_and_normal

__all__ = ['DROPOUT_STREAM', 'DrawRecord', 'EVAL_STREAM', 'TRAIN_STREAM', 'draw_levels', 'evaluation_draw',
           'tilted_distribution', 'training_randoms']

# Keys of the model's random streams (see composer_algos.seeding).
TRAIN_STREAM, DROPOUT_STREAM, EVAL_STREAM = 0, 1, 2
# Which samples train on the empty caption (composer_algos.diffusion.conditioning.caption_drop_mask): a key no other
# stream uses.
CAPTION_STREAM = 5
# A drawn position stays this far inside its cell, so that float64 rounding of (cell + position) / T never moves it to
# a neighbouring cell (which may have no probability).
_INSIDE = 1e-9


@dataclasses.dataclass
class DrawRecord:
    """What a model drew for a batch and the loss there: the one record its forward publishes (key ``'draw'``).

    :func:`draw_levels` fills the draw; the forward adds the noise, the conditioning and the losses.

    Attributes:
        t: ``(B,)`` the timesteps (flow matching: the grid cells of ``sigma``).
        probs: ``(T,)`` or ``(B, T)``: the distribution they were drawn from (the sampler's, tilted by ``prior``).
        prior: ``(T,)`` the product of the curriculum priors applied, or ``None``.
        importance_weight: ``(B,)`` the importance weight of each draw (1 unless the sampler corrects for itself).
        sigma: ``(B,)`` the continuous noise levels of a flow-matching model; ``None`` for discrete timesteps.
        noise: the noise each sample was noised with.
        conditioning: the denoiser's keyword arguments from the batch.
        per_sample_loss: ``(B,)`` the unweighted loss of each sample (the MSE to the prediction target).
        loss_weight: ``(B,)`` the total weight of each sample's loss: ``importance_weight`` times the weightings.
    """

    t: torch.Tensor
    probs: torch.Tensor
    prior: Optional[torch.Tensor]
    importance_weight: torch.Tensor
    sigma: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    conditioning: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    per_sample_loss: Optional[torch.Tensor] = None
    loss_weight: Optional[torch.Tensor] = None

    @property
    def level(self) -> torch.Tensor:
        """What the objective and the loss weightings take: ``sigma`` for flow matching, else ``t``."""
        return self.t if self.sigma is None else self.sigma


def training_randoms(seed: int, index: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training draw ``index``'s ``(u, noise)`` for this rank's batch ``x0``: a float64 uniform and the noise.

    Sample ``i`` of this rank's batch is sample ``i * world_size + rank`` of the global batch (StreamingDataset deals
    a global batch to the ranks in turn); its numbers depend only on ``(seed, index, that position)``.
    """
    keys = [(TRAIN_STREAM, index, position) for position in global_positions(x0.shape[0])]
    u, noise = keyed_uniform_and_normal(seed, keys, x0.shape[1:])
    return u.to(x0.device, non_blocking=True), noise.to(x0.device, x0.dtype, non_blocking=True)


def tilted_distribution(sampler_probs: torch.Tensor,
                        priors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(probs, prior)``: the sampler's ``(T,)`` or ``(B, T)`` distribution tilted by the product of ``priors``
    (``None`` without priors), renormalised."""
    prior = combined_prior(priors, sampler_probs)
    return tilt_log_probs(torch.log(sampler_probs), prior).exp(), prior


@torch.no_grad()
def draw_levels(sampler: TimestepSampler, priors: Sequence[torch.Tensor], x0: torch.Tensor, u: torch.Tensor,
                target_log_probs: Callable[[torch.Tensor], torch.Tensor],
                grid: Optional[FlowSchedule] = None) -> DrawRecord:
    """Draw each sample's noise level from ``sampler`` tilted by ``priors``, by inverse CDF at the uniforms ``u``.

    Args:
        sampler: the model's timestep sampler.
        priors: ``(T,)`` curriculum priors.
        x0: the batch (per-sample samplers read it; the draws land on its device).
        u: ``(B,)`` uniforms.
        target_log_probs: ``x0 -> (T,)`` log-probabilities of the objective's own distribution, which importance
            weights correct towards (tilted by the same priors); called only for samplers with ``importance``.
        grid: ``None`` draws discrete timesteps; a flow model's schedule draws continuous sigma within its cells.
    """
    probs, prior = tilted_distribution(sampler.probs(x0), priors)
    sigma = None
    if grid is None:
        t = sample_from_probs(probs, u).to(x0.device)
    elif prior is None and isinstance(sampler, ContinuousTimestepSampler):
        sigma = sampler.inverse_cdf(u.to(x0.device), x0)
        t = grid.cells(sigma)
    else:
        t, position = sample_within_cells(probs, u)
        sigma = (t.double() + position.clamp(_INSIDE, 1 - _INSIDE)) / grid.num_timesteps
        t, sigma = t.to(x0.device), sigma.to(x0.device)
    weight = torch.ones(x0.shape[0], device=x0.device)
    if sampler.importance:
        target = tilt_log_probs(target_log_probs(x0), prior).exp()
        p_t = probs[t] if probs.dim() == 1 else probs.gather(1, t[:, None]).squeeze(1)
        weight = (target[t] / p_t.to(target.dtype)).float()
    return DrawRecord(t=t, probs=probs, prior=prior, importance_weight=weight, sigma=sigma)


def evaluation_draw(seed: int, x0: torch.Tensor, sampler: TimestepSampler,
                    grid: Optional[FlowSchedule] = None) -> DrawRecord:
    """An evaluation batch's draw from the objective's own ``sampler``, seeded by the batch's content.

    It never touches the training draws: the same validation batch gets the same levels and noise at every
    evaluation, so a resumed run evaluates exactly as the uninterrupted one. Discrete timesteps (``grid`` is
    ``None``) are uniform integers; continuous sigma is the closed-form ``sampler``'s inverse CDF at a uniform.
    """
    gen = keyed_generator(seed, EVAL_STREAM, int(x0.detach().float().abs().sum().item() * 1000))
    batch_size = x0.shape[0]
    # The generator gives the time first, then the noise.
    if grid is None:
        t = torch.randint(0, sampler.num_timesteps, (batch_size,), generator=gen).to(x0.device)
    else:
        u = torch.rand((batch_size,), generator=gen, dtype=torch.float64)
    noise = torch.randn(tuple(x0.shape), generator=gen).to(x0.device, x0.dtype)
    sigma = None
    if grid is not None:
        sigma = sampler.inverse_cdf(u.to(x0.device), x0)
        t = grid.cells(sigma)
    weight = torch.ones(batch_size, device=x0.device)
    return DrawRecord(t=t, probs=sampler.probs(x0), prior=None, importance_weight=weight, sigma=sigma, noise=noise)
