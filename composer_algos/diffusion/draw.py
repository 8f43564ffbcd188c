"""Drawing a batch's noise levels and noise, for DDPM's discrete timesteps and flow matching's continuous sigma.

Training draws are keyed (:mod:`composer_algos.seeding`): sample ``i`` of this rank's batch gets the uniform and noise
of ``(seed, draw index, its position in the global batch)``. The timestep sampler's distribution over the T grid
cells, tilted by the curriculum priors, is drawn by inverse CDF at that uniform: a discrete timestep, or (flow
matching) a cell and the position inside it, which is the exact inverse CDF of the piecewise-constant density; an
untilted closed-form density is drawn exactly instead. Samplers that declare ``importance`` get the weights
``q(t) / p(t)`` towards the objective's own distribution tilted by the same priors. Evaluation draws come from a
generator seeded by the batch's content, so every evaluation of a batch draws the same numbers.

Two options of a training draw, both off by default (and then nothing above changes):

* **Low discrepancy** (Kingma et al., "Variational Diffusion Models", NeurIPS 2021, arXiv 2107.00630, appendix: the
  low-discrepancy sampler): the uniforms of a global batch of B samples are ``u_i = (u0 + i / B) mod 1`` over the
  sample's position ``i``, with one offset ``u0`` keyed by ``(seed, draw index)``: each of the B equal bins of
  [0, 1) holds exactly one u, and each u alone is still uniform, so every sampler's inverse CDF keeps its marginal
  and only the batch's spread over it changes (:func:`low_discrepancy_uniforms`). The sample's noise is the one it
  draws without the option. Deviation: VDM draws the continuous time from these u; here they enter the active
  sampler's inverse CDF (on the grid of T, or in closed form), so the method composes with every sampler.
* **A noise coupling** (an algorithm's, :class:`NoiseDraw`): it may pair the batch's keyed noise with its data
  differently (a permutation, or a choice among more keyed candidates); what it did is the record's
  :class:`NoisePairing`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from composer_algos.diffusion.densities import UniformDensity
from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.schedule import NoiseSchedule
from composer_algos.diffusion.timestep_samplers import (
    ContinuousTimestepSampler,
    TimestepSampler,
    UniformSampler,
    combined_prior,
    sample_from_probs,
    sample_within_cells,
    tilt_log_probs,
)
from composer_algos.distributed import global_positions, rank_world
from composer_algos.seeding import keyed_generator, keyed_uniform_and_normal

__all__ = [
    'CANDIDATE_STREAM',
    'CAPTION_STREAM',
    'DROPOUT_STREAM',
    'DrawRecord',
    'EVAL_STREAM',
    'NoiseCoupling',
    'NoiseDraw',
    'NoisePairing',
    'OFFSET_STREAM',
    'TRAIN_STREAM',
    'couple_noise',
    'draw_levels',
    'evaluation_draw',
    'low_discrepancy_uniforms',
    'objective_grid_points',
    'objective_log_probs',
    'objective_sampler',
    'objective_sigma_grid',
    'tilted_distribution',
    'training_randoms',
]

# Keys of the model's random streams (see composer_algos.seeding): a sample's uniform and noise, the denoiser's own
# randomness, evaluation draws, the low-discrepancy offset of a draw, a noise coupling's candidate noises, and which
# samples train on the unconditional input (composer_algos.diffusion.conditioning.caption_drop_mask).
TRAIN_STREAM, DROPOUT_STREAM, EVAL_STREAM, OFFSET_STREAM, CANDIDATE_STREAM, CAPTION_STREAM = 0, 1, 2, 3, 4, 5
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
        noise_pairing: how a noise coupling paired the noise with the data (:class:`NoisePairing`), ``None``
            when the noise is the one each sample drew.
    """

    t: torch.Tensor
    probs: torch.Tensor
    prior: torch.Tensor | None
    importance_weight: torch.Tensor
    sigma: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    conditioning: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    per_sample_loss: torch.Tensor | None = None
    loss_weight: torch.Tensor | None = None
    noise_pairing: NoisePairing | None = None

    @property
    def level(self) -> torch.Tensor:
        """What the objective and the loss weightings take: ``sigma`` for flow matching, else ``t``."""
        return self.t if self.sigma is None else self.sigma


