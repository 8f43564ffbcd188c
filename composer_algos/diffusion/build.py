"""The ``diffusion`` model from nested configuration: a denoiser and an optional encoder by registry name."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from composer_algos import registry
from composer_algos.diffusion.model import DiffusionModel
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['build_diffusion_model']

log = logging.getLogger(__name__)


def build_diffusion_model(denoiser: dict[str, Any], noise_schedule: Optional[dict[str, Any]] = None,
                          encoder: Optional[dict[str, Any]] = None, **kwargs: Any) -> torch.nn.Module:
    """A :class:`DiffusionModel` around a denoiser from the ``denoisers`` registry (default name ``unet``).

    ``noise_schedule`` holds :class:`NoiseSchedule`'s arguments; ``encoder`` (optional, latent diffusion) names a part
    of the ``encoders`` registry (default ``vae``); the other keys are :class:`DiffusionModel`'s.
    """
    net = registry.build(registry.denoisers, denoiser, 'denoiser', 'model.denoiser', default='unet')
    schedule = registry.call_checked(NoiseSchedule, dict(noise_schedule or {}), 'model.noise_schedule')
    encoder_module = None
    if encoder is not None:
        encoder_module = registry.build(registry.encoders, encoder, 'encoder', 'model.encoder', default='vae')
        vae_scale = getattr(encoder_module, 'scaling_factor', None)
        if vae_scale is not None and abs(float(kwargs.get('latent_scale', 1.0)) - vae_scale) > 1e-6:
            log.warning('model.latent_scale=%s but the VAE was trained with scaling_factor=%s.',
                        kwargs.get('latent_scale', 1.0), vae_scale)
    if 'encoder' in kwargs:
        raise registry.ConfigError("model.encoder is a section (name and arguments of a registered encoder).")
    return registry.call_checked(DiffusionModel, dict(kwargs, encoder=encoder_module), 'model', net, schedule)
