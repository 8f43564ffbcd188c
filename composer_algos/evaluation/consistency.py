"""Consistency of two models: do they map the same starting noise to the same image under a deterministic sampler
(DDIM, or the ODE of a flow-matching model)?

Two checkpoints (two steps of one run, or two recipes from one initialisation) generate from identical noise
seeds. Reported in pixels and in the FID feature space: the mean distance between same-noise partners, the same
for shuffled pairs (the baseline: two unrelated samples), and the fraction of seeds whose same-noise partner is
the nearest neighbour among all of the other model's samples. A pair distance well below the shuffled one and a
fraction near 1 mean the models learned nearly the same noise-to-image map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from composer_algos.evaluation.generation import eval_mode, generate_samples

__all__ = ['consistency_diagnostic', 'pair_statistics']


def pair_statistics(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Euclidean statistics of paired rows ``a[i]``, ``b[i]`` (``(N, D)`` each, ``N >= 2``).

    Returns ``pair_distance`` (mean ``|a_i - b_i|``), ``shuffled_distance`` (mean ``|a_i - b_pi(i)|`` for a random
    permutation ``pi`` without fixed points) and ``nn_fraction`` (fraction of ``i`` with ``b_i`` the nearest
    ``b`` to ``a_i``).
    """
    a, b = a.flatten(1).double(), b.flatten(1).double()
    n = a.shape[0]
    if n < 2 or b.shape[0] != n:
        raise ValueError(f'Need two equally long sets of at least 2 rows, got {a.shape[0]} and {b.shape[0]}.')
    dist = torch.cdist(a, b)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = torch.empty(n, dtype=torch.long)
    shuffled[order] = order.roll(1)  # a single cycle over a random order: no sample keeps its partner
    rows = torch.arange(n)
    return {
        'pair_distance': float(dist[rows, rows].mean()),
        'shuffled_distance': float(dist[rows, shuffled].mean()),
        'nn_fraction': float((dist.argmin(1) == rows).double().mean()),
    }


@torch.no_grad()
def consistency_diagnostic(
    model_a: Any,
    model_b: Any,
    num_samples: int,
    shape: Sequence[int],
    feature: nn.Module | None = None,
    num_steps: int = 50,
    seed: int = 0,
    num_classes: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate ``num_samples`` same-noise pairs with the models' deterministic samplers (DDIM, or the flow ODE) and
    compare them (see module docstring).

    Returns ``{'pixels': pair_statistics, 'features': pair_statistics or None, 'samples_a', 'samples_b'}``.
    """
    kwargs: dict[str, Any] = {
        'num_steps': num_steps,
        'eta': 0.0,
        'seed': seed,
        'num_classes': num_classes,
        'batch_size': batch_size,
        'progress': progress,
    }
    indices = range(num_samples)
    with eval_mode(model_a):
        samples_a = generate_samples(model_a, indices, shape, **kwargs)
    with eval_mode(model_b):
        samples_b = generate_samples(model_b, indices, shape, **kwargs)
    result: dict[str, Any] = {'num_samples': num_samples, 'pixels': pair_statistics(samples_a, samples_b, seed)}
    result['features'] = None
    if feature is not None:
        device = next(iter(feature.parameters()), torch.empty(0)).device
        fa = torch.cat(
            [feature(samples_a[i : i + batch_size].to(device)).cpu() for i in range(0, num_samples, batch_size)]
        )
        fb = torch.cat(
            [feature(samples_b[i : i + batch_size].to(device)).cpu() for i in range(0, num_samples, batch_size)]
        )
        result['features'] = pair_statistics(fa, fb, seed)
    result['samples_a'], result['samples_b'] = samples_a, samples_b
    return result
