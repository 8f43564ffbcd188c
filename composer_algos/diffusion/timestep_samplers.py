"""Timestep samplers: the replaceable distribution over t that a DiffusionModel trains on.

Every sampler is a distribution over the T discrete timesteps (for a flow-matching model: over the T cells of its
grid on sigma, see :mod:`composer_algos.diffusion.flow`). ``probs(x0)`` returns ``(T,)`` (the same for the
whole batch) or ``(B, T)`` (per sample). The model multiplies it by any curriculum priors, normalises, draws t
by inverse CDF at its own keyed uniforms, and, for samplers that declare ``importance = True``, weights the loss by
``q(t) / p(t)`` where ``q`` is the prior-tilted uniform target (``1 / (T p(t))`` without priors), so the
expected loss is that of the target distribution.

Continuous time (flow matching): a distribution drawn on the grid is piecewise constant, and
:func:`sample_within_cells` draws a cell by inverse CDF at ``u`` and the position inside it from the same ``u`` (its
place within the cell's CDF interval), which is the exact inverse CDF of that piecewise-constant density. A
:class:`ContinuousTimestepSampler` holds a closed-form density; untilted, the model draws from its exact inverse CDF.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from composer_algos.diffusion.densities import TimeDensity, grid_masses
from composer_algos.diffusion.flow import FlowSchedule, shift_sigmas, unshift_sigmas

__all__ = [
    'TimestepSampler',
    'UniformSampler',
    'FixedDistributionSampler',
    'TimestepPrior',
    'ContinuousTimestepSampler',
    'combined_prior',
    'sample_from_probs',
    'sample_within_cells',
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

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def importance_weights(self, ratios: torch.Tensor) -> torch.Tensor:
        """The loss weights of a batch's draws from their ratios ``q(t) / p(t)`` (samplers with ``importance``).

        The default uses the ratios themselves; a sampler may clip or normalise them over the batch.
        """
        return ratios

    def set_loss_weights(self, weights: torch.Tensor) -> None:
        """The model's loss weight ``w(t)`` of every timestep ``(T,)``, given whenever its weightings change.

        Samplers whose distribution depends on how the loss is weighted override this; the default ignores it.
        """

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_timesteps={self.num_timesteps})'


class UniformSampler(TimestepSampler):
    """The DDPM default: every timestep equally likely."""

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        device = x0.device if x0 is not None else None
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=device)


class FixedDistributionSampler(TimestepSampler):
    """A sampler given by a fixed ``(T,)`` probability vector (densities evaluated on the grid)."""

    def __init__(self, probs: torch.Tensor, importance: bool = False):
        super().__init__(probs.numel())
        _check_probs(probs, 'probs')
        self._probs = (probs / probs.sum()).float()
        self.importance = importance

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        return self._probs if x0 is None else self._probs.to(x0.device)


class ContinuousTimestepSampler(TimestepSampler):
    """A closed-form density of the time ``u`` on [0, 1], shifted into the noise level ``sigma`` by the schedule.

    ``sigma = shift(u)`` with the schedule's shift for the batch's image size, so for a fixed density the cell masses
    on sigma depend on the shift only: ``p_k = F(shift^-1((k + 1) / K)) - F(shift^-1(k / K))``. :meth:`inverse_cdf`
    is the exact draw ``shift(F^-1(v))``, used when no prior tilts the sampler.

    Args:
        density: the density of ``u`` (:mod:`composer_algos.diffusion.densities`).
        schedule: the model's :class:`~composer_algos.diffusion.flow.FlowSchedule` (grid and shift).
    """

    def __init__(self, density: TimeDensity, schedule: FlowSchedule):
        super().__init__(schedule.num_timesteps)
        self.density = density
        self.schedule = schedule
        self._cache: tuple[float, torch.Tensor] | None = None

    def shift(self, x0: torch.Tensor | None) -> float:
        return self.schedule.shift_for(None if x0 is None else tuple(x0.shape))

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        shift = self.shift(x0)
        if self._cache is None or self._cache[0] != shift:
            edges = unshift_sigmas(self.schedule.cell_edges(), shift)
            self._cache = (shift, grid_masses(self.density, edges).float())
        probs = self._cache[1]
        return probs if x0 is None else probs.to(x0.device)

    def inverse_cdf(self, v: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The noise levels ``shift(F^-1(v))`` (float64) at uniforms ``v``."""
        return shift_sigmas(self.density.inverse_cdf(v), self.shift(x0))

    def __repr__(self) -> str:
        return f'ContinuousTimestepSampler(density={self.density!r}, schedule={self.schedule!r})'


def _check_probs(p: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f'{name} must be finite, non-negative and not all zero.')


def combined_prior(priors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """The product of ``(T,)`` priors (negative masses clipped to 0) on ``like``'s device and dtype; ``None`` if
    none."""
    combined = None
    for raw in priors:
        prior = raw.to(like.device, like.dtype).clamp(min=0)
        combined = prior if combined is None else combined * prior
    return combined


def tilt_log_probs(log_probs: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
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
    t = (
        torch.searchsorted(cdf, u, right=True)
        if p.dim() == 1
        else torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    )
    return t.clamp(max=p.shape[-1] - 1)


def sample_within_cells(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells drawn from ``(T,)`` or ``(B, T)`` probabilities by inverse CDF at ``u`` ``(B,)``, and the position of each
    draw inside its cell in [0, 1): where ``u`` falls within the cell's CDF interval.

    ``(cell + position) / T`` is then the exact inverse CDF of the piecewise-constant density with these cell masses:
    one uniform gives both. Returns ``(cells, positions)``, long and float64.

    Example:
        >>> sample_within_cells(torch.tensor([0.5, 0.0, 0.5]), torch.tensor([0.25, 0.75]))
        (tensor([0, 2]), tensor([0.5000, 0.5000], dtype=torch.float64))
    """
    cells = sample_from_probs(probs, u)
    p = probs.detach().to(cells.device, torch.float64)
    cdf = p.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    if p.dim() == 1:
        upper, mass = cdf[cells], p[cells] / p.sum()
    else:
        upper = cdf.gather(1, cells[:, None]).squeeze(1)
        mass = (p / p.sum(-1, keepdim=True)).gather(1, cells[:, None]).squeeze(1)
    u = u.to(cells.device, torch.float64)
    position = 1 - (upper - u) / mass.clamp(min=torch.finfo(torch.float64).tiny)
    return cells, position.clamp(0, 1 - torch.finfo(torch.float64).eps)
