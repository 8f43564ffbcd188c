"""The ``cosmap`` loss weighting of diffusers' SD3 training scripts (``compute_loss_weighting_for_sd3``): the velocity
loss at noise level sigma is weighted by the CosMap density of Esser et al., "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis" (arXiv 2403.03206, section 3.1), ``2 / (pi (1 - 2 sigma + 2 sigma^2))``.

Weighting the loss by a density is, in expectation, sampling sigma from it (:mod:`cosmap_sampling`); the weighting
keeps the sampler free for another method. The weights lie between 2/pi (sigma = 0 or 1) and 4/pi (sigma = 1/2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from composer_algos.algorithms.weighting import FlowLossWeighting
from composer_algos.diffusion.model import LossWeighting

__all__ = ['CosMapWeighting', 'cosmap_weight']


def cosmap_weight(schedule: Any, sigma: torch.Tensor, prediction_type: str = 'velocity') -> torch.Tensor:
    """``2 / (pi (1 - 2 sigma + 2 sigma^2))``, float64, at noise levels ``sigma`` ``(B,)``.

    Example:
        >>> cosmap_weight(None, torch.tensor([0.0, 0.5])) * math.pi
        tensor([2., 4.], dtype=torch.float64)
    """
    sigma = sigma.to(torch.float64)
    return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))


class CosMapWeighting(FlowLossWeighting):
    """Multiplies a flow-matching model's per-sample loss by the CosMap density at its sigma (diffusers' ``cosmap``).

    Installs :func:`cosmap_weight` in the model's chain of loss weightings at ``Event.INIT`` (it multiplies with the
    others); a DDPM model is an error.

    Example:
        >>> CosMapWeighting()
        CosMapWeighting()
    """

    prefix = 'cosmap_weighting'

    def weighting(self) -> LossWeighting:
        return cosmap_weight
