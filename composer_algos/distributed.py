"""Collectives that put their tensors where the process group's backend needs them.

NCCL takes only CUDA tensors and gloo is safest with CPU tensors, whatever device the caller's tensor is on. Every
collective of this package goes through these functions: the tensor is copied to the backend's device (a no-op
when it is already there), reduced or gathered, and the result comes back on the caller's device. On one process
they do nothing.
"""

from __future__ import annotations

import os
import time
from collections import deque

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = [
    'all_gather',
    'all_gather_variable',
    'all_reduce',
    'backend_device',
    'broadcast',
    'destroy_process_group',
    'fsdp_gradient_scale',
    'global_positions',
    'is_distributed',
    'rank_world',
]

# The tensors of the latest collectives, kept alive until the process group is destroyed: see destroy_process_group.
_LATEST: deque[tuple[torch.Tensor, ...]] = deque(maxlen=4)


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``: of the process group, or from the launcher's environment before it exists."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return int(os.environ.get('RANK', '0')), int(os.environ.get('WORLD_SIZE', '1'))


def global_positions(local_batch_size: int) -> list[int]:
    """Positions in the global batch of this rank's samples: ``i * world_size + rank``.

    StreamingDataset deals each global batch to the ranks in turn, so rank ``r`` holds samples ``r``, ``r + W``,
    ``r + 2W`` ... of it (with the same global batch size, the same global batch on any number of ranks).
    """
    rank, world_size = rank_world()
    return [i * world_size + rank for i in range(local_batch_size)]


def is_distributed() -> bool:
    """Whether a process group of more than one rank exists."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def backend_device() -> torch.device:
    """The device collectives run on: this rank's CUDA device under NCCL, else the CPU."""
    if is_distributed() and torch_dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


_REDUCE_OPS = {'sum': torch_dist.ReduceOp.SUM, 'max': torch_dist.ReduceOp.MAX, 'min': torch_dist.ReduceOp.MIN}


def all_reduce(tensor: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """Reduce ``tensor`` over ranks in place (``'sum'``, ``'max'`` or ``'min'``) and return it."""
    if op not in _REDUCE_OPS:
        raise ValueError(f'op must be one of {sorted(_REDUCE_OPS)}, got {op!r}.')
    if not is_distributed():
        return tensor
    work = tensor.to(backend_device())
    torch_dist.all_reduce(work, op=_REDUCE_OPS[op])
    _LATEST.append((work,))
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (all of the same shape), in rank order, on the caller's device."""
    if not is_distributed():
        return [tensor]
    work = tensor.to(backend_device())
    gathered = [torch.empty_like(work) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(gathered, work)
    _LATEST.append((work, *gathered))
    return [g.to(tensor.device) for g in gathered]


def all_gather_variable(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` in rank order, on the caller's device, where ranks may hold different lengths.

    Only the first dimension may differ between ranks; the others, and the dtype, must agree. The lengths are
    gathered first, every tensor is padded with zeros to the longest and gathered, and each rank's part is trimmed
    back to its own length (``torch.distributed.all_gather`` needs equal shapes).

    Args:
        tensor: this rank's ``(n_r, ...)`` tensor; ``n_r`` may be 0.

    Returns:
        ``world_size`` tensors, the ``r``-th of shape ``(n_r, ...)``; ``[tensor]`` on one process.

    Example:
        >>> rows = torch.tensor([[0.0, 1.5], [3.0, 2.5]])
        >>> torch.cat(all_gather_variable(rows)).shape  # one process: this rank's rows
        torch.Size([2, 2])
    """
    if not is_distributed():
        return [tensor]
    lengths = [int(n) for n in all_gather(torch.tensor([tensor.shape[0]], dtype=torch.long))]
    longest = max(lengths)
    if longest == 0:
        return [tensor[:0] for _ in lengths]
    padded = tensor.new_zeros((longest, *tensor.shape[1:]), device=backend_device())
    padded[: tensor.shape[0]] = tensor
    return [part[:n].to(tensor.device) for part, n in zip(all_gather(padded), lengths, strict=True)]


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s and return it."""
    if not is_distributed():
        return tensor
    work = tensor.to(backend_device())
    torch_dist.broadcast(work, src=src)
    _LATEST.append((work,))
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def fsdp_gradient_scale(model: nn.Module) -> float:
    """The factor a loss's gradient needs so that FSDP2 averages gradients over ranks: ``1 / world_size`` on gloo.

    FSDP2 reduce-scatters gradients with ``ReduceOp.AVG``; gloo (torch 2.7) sums instead, so on CPU every sharded
    gradient would be ``world_size`` times the mean (Adam hides it, SGD and gradient clipping do not, and resuming on
    another number of ranks restores moments of the wrong scale). NCCL averages: 1 there, and without FSDP2.
    """
    if not is_distributed() or torch_dist.get_backend() != 'gloo':
        return 1.0
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return 1.0
    return 1.0 / torch_dist.get_world_size()


def destroy_process_group() -> None:
    """Destroy the default process group (if there is one) without the hang torch 2.7 can meet on gloo.

    Torch before 2.8 destroys a gloo group while holding the GIL, and the destructor waits for the group's worker
    threads. A worker still dropping a finished collective's tensors (a moment after the collective returned, longer
    on a loaded machine) needs the GIL to free a tensor made in Python when it holds the last reference: both wait
    for good (pytorch/pytorch#154976 moved the destructor out of the GIL). The collectives of this module keep their
    latest tensors alive, so no worker frees one of them; they are let go once the group is gone. The short sleep
    first lets workers finish with other code's collectives (whose tensors this module does not hold).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        time.sleep(0.05)  # releases the GIL
        torch_dist.destroy_process_group()
    _LATEST.clear()
