"""The ``diffusion`` model from nested configuration: a denoiser and an optional encoder by registry name."""

from __future__ import annotations

import logging
from typing import Any

import torch

from composer_algos import registry
from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.flow_model import FlowMatchingModel
from composer_algos.diffusion.model import DiffusionModel
from composer_algos.diffusion.schedule import NoiseSchedule

__all__ = ['OBJECTIVES', 'build_diffusion_model']

log = logging.getLogger(__name__)

OBJECTIVES = ('ddpm', 'flow_matching')


def build_diffusion_model(
    denoiser: dict[str, Any],
    noise_schedule: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
    objective: str = 'ddpm',
    flow: dict[str, Any] | None = None,
    conditioner: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """A :class:`DiffusionModel` (``objective: ddpm``) or :class:`FlowMatchingModel` (``objective: flow_matching``)
    around a denoiser from the ``denoisers`` registry (default name ``unet``).

    ``noise_schedule`` holds :class:`NoiseSchedule`'s arguments (DDPM), ``flow`` :class:`FlowSchedule`'s (flow
    matching: shift, resolution-dependent shift, grid); ``encoder`` (optional, latent diffusion) names a part of the
    ``encoders`` registry (default ``vae``); ``conditioner`` (optional) names a part of the ``conditioners`` registry
    (``none``, ``class_label``, ``text``; without it ``label_key`` makes a ``class_label`` one, as before conditioners
    existed); the other keys are the model class's.
    """
    if objective not in OBJECTIVES:
        raise registry.ConfigError(
            f'model.objective must be one of {OBJECTIVES}, got {objective!r}.'
            f'{registry.suggest(str(objective), list(OBJECTIVES))}'
        )
    net = registry.build(registry.denoisers, denoiser, 'denoiser', 'model.denoiser', default='unet')
    if objective == 'flow_matching':
        if noise_schedule is not None:
            raise registry.ConfigError(
                'model.noise_schedule is the DDPM schedule; a flow_matching model takes '
                'model.flow (shift, resolution_shift, ...). Remove model.noise_schedule or set '
                'it to null.'
            )
        model_class: type[DiffusionModel] = FlowMatchingModel
        schedule = registry.call_checked(FlowSchedule, dict(flow or {}), 'model.flow')
    else:
        if flow is not None:
            raise registry.ConfigError(
                'model.flow applies to objective: flow_matching; this model trains the DDPM '
                'objective (model.noise_schedule sets its schedule).'
            )
        model_class = DiffusionModel
        schedule = registry.call_checked(NoiseSchedule, dict(noise_schedule or {}), 'model.noise_schedule')
    encoder_module = None
    if encoder is not None:
        encoder_module = registry.build(registry.encoders, encoder, 'encoder', 'model.encoder', default='vae')
        vae_scale = getattr(encoder_module, 'scaling_factor', None)
        if vae_scale is not None and abs(float(kwargs.get('latent_scale', 1.0)) - vae_scale) > 1e-6:
            log.warning(
                'model.latent_scale=%s but the VAE was trained with scaling_factor=%s.',
                kwargs.get('latent_scale', 1.0),
                vae_scale,
            )
    if 'encoder' in kwargs:
        raise registry.ConfigError('model.encoder is a section (name and arguments of a registered encoder).')
    if conditioner is not None:
        if kwargs.get('label_key') is not None:
            raise registry.ConfigError(
                'model.label_key and model.conditioner both say what conditions the model; '
                'keep model.conditioner (class labels: {name: class_label, label_key: '
                f'{kwargs["label_key"]}}}).'
            )
        kwargs['conditioner'] = registry.build(registry.conditioners, conditioner, 'conditioner', 'model.conditioner')
    return registry.call_checked(model_class, dict(kwargs, encoder=encoder_module), 'model', net, schedule)
