"""Where a model's tensors are: a module's device, FSDP2's resharding after a forward, the batch on the device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ['device_batch', 'module_device', 'reshard_fsdp2']


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter; the CPU for a module without parameters."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


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