def training_randoms(
    seed: int, index: int, x0: torch.Tensor, low_discrepancy: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training draw ``index``'s ``(u, noise)`` for this rank's batch ``x0``: a float64 uniform and the noise.

    Sample ``i`` of this rank's batch is sample ``i * world_size + rank`` of the global batch (StreamingDataset deals
    a global batch to the ranks in turn); its numbers depend only on ``(seed, index, that position)``. With
    ``low_discrepancy`` the uniforms are :func:`low_discrepancy_uniforms` over the global batch of
    ``len(x0) * world_size`` samples; the noise stays the same.
    """
    positions = global_positions(x0.shape[0])
    u, noise = keyed_uniform_and_normal(seed, [(TRAIN_STREAM, index, position) for position in positions], x0.shape[1:])
    if low_discrepancy:
        u = low_discrepancy_uniforms(seed, index, positions, x0.shape[0] * rank_world()[1])
    return u.to(x0.device, non_blocking=True), noise.to(x0.device, x0.dtype, non_blocking=True)


def low_discrepancy_uniforms(seed: int, index: int, positions: Sequence[int], global_batch_size: int) -> torch.Tensor:
    """VDM's low-discrepancy uniforms ``(u0 + i / B) mod 1`` (float64) at the global ``positions`` ``i`` of draw
    ``index``, ``u0`` keyed by ``(seed, index)``.

    Computed as bin ``(floor(u0 B) + i) mod B`` plus the offset's place ``u0 B - floor(u0 B)`` inside its bin, so the
    B positions fill the B bins exactly once whatever the rounding; the same numbers on any number of ranks.

    Example:
        >>> u = low_discrepancy_uniforms(17, 0, range(8), 8)
        >>> sorted((u * 8).floor().long().tolist())
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if global_batch_size < 1:
        raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
    offset = float(torch.rand((), generator=keyed_generator(seed, OFFSET_STREAM, index), dtype=torch.float64))
    scaled = offset * global_batch_size
    first = math.floor(scaled)
    within = scaled - first
    bins = (torch.as_tensor(list(positions), dtype=torch.float64) + first).remainder(global_batch_size)
    # Rounding may carry (bin + within) up to the next bin's edge; stay inside the bin.
    return torch.minimum(
        (bins + within) / global_batch_size,
        torch.nextafter((bins + 1) / global_batch_size, torch.zeros((), dtype=torch.float64)),
    )


def tilted_distribution(
    sampler_probs: torch.Tensor, priors: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(probs, prior)``: the sampler's ``(T,)`` or ``(B, T)`` distribution tilted by the product of ``priors``
    (``None`` without priors), renormalised."""
    prior = combined_prior(priors, sampler_probs)
    return tilt_log_probs(torch.log(sampler_probs), prior).exp(), prior


@torch.no_grad()
def draw_levels(
    sampler: TimestepSampler,
    priors: Sequence[torch.Tensor],
    x0: torch.Tensor,
    u: torch.Tensor,
    target_log_probs: Callable[[torch.Tensor], torch.Tensor],
    grid: FlowSchedule | None = None,
) -> DrawRecord:
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
        weight = sampler.importance_weights((target[t] / p_t.to(target.dtype)).float())
    return DrawRecord(t=t, probs=probs, prior=prior, importance_weight=weight, sigma=sigma)


def evaluation_draw(
    seed: int, x0: torch.Tensor, sampler: TimestepSampler, grid: FlowSchedule | None = None
) -> DrawRecord:
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
        if not isinstance(sampler, ContinuousTimestepSampler):
            raise TypeError(
                f'Continuous noise levels are drawn by a closed-form sampler (ContinuousTimestepSampler), got '
                f'{type(sampler).__name__}.'
            )
        sigma = sampler.inverse_cdf(u.to(x0.device), x0)
        t = grid.cells(sigma)
    weight = torch.ones(batch_size, device=x0.device)
    return DrawRecord(t=t, probs=sampler.probs(x0), prior=None, importance_weight=weight, sigma=sigma, noise=noise)


# ------------------------------------------------------------------------------------------------- the objective
# What an objective's draws default to, from its schedule alone: the model (DiffusionModel, FlowMatchingModel) and a
# loop without Composer (TrainingDraws) both read them here.
def objective_sampler(schedule: NoiseSchedule | FlowSchedule) -> TimestepSampler:
    """The objective's own distribution of noise levels, the sampler in force until another is installed: uniform over
    the T timesteps (DDPM); the time ``u`` uniform and shifted, ``sigma = shift(u)`` (flow matching)."""
    if isinstance(schedule, FlowSchedule):
        return ContinuousTimestepSampler(UniformDensity(), schedule)
    return UniformSampler(schedule.num_timesteps)


def objective_log_probs(schedule: NoiseSchedule | FlowSchedule, x0: torch.Tensor) -> torch.Tensor:
    """``(T,)`` log-probabilities of :func:`objective_sampler`'s distribution for the batch ``x0`` (a resolution
    shift reads its size), which importance weights correct towards (before the priors tilt it)."""
    if isinstance(schedule, FlowSchedule):
        return torch.log(objective_sampler(schedule).probs(x0))
    return torch.full((schedule.num_timesteps,), -math.log(schedule.num_timesteps), device=x0.device)


def objective_grid_points(schedule: NoiseSchedule | FlowSchedule) -> torch.Tensor:
    """``(T,)``: the noise level each cell of the sampling grid stands for, where loss weightings are tabulated for
    a sampler: the timesteps themselves (DDPM), the cells' centre sigmas (flow matching)."""
    if isinstance(schedule, FlowSchedule):
        return schedule.cell_centres()
    return torch.arange(schedule.num_timesteps)


