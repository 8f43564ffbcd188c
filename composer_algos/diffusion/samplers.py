"""Timestep samplers: the replaceable distribution over t that a DiffusionModel trains on.

Every sampler is a distribution over the T discrete timesteps. ``probs(x0)`` returns ``(T,)`` (the same for the
whole batch) or ``(B, T)`` (per sample). The model multiplies it by any curriculum priors, normalises, draws t
by inverse CDF at its own keyed uniforms, and, for samplers that declare ``importance = True``, weights the loss by
``q(t) / p(t)`` where ``q`` is the prior-tilted uniform target (``1 / (T p(t))`` without priors), so the
expected loss is that of the target distribution.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = [
    'TimestepSampler',
    'UniformSampler',
    'FixedDistributionSampler',
    'TimestepPrior',
    'combined_prior',
    'sample_from_probs',
    'tilt',
    'tilt_log_probs',
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

    def set_loss_weights(self, weights: torch.Tensor) -> None:
        """The model's loss weight ``w(t)`` of every timestep ``(T,)``, given whenever its weightings change.

        Samplers whose distribution depends on how the loss is weighted override this; the default ignores it.
        """

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


def combined_prior(priors: Sequence[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """The product of ``(T,)`` priors (negative masses clipped to 0) on ``like``'s device and dtype; ``None`` if none."""
    combined = None
    for prior in priors:
        prior = prior.to(like.device, like.dtype).clamp(min=0)
        combined = prior if combined is None else combined * prior
    return combined


def tilt_log_probs(log_probs: torch.Tensor, prior: Optional[torch.Tensor]) -> torch.Tensor:
    """Log of the normalised product ``p(t) * prior(t)`` for ``(T,)`` or ``(B, T)`` log-probabilities.

    Where the product vanishes everywhere (the prior disjoint from the distribution's support, or without mass) the
    distribution itself is kept, so the result is always a valid distribution. Differentiable in ``log_probs``.
    """
    if prior is not None:
        prior = prior.to(log_probs.device, log_probs.dtype)
        has_mass = (log_probs.exp() * prior).sum(-1, keepdim=True) > 0
        log_probs = log_probs + torch.log(torch.where(has_mass, prior, torch.ones_like(prior)))
    return log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)


def tilt(probs: torch.Tensor, priors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multiply a ``(T,)`` or ``(B, T)`` distribution by ``(T,)`` priors and renormalise over the last dim (see
    :func:`tilt_log_probs`)."""
    return tilt_log_probs(torch.log(probs), combined_prior(priors, probs)).exp()


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
