"""The ``sigma_sqrt`` loss weighting of diffusers' SD3 training scripts (``compute_loss_weighting_for_sd3``, with the
densities of Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv
2403.03206): the velocity loss at noise level sigma is weighted by ``sigma^-2``, which favours low noise.

Deviation, stated once: diffusers trains on the 1000 discrete noise levels of its scheduler, the smallest ``1/1000``,
so its weight never exceeds 10^6; a continuous sigma can come arbitrarily close to 0, so the weight is taken at
``max(sigma, min_sigma)`` (default ``1/1000``, the same bound).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from composer_algos.algorithms.weighting import FlowLossWeighting
from composer_algos.diffusion.model import LossWeighting

__all__ = ['SigmaSqrtWeighting', 'sigma_sqrt_weight']


def _check(min_sigma: float) -> None:
    if not (0 < min_sigma < 1 and math.isfinite(min_sigma)):
        raise ValueError(f'min_sigma must be in (0, 1), got {min_sigma}.')


def sigma_sqrt_weight(
    schedule: Any, sigma: torch.Tensor, prediction_type: str = 'velocity', min_sigma: float = 1e-3
) -> torch.Tensor:
    """``max(sigma, min_sigma)^-2``, float64, at noise levels ``sigma`` ``(B,)``.

    Example:
        >>> sigma_sqrt_weight(None, torch.tensor([0.5, 1.0, 0.0]))
        tensor([4.0000e+00, 1.0000e+00, 1.0000e+06], dtype=torch.float64)
    """
    _check(min_sigma)
    return sigma.to(torch.float64).clamp(min=min_sigma) ** -2


class SigmaSqrtWeighting(FlowLossWeighting):
    """Multiplies a flow-matching model's per-sample loss by ``sigma^-2`` (diffusers' ``sigma_sqrt``).

    Installs :func:`sigma_sqrt_weight` in the model's chain of loss weightings at ``Event.INIT`` (it multiplies with
    the others); a DDPM model is an error. Logs the range of the weights over the model's cells of sigma.

    Args:
        min_sigma: the noise level below which the weight stops growing (1/1000, diffusers' smallest).

    Example:
        >>> SigmaSqrtWeighting(min_sigma=1e-3)
        SigmaSqrtWeighting(min_sigma=0.001)
    """

    prefix = 'sigma_sqrt_weighting'

    def __init__(self, min_sigma: float = 1e-3):
        _check(min_sigma)
        self.min_sigma = float(min_sigma)

    def weighting(self) -> LossWeighting:
        return functools.partial(sigma_sqrt_weight, min_sigma=self.min_sigma)
