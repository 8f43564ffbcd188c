"""Seeded, rank-split sample generation and the model state it runs in (EMA weights, eval mode)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from composer_algos.diffusion.utils import reshard_fsdp2
from composer_algos.distributed import all_reduce, is_distributed, rank_world
from composer_algos.seeding import keyed_generator

__all__ = [
    'all_reduce_max',
    'ema_weights',
    'eval_mode',
    'gather_by_index',
    'generate_samples',
    'generate_share',
    'rank_indices',
    'rank_world',
    'reshard_fsdp2',
    'sample_noise',
]

log = logging.getLogger(__name__)


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks."""
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.long), op='max').item())


def rank_indices(num_samples: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """The sample indices rank ``rank`` generates: ``rank::world_size``."""
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    return list(range(rank, num_samples, world_size))


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Starting noise ``(len(indices), *shape)``; sample ``i``'s noise depends only on ``(seed, i)``.

    That is what makes samples independent of how they are split over ranks and batches.
    """
    noise = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        gen = keyed_generator(seed, index)
        noise[row] = torch.randn(tuple(shape), generator=gen)
    return noise


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (no dropout) and restore each submodule's training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def ema_weights(state: Any) -> Iterator[bool]:
    """Swap the EMA weights of Composer's ``EMA`` algorithm into ``state.model`` for the duration of the block.

    Composer's EMA (0.32.1) keeps the averaged weights in ``EMA.ema_model`` (an ``EMAParameters``) and swaps them
    in only between ``EVAL_START`` and ``EVAL_END`` (and at checkpoints). This does the same swap for code running
    at other events, and undoes it on exit. Yields ``True`` when EMA weights are active inside the block, ``False``
    when the live weights are used (no EMA algorithm, or it has not started yet).
    """
    from composer.algorithms import EMA

    swapped: list[EMA] = []
    active = False
    for algorithm in state.algorithms:
        if not isinstance(algorithm, EMA) or not algorithm.ema_started or algorithm.ema_model is None:
            continue
        if not algorithm.ema_weights_active:
            reshard_fsdp2(state.model)
            algorithm.ema_model.move_params_to_device(destination_model=state.model)
            algorithm.ema_model.swap_params(model=state.model)
            algorithm.ema_weights_active = True
            swapped.append(algorithm)
        active = True
    try:
        yield active
    finally:
        if swapped:
            reshard_fsdp2(state.model)
        for algorithm in reversed(swapped):
            # composer's EMA declares ema_model as None (it is made at the first step).
            algorithm.ema_model.swap_params(model=state.model)  # type: ignore[attr-defined]
            algorithm.ema_weights_active = False


@torch.no_grad()
def generate_samples(
    model: Any,
    indices: Sequence[int],
    shape: Sequence[int],
    num_steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    num_classes: int | None = None,
    batch_size: int = 256,
    num_batches: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate the samples numbered ``indices`` with ``model.generate`` (DDIM for ``eta=0``; a flow-matching model's
    ODE), on CPU.

    Sample ``i`` starts from :func:`sample_noise` of ``(seed, i)`` and, for class-conditional models, has label
    ``i % num_classes``; for text-conditioned ones, prompt ``prompts[i % len(prompts)]``, with classifier-free
    guidance at ``guidance_scale``; with ``eta=0`` it is therefore the same whichever rank or batch generates it. (With
    ``eta > 0`` each batch draws its step noise from ``seed`` plus its first index, which depends on the split.)
    ``num_batches`` forces that many denoiser passes, padding with throw-away work, so that every rank runs the
    same number of forwards (FSDP needs this).
    """
    indices = list(indices)
    needed = math.ceil(len(indices) / batch_size)
    num_batches = needed if num_batches is None else num_batches
    if num_batches < needed:
        raise ValueError(f'num_batches={num_batches} cannot hold {len(indices)} samples of batch size {batch_size}.')
    if getattr(model, 'label_key', None) is not None and not num_classes:
        raise ValueError('The model is class-conditional (label_key is set): pass num_classes so samples get labels.')
    if getattr(getattr(model, 'conditioner', None), 'kind', None) == 'text' and not prompts:
        raise ValueError('The model is text-conditioned: pass prompts so samples get captions.')
    # Only what is set reaches generate(), so a model implementing the contract before text conditioning still works.
    extra: dict[str, Any] = {} if guidance_scale == 1.0 else {'guidance_scale': guidance_scale}
    from tqdm import tqdm

    outputs = []
    for b in tqdm(range(num_batches), desc='sampling', disable=not progress, leave=False):
        chunk = indices[b * batch_size : (b + 1) * batch_size]
        padding = not chunk
        chunk = chunk or [0]
        labels = torch.tensor(chunk, dtype=torch.long) % num_classes if num_classes else None
        if prompts:
            extra['prompts'] = [prompts[i % len(prompts)] for i in chunk]
        x = model.generate(
            len(chunk),
            tuple(shape),
            num_steps=num_steps,
            eta=eta,
            seed=int(seed) + chunk[0],
            labels=labels,
            device=device,
            noise=sample_noise(chunk, shape, seed),
            **extra,
        )
        if not padding:
            outputs.append(x.float().cpu())
    return torch.cat(outputs) if outputs else torch.empty((0, *shape))


def generate_share(
    model: Any, num_samples: int, shape: Sequence[int], batch_size: int = 256, **kwargs: Any
) -> tuple[list[int], torch.Tensor]:
    """This rank's share ``rank::world_size`` of ``num_samples`` samples; returns ``(indices, samples)``.

    Every rank runs the same number of batches, so sharded (FSDP) models stay in step.
    """
    rank, world_size = rank_world()
    indices = rank_indices(num_samples, rank, world_size)
    num_batches = math.ceil(math.ceil(num_samples / world_size) / batch_size)
    return indices, generate_samples(model, indices, shape, batch_size=batch_size, num_batches=num_batches, **kwargs)


def gather_by_index(indices: Sequence[int], samples: torch.Tensor) -> torch.Tensor | None:
    """Collect every rank's ``(indices, samples)`` on rank 0, in index order; other ranks get ``None``."""
    if not is_distributed():
        order = torch.tensor(list(indices)).argsort()
        return samples[order]
    from composer.utils import dist

    gathered = dist.all_gather_object((list(indices), samples.cpu()))
    if dist.get_global_rank() != 0:
        return None
    all_indices = [i for idx, _ in gathered for i in idx]
    all_samples = torch.cat([s for _, s in gathered])
    return all_samples[torch.tensor(all_indices).argsort()]
