"""Finding the diffusion model behind Composer's wrappers."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ['get_diffusion_model', 'CONTRACT_METHODS', 'device_batch', 'reshard_fsdp2']

CONTRACT_METHODS = ('set_timestep_sampler', 'add_timestep_prior', 'add_loss_weighting', 'timestep_probs',
                    'vlb_terms', 'noise_schedule', 'prediction_type')


def get_diffusion_model(model: nn.Module, algorithm: Any = None) -> Any:
    """Return the module implementing the diffusion contract, unwrapping DDP's ``.module``.

    Raises a ``TypeError`` naming the missing members when the model does not implement the contract.
    """
    seen = model
    while not all(hasattr(seen, name) for name in CONTRACT_METHODS) and hasattr(seen, 'module'):
        seen = seen.module
    missing = [name for name in CONTRACT_METHODS if not hasattr(seen, name)]
    if missing:
        who = f'{type(algorithm).__name__} needs' if algorithm is not None else 'Need'
        raise TypeError(f'{who} a model implementing the diffusion contract (composer_algos.DiffusionModel or '
                        f'a ComposerModel with the same members); {type(model).__name__} lacks {missing}.')
    return seen


def reshard_fsdp2(model: nn.Module) -> None:
    """Return FSDP2-sharded submodules to their sharded parameters; a no-op for other models.

    FSDP2 keeps the outermost sharded module's parameters unsharded after a forward, expecting a backward next.
    After a forward without backward (evaluation, probes, sampling) that would leave plain tensors where
    checkpointing and weight swaps (EMA) expect DTensors.
    """
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def device_batch(state: Any) -> Any:
    """``state.batch`` as the model sees it: on the training device.

    Between ``BATCH_START`` and ``BATCH_END`` (outside the micro-batch loop) Composer holds the batch as the
    dataloader gave it, in host memory; it moves each micro-batch to the device only just before its forward.
    """
    return state.device.batch_to_device(state.batch)
