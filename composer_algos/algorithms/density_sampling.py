"""What the timestep-sampler algorithms share: installing a density of the time or a fixed distribution as sampler."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from composer.core import State
from composer.loggers import Logger

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.common import objective_of
from composer_algos.diffusion.densities import TimeDensity, grid_masses
from composer_algos.diffusion.timestep_samplers import ContinuousTimestepSampler, FixedDistributionSampler

__all__ = ['DensitySampling', 'SAMPLER_NEEDS', 'install_density', 'install_fixed_distribution']

# The contract members install_density and install_fixed_distribution use.
SAMPLER_NEEDS = ('noise_schedule', 'num_timesteps', 'set_timestep_sampler')


def install_density(model: Any, density: TimeDensity, owner: str) -> float:
    """Make a closed-form density of the time ``u`` in [0, 1] (:mod:`composer_algos.diffusion.densities`) ``model``'s
    timestep sampler, owned by ``owner``; return the density's mean ``u``.

    Flow matching: a :class:`~composer_algos.diffusion.timestep_samplers.ContinuousTimestepSampler`,
    ``sigma = shift(u)``.
    DDPM: ``u`` is the position ``t / T`` on the schedule, each timestep getting its cell's mass
    ``P(t / T <= u < (t + 1) / T)`` (the distribution of ``floor(u T)``, as diffusers' training scripts index it).
    """
    if objective_of(model) == 'flow_matching':
        model.set_timestep_sampler(ContinuousTimestepSampler(density, model.noise_schedule), owner)
    else:
        edges = torch.arange(model.num_timesteps + 1, dtype=torch.float64) / model.num_timesteps
        install_fixed_distribution(model, grid_masses(density, edges), owner)
    edges = torch.linspace(0, 1, 1001, dtype=torch.float64)
    return float((grid_masses(density, edges) * (edges[1:] + edges[:-1]) / 2).sum())


def install_fixed_distribution(model: Any, probs: torch.Tensor, owner: str) -> float:
    """Make a fixed ``(T,)`` distribution ``model``'s timestep sampler (owned by ``owner``); return its mean t."""
    model.set_timestep_sampler(FixedDistributionSampler(probs), owner)
    return float((probs.double() * torch.arange(probs.numel(), dtype=torch.float64)).sum())


class DensitySampling(DiffusionAlgorithm):
    """Base of the algorithms that own the timestep sampler with a closed-form density of the time ``u``
    (:meth:`density`): installed by :func:`install_density` at ``Event.INIT``, its mean ``u`` logged as
    ``<prefix>/mean_u``."""

    needs = SAMPLER_NEEDS
    owns_timestep_sampler = True
    prefix: ClassVar[str] = ''

    def density(self) -> TimeDensity:
        """The density of ``u`` in [0, 1] (``u = 1``: pure noise)."""
        raise NotImplementedError

    def install(self, model: Any, state: State, logger: Logger) -> dict[str, float]:
        return {f'{self.prefix}/mean_u': install_density(model, self.density(), self.owner)}
