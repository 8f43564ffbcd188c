"""Rectified flow (flow matching): the schedule in the convention of SD3 and diffusers, its shift and its grids.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3, ICML 2024, arXiv
2403.03206) and diffusers' ``FlowMatchEulerDiscreteScheduler``. With the noise level sigma in [0, 1]::

    x_sigma = (1 - sigma) x0 + sigma eps,    target v = eps - x0,    prediction = denoiser(x_sigma, sigma * N)

with ``N = num_train_timesteps`` (1000): the denoiser sees the timestep ``sigma * 1000``, diffusers' SD3 convention.
Generation integrates ``dx / dsigma = v`` from sigma = 1 (pure noise) to 0.

A shift ``s`` moves every noise level up, ``sigma' = s sigma / (1 + (s - 1) sigma)``: fixed (SD3 uses 3.0 at
1024x1024), or from the image's sequence length (Flux): ``mu`` interpolated linearly in the number of tokens
``(H / patch_size) (W / patch_size)`` between ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len``,
``s = exp(mu)`` (diffusers' exponential time shift ``e^mu / (e^mu + 1 / sigma - 1)`` is the same map).

Timestep algorithms see sigma through a grid of ``num_cells`` equal cells of [0, 1] (the contract's T): a timestep
sampler's distribution is a mass per cell, cell ``k`` holding ``k / K <= sigma < (k + 1) / K``, and the forward
outputs' ``t`` is the cell of each drawn sigma (with K = N = 1000 that is the diffusers timestep rounded down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ['FlowSchedule', 'resolution_shift', 'shift_sigmas', 'unshift_sigmas']


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``s sigma / (1 + (s - 1) sigma)``: increasing on [0, 1], fixing 0 and 1; the identity for ``s = 1``.

    Example:
        >>> shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0)
        tensor([0.0000, 0.7500, 1.0000])
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of :func:`shift_sigmas`: ``sigma / (s - (s - 1) sigma)``."""
    return sigma / (shift - (shift - 1) * sigma)