def objective_sigma_grid(schedule: NoiseSchedule | FlowSchedule) -> FlowSchedule | None:
    """The grid :func:`draw_levels` draws continuous sigma within (flow matching); ``None``: discrete timesteps."""
    return schedule if isinstance(schedule, FlowSchedule) else None


# ------------------------------------------------------------------------------------------------- noise couplings
@dataclasses.dataclass
class NoisePairing:
    """How a noise coupling paired a training batch's noise with its data (the draw record's ``noise_pairing``).

    Attributes:
        kind: ``'permutation'``: the batch's drawn noises, permuted among its samples (``source`` holds positions in
            the global batch); ``'candidates'``: each sample chose among candidate noises of its own (``source`` holds
            the candidate's index, 0 being the noise it drew).
        source: ``(B,)`` long: where each sample's noise comes from.
        cost_drawn: ``(B,)`` each sample's cost (the coupling's distance) to the noise it drew.
        cost_assigned: ``(B,)`` its cost to the noise it got.
        degenerate: why the drawn noise was kept for some samples (empty when the assignment ran as asked).
    """

    kind: str
    source: torch.Tensor
    cost_drawn: torch.Tensor
    cost_assigned: torch.Tensor
    degenerate: str = ''


@dataclasses.dataclass
class NoiseDraw:
    """A training batch's data and keyed noise, as a noise coupling receives them.

    Attributes:
        x0: the batch's clean data (latents for a latent model).
        noise: the noise each sample drew, keyed by ``(seed, draw index, its position in the global batch)``.
        labels: ``(B,)`` class labels (they stay with their image), or ``None`` for an unconditional model.
        seed: the model's seed of its training draws.
        index: this draw's index.
    """

    x0: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor | None
    seed: int
    index: int

    @property
    def positions(self) -> list[int]:
        """The samples' positions in the global batch (``i * world_size + rank``)."""
        return global_positions(self.x0.shape[0])

    def candidates(self, count: int) -> torch.Tensor:
        """``(B, count, *shape)``: ``count`` more noises per sample, keyed by ``(seed, draw index, position)`` in a
        stream of their own, so resuming or changing the number of ranks draws them again exactly."""
        shape = (count, *self.noise.shape[1:])
        rows = [
            torch.randn(shape, generator=keyed_generator(self.seed, CANDIDATE_STREAM, self.index, position))
            for position in self.positions
        ]
        return torch.stack(rows).to(self.noise.device, self.noise.dtype, non_blocking=True)


class NoiseCoupling(Protocol):
    """What ``set_noise_coupling`` installs: ``coupling(draw) -> (noise, pairing)``, the noise the batch trains on
    (the shape of ``draw.noise``) and how it was paired."""

    def __call__(self, draw: NoiseDraw) -> tuple[torch.Tensor, NoisePairing]: ...


def couple_noise(coupling: NoiseCoupling, draw: NoiseDraw) -> tuple[torch.Tensor, NoisePairing]:
    """Apply ``coupling`` to ``draw`` and check what it returns (the noise's shape, dtype and device stay)."""
    noise, pairing = coupling(draw)
    if tuple(noise.shape) != tuple(draw.noise.shape):
        raise ValueError(
            f'A noise coupling returned noise of shape {tuple(noise.shape)} for a batch drawn with '
            f'{tuple(draw.noise.shape)}.'
        )
    if not isinstance(pairing, NoisePairing):
        raise TypeError(f'A noise coupling must return (noise, NoisePairing), got {type(pairing).__name__}.')
    return noise.to(draw.noise.device, draw.noise.dtype), pairing
