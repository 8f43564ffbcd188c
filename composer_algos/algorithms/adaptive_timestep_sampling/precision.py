"""Probes in full precision when the sharded model computes in bf16.

The reward is the change of the VLB terms across one optimizer step. FSDP's mixed precision casts the parameters
to bf16 for every forward, and one small Adam step moves most weights by less than half a bf16 ulp: measured on
the digits UNet late in training (``python recipes/probe_precision.py``), the per-sample rewards computed with bf16
weights keep a rank correlation of 0.25 with the fp32 rewards at lr 1e-4 and 0.03 at 2e-5, while weights rounded to
TF32's 10-bit mantissa keep 0.96 and 0.95. So probes of a model whose parameters are cast run on a replica of the
denoiser that holds the full fp32 weights (all-gathered from the shards before each probe pass), with TF32 math
(``'tf32'``, the default) or strict fp32 (``'fp32'``, several times slower on tensor cores).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ['PROBE_PRECISIONS', 'FullPrecisionReplica', 'casts_parameters', 'probe_math']

PROBE_PRECISIONS = ('tf32', 'fp32')
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def casts_parameters(state: Any) -> bool:
    """Whether the run's FSDP mixed precision computes with parameters cast below fp32."""
    fsdp = getattr(state, 'fsdp_config', None)
    if fsdp is None:
        return False
    from composer.distributed.mosaic_parallelism import get_mixed_precision

    _, param_dtype, _, _ = get_mixed_precision(state.precision, getattr(fsdp, 'mixed_precision', 'DEFAULT'))
    return param_dtype in _LOW_PRECISION


def _clean_name(name: str) -> str:
    # Activation checkpointing wraps modules; the parameter's own name is the same without the wrapper.
    return name.replace('_checkpoint_wrapped_module.', '')


class FullPrecisionReplica:
    """An fp32 copy of a denoiser that is refreshed from the live (possibly sharded) one before each probe pass.

    Made from the bare denoiser (before FSDP wraps it), so it runs without FSDP's casts and collectives. Costs one
    full fp32 copy of the denoiser's weights on each device, and an all-gather of the shards per probe pass.
    """

    def __init__(self, denoiser: nn.Module):
        self.module = copy.deepcopy(denoiser).float().eval().requires_grad_(False)

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    @torch.no_grad()
    def refresh(self, live: nn.Module) -> nn.Module:
        """Copy ``live``'s current weights (full tensors of every shard) into the replica; return the replica."""
        from torch.distributed.tensor import DTensor

        own: dict[str, torch.Tensor] = dict(self.module.named_parameters())
        own.update(self.module.named_buffers())
        for name, tensor in [*live.named_parameters(), *live.named_buffers()]:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            own[_clean_name(name)].copy_(full)
        return self.module


@contextlib.contextmanager
def probe_math(device: torch.device, precision: str) -> Iterator[None]:
    """No autocast; on CUDA, TF32 matmuls and convolutions on (``'tf32'``) or off (``'fp32'``)."""
    if precision not in PROBE_PRECISIONS:
        raise ValueError(f'probe_precision must be one of {PROBE_PRECISIONS}, got {precision!r}.')
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow = precision == 'tf32'
    try:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
