"""Bits per dimension from the diffusion variational bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021).

    -log p(x0) <= L_prior + sum_{t=0}^{T-1} L_t,    bits/dim = (L_prior + sum_t L_t) / ln 2

with every term in nats per dimension: ``L_prior = KL(q(x_T | x0) || N(0, I))`` (``model.prior_term``), ``L_0``
the discretised-Gaussian decoder NLL and ``L_t`` (t > 0) the posterior KLs (``model.vlb_terms``). For pixel data
in [-1, 1] this is the DDPM "NLL in bits/dim" of the 8-bit images.

For large T the sum can be estimated from ``K`` timesteps: ``L_0`` exactly, and one timestep drawn uniformly in
each of ``K - 1`` contiguous strata of ``{1, ..., T-1}``, weighted by its stratum's size (the inverse of its
inclusion probability). The estimate is unbiased; the strata and the noise come from ``seed``, so successive
evaluations use the same timesteps and noise and their differences reflect the model only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from composer_algos.seeding import keyed_generator

__all__ = ['bits_per_dim', 'vlb_timesteps']


def vlb_timesteps(num_timesteps: int, num_terms: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps ``t`` and weights ``w`` with ``sum_k w_k L_{t_k}`` an unbiased estimate of ``sum_t L_t``.

    ``num_terms=None`` (or >= T) gives every timestep with weight 1.
    """
    T = int(num_timesteps)
    if num_terms is None or num_terms >= T:
        return torch.arange(T), torch.ones(T, dtype=torch.float64)
    if num_terms < 2:
        raise ValueError(f'num_terms must be at least 2 (t=0 and one stratum) or None for all T, got {num_terms}.')
    gen = torch.Generator().manual_seed(seed)
    edges = torch.linspace(1, T, num_terms).round().long()  # K - 1 strata [edges[k], edges[k+1])
    sizes = edges[1:] - edges[:-1]
    offsets = (torch.rand(num_terms - 1, generator=gen, dtype=torch.float64) * sizes).long()
    t = torch.cat([torch.zeros(1, dtype=torch.long), edges[:-1] + offsets])
    w = torch.cat([torch.ones(1, dtype=torch.float64), sizes.to(torch.float64)])
    return t, w


@torch.no_grad()
def bits_per_dim(
    model: Any,
    images: torch.Tensor,
    conditioning: dict[str, torch.Tensor] | None = None,
    num_terms: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_batches: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-image bits/dim ``(N,)`` of ``images`` (clean data x0, e.g. from ``model.images(batch)``).

    Args:
        model: implements ``vlb_terms(x0, t, noise, conditioning)``, ``prior_term(x0)`` and ``noise_schedule``.
        images: ``(N, C, H, W)`` clean data.
        conditioning: per-image conditioning (e.g. ``{'class_labels': (N,)}``) for conditional models.
        num_terms: timesteps evaluated; ``None`` for all T (exact), else the stratified estimate above.
        seed: seed of the strata and of the noise.
        batch_size: images per denoiser call.
        num_batches: pad to this many batches per timestep, so every rank runs the same number of forwards
            (FSDP); ``None`` for exactly what ``images`` needs.
        progress: show a progress bar over timesteps.
    """
    from tqdm import tqdm

    T = model.noise_schedule.num_timesteps
    t_grid, weights = vlb_timesteps(T, num_terms, seed)
    device = next(model.parameters()).device
    n = images.shape[0]
    needed = math.ceil(n / batch_size)
    num_batches = needed if num_batches is None else num_batches
    total = torch.zeros(n, dtype=torch.float64)
    for t, w in tqdm(
        list(zip(t_grid.tolist(), weights.tolist(), strict=True)), desc='bits/dim', disable=not progress, leave=False
    ):
        gen = keyed_generator(seed, t)
        noise = torch.randn(tuple(images.shape), generator=gen)
        for b in range(num_batches):
            rows = slice(b * batch_size, (b + 1) * batch_size)
            x0 = images[rows]
            padding = x0.shape[0] == 0
            if padding:
                rows = slice(0, 1)
                x0 = images[rows] if n else torch.zeros((1, *images.shape[1:]))
            eps = noise[rows] if n else torch.zeros_like(x0)
            cond = {key: v[rows].to(device) for key, v in (conditioning or {}).items()}
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
            terms = model.vlb_terms(x0.to(device), tt, eps.to(device), cond or None).double().cpu()
            if not padding:
                total[rows] += w * terms
    if n:
        for start in range(0, n, batch_size):
            prior = model.prior_term(images[start : start + batch_size].to(device))
            total[start : start + batch_size] += prior.double().cpu()
    return total / math.log(2)
