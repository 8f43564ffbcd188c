"""Densities on [0, 1] that timestep samplers draw the time ``u`` from: SD3's uniform, logit-normal, mode and
CosMap (Esser et al., arXiv 2403.03206, section 3.1; diffusers' ``compute_density_for_timestep_sampling``).

Each density gives its CDF and its inverse CDF in closed form (the mode density's CDF by bisection of its inverse),
so a sampler can turn them into cell masses on any grid and draw exactly by inverse CDF. ``u = 1`` is pure noise.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    'CosMapDensity',
    'DENSITIES',
    'LogitNormalDensity',
    'ModeDensity',
    'TimeDensity',
    'UniformDensity',
    'grid_masses',
]


class TimeDensity:
    """A distribution on [0, 1]: :meth:`cdf` and :meth:`inverse_cdf` on float64 tensors."""

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse_cdf(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ', '.join(f'{k}={v!r}' for k, v in vars(self).items())
        return f'{type(self).__name__}({args})'


class UniformDensity(TimeDensity):
    """Every time equally likely (rectified flow's own choice)."""

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        return u.double().clamp(0, 1)

    def inverse_cdf(self, v: torch.Tensor) -> torch.Tensor:
        return v.double().clamp(0, 1)


class LogitNormalDensity(TimeDensity):
    """``logit(u) ~ N(m, s^2)``: SD3's best (m = 0, s = 1); ``m > 0`` favours noisier times."""

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if not math.isfinite(m):
            raise ValueError(f'm must be finite, got {m}.')
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f's must be positive and finite, got {s}.')
        self.m = float(m)
        self.s = float(s)

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr((torch.logit(u.double().clamp(0, 1)) - self.m) / self.s)

    def inverse_cdf(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.m + self.s * torch.special.ndtri(v.double().clamp(0, 1)))


class ModeDensity(TimeDensity):
    """SD3's mode sampling with heavy tails: ``u = f(w)``, ``w`` uniform, ``f(w) = 1 - w - scale (cos^2(pi w / 2) - 1 +
    w)``.

    ``f`` falls from 1 to 0 exactly when ``-1 <= scale <= 2 / (pi - 2)`` (SD3's bound), so it is an inverse CDF read
    backwards: ``F^-1(v) = f(1 - v)``, and ``F(u) = 1 - f^-1(u)`` (by bisection, to float64 precision). ``scale = 0``
    is uniform; SD3 uses 1.29.
    """

    MAX_SCALE = 2 / (math.pi - 2)

    def __init__(self, scale: float = 1.29):
        if not -1.0 <= scale <= self.MAX_SCALE:
            raise ValueError(
                f'scale must be in [-1, 2 / (pi - 2) = {self.MAX_SCALE:.4f}] (else the map is not '
                f'monotone and is no distribution), got {scale}.'
            )
        self.scale = float(scale)

    def _f(self, w: torch.Tensor) -> torch.Tensor:
        return 1 - w - self.scale * (torch.cos(math.pi * w / 2) ** 2 - 1 + w)

    def inverse_cdf(self, v: torch.Tensor) -> torch.Tensor:
        return self._f(1 - v.double().clamp(0, 1)).clamp(0, 1)

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        u = u.double().clamp(0, 1)
        lo, hi = torch.zeros_like(u), torch.ones_like(u)
        for _ in range(60):  # f is decreasing: f(w) > u means the preimage lies above w
            mid = (lo + hi) / 2
            above = self._f(mid) > u
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 1 - (lo + hi) / 2


class CosMapDensity(TimeDensity):
    """SD3's CosMap: ``u = 1 - 1 / (tan(pi w / 2) + 1)`` for uniform ``w``, the density ``2 / (pi (1 - 2u + 2u^2))``.

    Its CDF is ``(2 / pi) atan(u / (1 - u))``.
    """

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        u = u.double().clamp(0, 1)
        return torch.atan2(u, 1 - u) * (2 / math.pi)

    def inverse_cdf(self, v: torch.Tensor) -> torch.Tensor:
        angle = v.double().clamp(0, 1) * (math.pi / 2)
        # 1 - 1 / (tan + 1) = sin / (sin + cos): finite at v = 1.
        return torch.sin(angle) / (torch.sin(angle) + torch.cos(angle))


DENSITIES = {
    'uniform': UniformDensity,
    'logit_normal': LogitNormalDensity,
    'mode': ModeDensity,
    'cosmap': CosMapDensity,
}


def grid_masses(density: TimeDensity, edges: torch.Tensor) -> torch.Tensor:
    """The probability of each cell ``[edges[k], edges[k+1])`` (float64, normalised to sum to 1).

    Example:
        >>> grid_masses(UniformDensity(), torch.tensor([0.0, 0.25, 1.0]))
        tensor([0.2500, 0.7500], dtype=torch.float64)
    """
    cdf = density.cdf(edges.double())
    masses = (cdf[1:] - cdf[:-1]).clamp(min=0)
    return masses / masses.sum()
