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

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from composer_algos.algorithms.common import SAMPLER_OWNER, ReprMixin, diffusion_model, install_density
from composer_algos.diffusion.densities import CosMapDensity

__all__ = ['CosMapSampling']


class CosMapSampling(ReprMixin, Algorithm):
    """Owns the timestep sampler: SD3's CosMap density of the time ``u`` (no importance weights).

    Example:
        >>> CosMapSampling()
        CosMapSampling()
    """

    timestep_sampler_role = SAMPLER_OWNER

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        mean_u = install_density(diffusion_model(state, self), CosMapDensity(), type(self).__name__)
        logger.log_hyperparameters({'cosmap_sampling/mean_u': mean_u})