def resolution_shift(
    seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256, max_seq_len: int = 4096
) -> float:
    """Flux's shift for an image of ``seq_len`` tokens: ``exp(mu)``, ``mu`` linear in ``seq_len`` through
    ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)`` (extrapolated outside them).

    Example:
        >>> round(resolution_shift(256), 4), round(resolution_shift(4096), 4)
        (1.6487, 3.1582)
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (seq_len - base_seq_len))


class FlowSchedule:
    """The rectified-flow schedule of a :class:`~composer_algos.diffusion.FlowMatchingModel` (see the module docstring).

    Args:
        shift: the fixed shift ``s`` (1: none; SD3 uses 3.0).
        resolution_shift: take the shift from each image's sequence length instead (Flux), with the next five
            arguments.
        base_shift: ``mu`` at ``base_seq_len`` tokens.
        max_shift: ``mu`` at ``max_seq_len`` tokens.
        base_seq_len: tokens of the base resolution.
        max_seq_len: tokens of the largest resolution.
        patch_size: pixels (or latent cells) per token a side: an ``H x W`` input has ``(H / p) (W / p)`` tokens.
        num_cells: cells of the sampling grid on sigma (the contract's number of timesteps T).
        num_train_timesteps: the denoiser sees ``sigma * num_train_timesteps``; the generation grid ends where
            diffusers' scheduler of that many training timesteps ends.

    Example:
        >>> s = FlowSchedule(shift=3.0)
        >>> s.inference_sigmas(4)[[0, -1]]
        tensor([1., 0.], dtype=torch.float64)
    """

    kind = 'flow_matching'
    # What a rectified flow trains the denoiser to predict: the velocity, only.
    prediction_types: tuple[str, ...] = ('velocity',)

    def __init__(
        self,
        shift: float = 1.0,
        resolution_shift: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_seq_len: int = 256,
        max_seq_len: int = 4096,
        patch_size: int = 2,
        num_cells: int = 1000,
        num_train_timesteps: int = 1000,
    ):
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f'shift must be positive and finite, got {shift}.')
        value: float
        for name, value in (
            ('base_seq_len', base_seq_len),
            ('max_seq_len', max_seq_len),
            ('patch_size', patch_size),
            ('num_cells', num_cells),
            ('num_train_timesteps', num_train_timesteps),
        ):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value!r}.')
        if max_seq_len <= base_seq_len:
            raise ValueError(f'max_seq_len ({max_seq_len}) must exceed base_seq_len ({base_seq_len}).')
        for name, value in (('base_shift', base_shift), ('max_shift', max_shift)):
            if not math.isfinite(value):
                raise ValueError(f'{name} must be finite, got {value}.')
        if num_cells < 2:
            raise ValueError(f'num_cells must be at least 2, got {num_cells}.')
        self.shift = float(shift)
        self.resolution_shift = bool(resolution_shift)
        self.base_shift = float(base_shift)
        self.max_shift = float(max_shift)
        self.base_seq_len = int(base_seq_len)
        self.max_seq_len = int(max_seq_len)
        self.patch_size = int(patch_size)
        self.num_cells = int(num_cells)
        self.num_train_timesteps = int(num_train_timesteps)

    def __repr__(self) -> str:
        shift = (
            f'resolution_shift=True, base_shift={self.base_shift}, max_shift={self.max_shift}, '
            f'patch_size={self.patch_size}'
            if self.resolution_shift
            else f'shift={self.shift}'
        )
        return f'FlowSchedule({shift}, num_cells={self.num_cells}, num_train_timesteps={self.num_train_timesteps})'

    @property
    def num_timesteps(self) -> int:
        """T of the contract: the cells of the sampling grid."""
        return self.num_cells

    # ------------------------------------------------------------------------------------------------ shift
    def shift_for(self, shape: Sequence[int] | None = None) -> float:
        """The shift for samples of ``shape`` (``(..., H, W)``); the fixed one unless ``resolution_shift``."""
        if not self.resolution_shift:
            return self.shift
        if shape is None or len(shape) < 2:
            raise ValueError('A resolution-dependent shift needs the image shape (..., height, width).')
        height, width = int(shape[-2]), int(shape[-1])
        seq_len = max(height // self.patch_size, 1) * max(width // self.patch_size, 1)
        return resolution_shift(seq_len, self.base_shift, self.max_shift, self.base_seq_len, self.max_seq_len)

    # ------------------------------------------------------------------------------------------------ grid
    def cell_edges(self) -> torch.Tensor:
        """``(K + 1,)`` float64 edges ``k / K`` of the grid's cells."""
        return torch.arange(self.num_cells + 1, dtype=torch.float64) / self.num_cells

    def cell_centres(self) -> torch.Tensor:
        """``(K,)`` float64 centres ``(k + 0.5) / K``: the sigma a cell stands for."""
        return (torch.arange(self.num_cells, dtype=torch.float64) + 0.5) / self.num_cells

    def cells(self, sigma: torch.Tensor) -> torch.Tensor:
        """The cell of each sigma, ``floor(sigma K)`` within ``[0, K - 1]``, as long."""
        return torch.floor(sigma.double() * self.num_cells).long().clamp(0, self.num_cells - 1)

    # ------------------------------------------------------------------------------------------------ objective
    @staticmethod
    def _view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.to(like.device, like.dtype).reshape(sigma.shape + (1,) * (like.dim() - sigma.dim()))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma eps``."""
        s = self._view(sigma, x0)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity ``eps - x0``."""
        return noise - x0

    def predict_x0_eps(
        self, x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(x0, eps)`` a velocity implies at ``x``: ``x - sigma v`` and ``x + (1 - sigma) v``."""
        s = self._view(sigma, x)
        return x - s * velocity, x + (1 - s) * velocity

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the denoiser sees: ``sigma * num_train_timesteps`` (float)."""
        return sigma.float() * self.num_train_timesteps

    # ------------------------------------------------------------------------------------------------ sampling
    def inference_sigmas(self, num_steps: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """``(num_steps + 1,)`` float64 noise levels from 1 down to 0 for an ODE solver, as diffusers' scheduler.

        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` spaces ``num_steps`` levels evenly from 1 to its smallest
        training sigma (``1 / N``, shifted by a fixed shift, unshifted when the shift is resolution-dependent), shifts
        them and appends 0; this gives the same numbers for the same settings.
        """
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}.')
        shift = self.shift_for(shape)
        smallest = torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64)
        end = smallest if self.resolution_shift else shift_sigmas(smallest, shift)
        levels = shift_sigmas(torch.linspace(1.0, float(end), int(num_steps), dtype=torch.float64), shift)
        return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])
