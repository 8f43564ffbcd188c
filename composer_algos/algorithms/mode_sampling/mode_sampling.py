"""Mode sampling with heavy tails: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis" (Stable Diffusion 3), ICML 2024 (arXiv 2403.03206), section 3.1.

The time is ``u = f(w) = 1 - w - scale (cos^2(pi w / 2) - 1 + w)`` for a uniform ``w``: ``scale = 0`` is uniform,
``scale > 0`` moves mass to the middle of [0, 1] while keeping both ends (SD3 uses 1.29), ``scale < 0`` to the ends.
``f`` is a monotone map from [0, 1] onto itself when ``-1 <= scale <= 2 / (pi - 2)`` (see
:class:`~composer_algos.diffusion.densities.ModeDensity`), so its inverse CDF is exact and its CDF, needed for cell
masses, is found by bisection.

Flow matching: ``sigma = shift(u)``, drawn exactly at the model's keyed uniform ``v`` as ``f(1 - v)`` (diffusers'
``compute_density_for_timestep_sampling('mode')`` computes ``f(w)`` of its own uniform ``w``). DDPM: ``u`` is the
position ``t / T`` on the schedule, as for :mod:`logit_normal_sampling`.
"""

from __future__ import annotations

from composer_algos.algorithms.density_sampling import DensitySampling
from composer_algos.diffusion.densities import ModeDensity, TimeDensity

__all__ = ['ModeSampling']


class ModeSampling(DensitySampling):
    """Owns the timestep sampler: SD3's mode density of the time ``u`` (no importance weights).

    Logs the density's mean ``u`` as a hyperparameter.

    Args:
        scale: the heavy-tail scale, in ``[-1, 2 / (pi - 2)]`` (1.29 in SD3; 0 is uniform).

    Example:
        >>> ModeSampling(scale=1.29)
        ModeSampling(scale=1.29)
    """

    prefix = 'mode_sampling'

    def __init__(self, scale: float = 1.29):
        self._density = ModeDensity(scale)
        self.scale = float(scale)

    def density(self) -> TimeDensity:
        return self._density
