"""Timestep samplers: the replaceable distribution over t that a DiffusionModel trains on.

Every sampler is a distribution over the T discrete timesteps. ``probs(x0)`` returns ``(T,)`` (the same for the
whole batch) or ``(B, T)`` (per sample). The model multiplies it by any curriculum priors, normalises, draws t
by inverse CDF at its own keyed uniforms, and, for samplers that declare ``importance = True``, weights the loss by
``q(t) / p(t)`` where ``q`` is the prior-tilted uniform target (``1 / (T p(t))`` without priors), so the
expected loss is that of the target distribution.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    'TimestepSampler',
    'UniformSampler',
    'FixedDistributionSampler',
    'TimestepPrior',
    'sample_from_probs',
    'tilt',
]

# A curriculum prior: given the number of timesteps and a device, a (T,) tensor of non-negative masses.
TimestepPrior = Callable[[int, torch.device], torch.Tensor]


class TimestepSampler:
    """Base class: a distribution over ``num_timesteps`` discrete timesteps.

    Subclasses implement :meth:`probs`. Set ``importance = True`` for samplers whose purpose is variance
    reduction (the loss is then importance-weighted back to the target distribution).
    """

    importance: bool = False

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def probs(self, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_timesteps={self.num_timesteps})'


class UniformSampler(TimestepSampler):
    """The DDPM default: every timestep equally likely."""

    def probs(self, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = x0.device if x0 is not None else None
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=device)


class FixedDistributionSampler(TimestepSampler):
    """A sampler given by a fixed ``(T,)`` probability vector (densities evaluated on the grid)."""

    def __init__(self, probs: torch.Tensor, importance: bool = False):
        super().__init__(probs.numel())
        _check_probs(probs, 'probs')
        self._probs = (probs / probs.sum()).float()
        self.importance = importance

    def probs(self, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._probs if x0 is None else self._probs.to(x0.device)


def _check_probs(p: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f'{name} must be finite, non-negative and not all zero.')


def tilt(probs: torch.Tensor, priors: list[torch.Tensor]) -> torch.Tensor:
    """Multiply a ``(T,)`` or ``(B, T)`` distribution by ``(T,)`` priors and renormalise over the last dim.

    Where the product vanishes everywhere (priors disjoint from the sampler's support) the sampler's own
    distribution is kept, so the result is always a valid distribution.
    """
    out = probs
    for prior in priors:
        out = out * prior.to(out.device, out.dtype)
    z = out.sum(dim=-1, keepdim=True)
    ok = z > 0
    return torch.where(ok, out / z.clamp(min=torch.finfo(out.dtype).tiny), probs / probs.sum(-1, keepdim=True))


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Timesteps drawn from ``(T,)`` or ``(B, T)`` probabilities by inverse CDF at uniforms ``u`` of shape ``(B,)``.

    Runs on ``probs``' device (no copy of the probabilities to the host). A zero-probability bin is never drawn:
    its CDF equals its predecessor's, and the first bin whose CDF exceeds ``u`` is returned.

    Example:
        >>> sample_from_probs(torch.tensor([0.25, 0.0, 0.75]), torch.tensor([0.1, 0.3, 0.99]))
        tensor([0, 2, 2])
    """
    p = probs.detach().to(torch.float64)
    if p.dim() == 2 and p.shape[0] != u.shape[0]:
        raise ValueError(f'Per-sample timestep probabilities have batch {p.shape[0]}, expected {u.shape[0]}.')
    cdf = p.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    u = u.to(p.device, torch.float64)
    t = torch.searchsorted(cdf, u, right=True) if p.dim() == 1 else \
        torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    return t.clamp(max=p.shape[-1] - 1)
