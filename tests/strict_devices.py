"""GPU placement rules, enforced on a CPU-only machine.

On a GPU, a CUDA kernel refuses a host (CPU) tensor beside device tensors, and NCCL refuses a collective on a host
tensor; on CPU with gloo both work, so tests there cannot see such bugs. :func:`strict_devices` brings the rules
back by tracking which tensors would live in host memory on a GPU machine:

* every batch a ``DataLoader`` yields starts on the host (as pinned or pageable CPU memory would);
* a tensor made by a factory (``torch.tensor``, ``zeros``, ``randn``, ``from_numpy`` ...) without a ``device``
  argument in this package's code is on the host (the default device is the CPU);
* ``.cpu()`` and ``.to('cpu')`` move to the host; ``.to(some_torch_device)``, ``.to(other_tensor)`` and
  ``Device.batch_to_device`` / ``tensor_to_device`` (which call ``.to(torch.device(...))``) move to the device —
  on CPU the device a tensor is moved to by a ``torch.device`` is taken to be the accelerator;
* the result of an op on host tensors only is on the host; everything else is on the device.

An op that mixes a host tensor (with at least one dimension: CUDA accepts 0-d CPU scalars) with a device tensor
raises :class:`StrictDeviceError`, as CUDA would ("Expected all tensors to be on the same device"); so does a
module called with a host input, since its weights are device tensors. A ``torch.distributed`` collective on a
host tensor raises too, as NCCL would. Indexing, ``copy_`` and ``__setitem__`` may mix (PyTorch allows it).

Host tensors are instances of :class:`HostTensor` (same storage, no behaviour of their own); a
``TorchFunctionMode`` classifies every torch call made on the thread that entered :func:`strict_devices`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ['HostTensor', 'StrictDeviceError', 'strict_devices', 'to_host']

PACKAGE = 'composer_algos'


class StrictDeviceError(RuntimeError):
    """What CUDA or NCCL would have raised on a GPU machine."""


class HostTensor(torch.Tensor):
    """A tensor in host memory (on a GPU machine: a CPU tensor)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __deepcopy__(self, memo):
        return to_host(self.as_subclass(torch.Tensor).__deepcopy__(memo))

    def __reduce_ex__(self, protocol):
        # Saved (checkpoints, pickles) as the plain tensor it is.
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _is_host(value: Any) -> bool:
    return isinstance(value, HostTensor)


def to_host(tree: Any) -> Any:
    """Mark every tensor of a (nested) batch as living in host memory."""
    return tree_map(lambda v: v.as_subclass(HostTensor) if torch.is_tensor(v) and not _is_host(v) else v, tree)


def _to_device(tree: Any) -> Any:
    return tree_map(lambda v: v.as_subclass(torch.Tensor) if _is_host(v) else v, tree)


_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.from_numpy,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
    torch.eye,
    torch.scalar_tensor,
}
_LIKE = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.randn_like,
    torch.rand_like,
    torch.randint_like,
}
# Ops PyTorch allows across devices (CPU indices into a CUDA tensor, cross-device copies) and reads of metadata.
_MIXING_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_}
_HOST_MOVES = {torch.Tensor.cpu}
_PASS_THROUGH = {torch.Tensor.as_subclass, torch.Tensor.__deepcopy__, torch.Tensor.__reduce_ex__}
_DEVICE_MOVES = {torch.Tensor.cuda}


def _names(func: Any) -> str:
    return getattr(func, '__qualname__', None) or getattr(func, '__name__', None) or repr(func)


def _device_argument(func: Any, args: tuple, kwargs: dict) -> Any:
    """The target device of ``Tensor.to`` (a ``str``, ``torch.device``, a tensor or ``None``)."""
    if 'device' in kwargs:
        return kwargs['device']
    if 'other' in kwargs:
        return kwargs['other']
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)) or torch.is_tensor(arg):
            return arg
    return None


def _called_from_package(depth: int = 2) -> bool:
    frame = sys._getframe(depth)
    return frame.f_globals.get('__name__', '').startswith(PACKAGE)


class _StrictMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [v for v in tree_flatten((args, kwargs))[0] if torch.is_tensor(v)]
        host = [t for t in tensors if _is_host(t)]
        # Arguments go through as they are (a HostTensor is an ordinary tensor to every kernel); in-place ops that
        # change metadata (resize_, set_) must act on the caller's own objects.

        if func in _PASS_THROUGH:
            return func(*args, **kwargs)
        if func is torch.Tensor.to:
            target = _device_argument(func, args, kwargs)
            out = func(*args, **kwargs)
            if target is None:
                on_host = _is_host(args[0])
            elif torch.is_tensor(target):
                on_host = _is_host(target)
            else:
                on_host = isinstance(target, str) and target == 'cpu'
            return to_host(out) if on_host else _to_device(out)
        if func in _HOST_MOVES:
            return to_host(func(*args, **kwargs))
        if func in _DEVICE_MOVES:
            return _to_device(func(*args, **kwargs))
        if func in _FACTORIES:
            out = func(*args, **kwargs)
            device = kwargs.get('device')
            explicit_host = isinstance(device, str) and device == 'cpu'
            return to_host(out) if explicit_host or (device is None and _called_from_package()) else out
        if func in _LIKE:
            out = func(*args, **kwargs)
            if 'device' in kwargs:
                return to_host(out) if kwargs['device'] == 'cpu' else out
            return to_host(out) if host else out
        if func in _MIXING_ALLOWED:
            out = func(*args, **kwargs)
            return to_host(out) if host and _is_host(args[0]) else out
        if host and len(host) < len(tensors):
            big_host = [t for t in host if t.dim() > 0]
            if big_host:
                shapes = [tuple(t.shape) for t in big_host]
                raise StrictDeviceError(
                    f'{_names(func)} mixes host tensors {shapes} with device tensors: on a GPU this fails '
                    '("Expected all tensors to be on the same device"). Move the host tensor with '
                    'state.device.batch_to_device / tensor_to_device or .to(<tensor>.device) first.'
                )
            return _to_device(func(*args, **kwargs))
        out = func(*args, **kwargs)
        return to_host(out) if host else out


_COLLECTIVES = (
    'all_reduce',
    'all_gather',
    'all_gather_into_tensor',
    'broadcast',
    'reduce',
    'reduce_scatter',
    'reduce_scatter_tensor',
    'gather',
    'scatter',
    'all_to_all',
    'all_to_all_single',
)


def _check_collective(name: str, original):

    @functools.wraps(original)
    def checked(*args, **kwargs):
        host = [tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if _is_host(t)]
        if host:
            raise StrictDeviceError(
                f'torch.distributed.{name} on host tensors {host}: NCCL only takes CUDA tensors. Put the tensor on '
                "the backend's device first (composer_algos.distributed does this)."
            )
        return original(*args, **kwargs)

    return checked


@contextlib.contextmanager
def strict_devices() -> Iterator[None]:
    """Enforce the GPU placement rules (see the module docstring) on this thread for the duration of the block."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    originals = {name: getattr(torch_dist, name) for name in _COLLECTIVES}
    next_batch = _BaseDataLoaderIter.__next__

    def host_batches(self):
        return to_host(next_batch(self))

    try:
        for name, original in originals.items():
            setattr(torch_dist, name, _check_collective(name, original))
        _BaseDataLoaderIter.__next__ = host_batches
        with _StrictMode():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch_dist, name, original)
        _BaseDataLoaderIter.__next__ = next_batch
