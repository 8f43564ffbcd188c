"""CosMap timestep sampling: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(Stable Diffusion 3), ICML 2024 (arXiv 2403.03206), section 3.1.

The time is ``u = 1 - 1 / (tan(pi w / 2) + 1)`` for a uniform ``w``: the density ``2 / (pi (1 - 2u + 2u^2))``
(between 2/pi at the ends and 4/pi in the middle), chosen in SD3 so that the log-SNR of rectified flow follows the
cosine schedule's. Its CDF is ``(2 / pi) atan(u / (1 - u))``, so cell masses and draws are exact.

Flow matching: ``sigma = shift(u)``. DDPM: ``u`` is the position ``t / T`` on the schedule, as for
:mod:`logit_normal_sampling`. diffusers has no CosMap sampler; the density equals its ``cosmap`` loss weighting
(``compute_loss_weighting_for_sd3``), which the tests compare it with.
"""

from __future__ import annotations

from composer_algos.algorithms.density_sampling import DensitySampling
from composer_algos.diffusion.densities import CosMapDensity, TimeDensity

__all__ = ['CosMapSampling']


class CosMapSampling(DensitySampling):
    """Owns the timestep sampler: SD3's CosMap density of the time ``u`` (no importance weights).

    Example:
        >>> CosMapSampling()
        CosMapSampling()
    """

    prefix = 'cosmap_sampling'

    def density(self) -> TimeDensity:
        return CosMapDensity()
