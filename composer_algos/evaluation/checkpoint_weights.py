"""Load a Composer checkpoint's weights, EMA or live, into a freshly built model."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from composer_algos.checkpoint_integrity import model_misfit, written_by
from composer_algos.registry import ConfigError

__all__ = ['load_checkpoint_weights']

log = logging.getLogger(__name__)

WEIGHTS = ('ema', 'live')


def _strip_prefix(state_dict: dict[str, Any], prefix: str = 'module.') -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_checkpoint_weights(
    model: nn.Module, path: str, weights: str = 'ema', model_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load ``path`` (a monolithic Composer checkpoint file) into ``model``; return ``{'weights', 'step'}``.

    Composer's EMA (0.32.1), and :class:`~composer_algos.algorithms.ema.WarmupEMA` built on it, swaps the averaged
    weights into the model at checkpoint time, keeping the training weights in its own state (``ema_weights_active``);
    before it has started the model holds the live weights and its state a stale copy. ``weights='ema'`` loads the
    averaged weights when the checkpoint has them (otherwise the live ones, with a warning), ``weights='live'`` the
    training weights.

    The file is unpickled with ``weights_only=False`` (Composer checkpoints hold timestamps and other objects):
    load only checkpoints you trust. A checkpoint whose tensors do not fit ``model`` is a
    :class:`~composer_algos.registry.ConfigError` naming the file, the first tensor that differs and both shapes,
    and the run that wrote it with its model settings that differ from ``model_config`` (the settings ``model``
    was built from), when the checkpoint records them.
    """
    if weights not in WEIGHTS:
        raise ValueError(f'weights must be one of {WEIGHTS}, got {weights!r}.')
    if os.path.isdir(path):
        raise ValueError(
            f'{path!r} is a directory (a sharded FSDP checkpoint). Save with '
            'parallelism_config.fsdp.state_dict_type: full to get a single file to evaluate.'
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint {path!r} does not exist.')
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    state = checkpoint.get('state', checkpoint)
    model_state = _strip_prefix(dict(state['model']))
    algorithms = dict(state.get('algorithms', []))
    ema = algorithms.get('WarmupEMA', algorithms.get('EMA'))
    used = 'live'
    if ema is not None and ema.get('ema_started'):
        ema_active = bool(ema.get('ema_weights_active'))
        stored = {**ema['ema_model'].get('named_parameters_dict', {}), **ema['ema_model'].get('named_buffers_dict', {})}
        stored = _strip_prefix(stored)
        # The model holds EMA weights iff ema_weights_active; the EMA state holds the other set.
        if (weights == 'ema') != ema_active:
            model_state.update(stored)
        used = weights
    elif weights == 'ema':
        log.warning('%s has no started EMA: evaluating the live weights.', path)
    saved = {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    problem = model_misfit(
        {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}, saved
    )
    if problem is not None:
        origin = written_by(model_state.get('_extra_state'), model_config)
        raise ConfigError(
            f'{path} does not fit the model: {problem}{"; " + origin if origin else ""}; evaluate it '
            'with the recipe it was trained with.'
        )
    model.load_state_dict(model_state)
    timestamp = state.get('timestamp', {})
    timestamp = timestamp.get('Timestamp', timestamp)
    return {'weights': used, 'step': int(timestamp.get('batch', 0)) if isinstance(timestamp, dict) else 0}
