"""FID with ``torchmetrics.image.fid.FrechetInceptionDistance`` on any feature module, rank by rank.

Each rank adds its own images; torchmetrics sums the feature statistics over ranks when it computes, so FID from
``composer -n 2`` with rank ``r`` generating samples ``r::2`` equals the one-process FID on the same samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ['collect_images', 'fid_from_samples', 'fid_metric', 'floor_at', 'real_vs_real_fid', 'update_fid']


def fid_metric(feature: nn.Module, device: torch.device | None = None) -> FrechetInceptionDistance:
    """A FID metric on ``feature`` (images in [-1, 1]) whose ``reset()`` keeps the real statistics."""
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
    return metric.to(device) if device is not None else metric


@torch.no_grad()
def update_fid(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch_size: int = 256) -> None:
    """Add ``images`` (floats in [-1, 1]) to the real or fake side of ``metric`` in batches."""
    device = metric.real_features_sum.device
    for start in range(0, images.shape[0], batch_size):
        metric.update(images[start : start + batch_size].to(device), real=real)


def fid_from_samples(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature: nn.Module,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> float:
    """FID between ``real`` and ``fake`` images (floats in [-1, 1]) in ``feature``'s space.

    Collective under ``torch.distributed``: call it on every rank with that rank's images; the result is the FID
    of all ranks' images together.
    """
    metric = fid_metric(feature, device)
    update_fid(metric, real, real=True, batch_size=batch_size)
    update_fid(metric, fake, real=False, batch_size=batch_size)
    return float(metric.compute())


def floor_at(halves_fid: float, n_half: int, n_other_half: int, num_samples: int, num_real: int) -> float:
    """The real-vs-real FID expected at ``num_samples`` samples against ``num_real`` real images, from the FID of two
    real sets of ``n_half`` and ``n_other_half`` images.

    Two samples of one distribution have a positive FID from their finite sizes alone, and it shrinks as
    ``1/n1 + 1/n2`` (measured on the MNIST tier's features: ``n`` x FID of two real sets of ``n`` images stays
    within 6% of its mean for ``n`` from 100 to 500), so the floor a model can reach at the evaluation's sizes is
    the halves' FID times ``(1/num_samples + 1/num_real) / (1/n_half + 1/n_other_half)``. Unscaled, the halves'
    FID overstates it: on the digits default (1000 samples against 360 real digits, halves of 180) by about 3x.
    """
    return halves_fid * (1 / num_samples + 1 / num_real) / (1 / n_half + 1 / n_other_half)


def real_vs_real_fid(
    images: torch.Tensor,
    feature: nn.Module,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | None = None,
    num_samples: int | None = None,
) -> float:
    """The FID floor: FID between two random halves of real ``images``, scaled by :func:`floor_at` to
    ``num_samples`` samples against all of ``images`` when ``num_samples`` is given."""
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    half = images.shape[0] // 2
    halves_fid = fid_from_samples(images[order[:half]], images[order[half : 2 * half]], feature, batch_size, device)
    if num_samples is None:
        return halves_fid
    return floor_at(halves_fid, half, half, num_samples, images.shape[0])


def collect_images(
    loader: Iterable[Any], model: Any = None, max_images: int | None = None, with_conditioning: bool = False
) -> Any:
    """Images (and optionally the model's conditioning) from ``loader``'s batches, on CPU, up to ``max_images``.

    ``model.images(batch)`` reads the batch when a model is given (so its ``image_key`` applies); otherwise a
    batch is a mapping with ``'image'``, a tuple whose first entry is the images, or a tensor.
    """
    images, conditioning = [], []
    count = 0
    device = next(model.parameters()).device if model is not None else None
    for loaded in loader:
        batch = loaded
        if model is not None:
            # The model reads the batch on its own device (an encoder runs there).
            batch = tree_map(lambda v: v.to(device) if torch.is_tensor(v) else v, loaded)
            x = model.images(batch)
            cond = model.conditioning(batch) if with_conditioning else {}
        else:
            x = batch['image'] if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else batch
            cond = {}
        if max_images is not None:
            x = x[: max_images - count]
            cond = {k: v[: x.shape[0]] for k, v in cond.items()}
        images.append(x.detach().float().cpu())
        conditioning.append({k: torch.as_tensor(v).cpu() for k, v in cond.items()})
        count += x.shape[0]
        if max_images is not None and count >= max_images:
            break
    if not images:
        raise ValueError('The image loader yielded no batches.')
    out = torch.cat(images)
    if not with_conditioning:
        return out
    keys = conditioning[0].keys()
    return out, {k: torch.cat([c[k] for c in conditioning]) for k in keys}
