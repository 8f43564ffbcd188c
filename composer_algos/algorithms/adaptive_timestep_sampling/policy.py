"""The adaptive sampler's policies over timesteps and the sampler that installs one in the model."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from composer_algos.algorithms.adaptive_timestep_sampling.functional import beta_grid_log_probs
from composer_algos.diffusion.timestep_samplers import TimestepSampler
from composer_algos.diffusion.utils import module_device

__all__ = ['CONCENTRATIONS', 'BetaPolicy', 'GlobalPolicy', 'PolicySampler']

# How the Beta policy's head maps to the Beta's parameters: softplus above a floor (the paper's code), or the
# discretised Beta's natural parameters alpha - 1 and beta - 1 themselves.
CONCENTRATIONS = ('softplus', 'natural')


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class BetaPolicy(nn.Module):
    """A small CNN on x0 giving a per-sample (discretised) Beta(alpha, beta) over ``u = t / T``.

    Each channel is encoded by the same convolutions (after average pooling to at most ``resolution`` pixels a side)
    and the codes are pooled over channels by mean and max, so one policy fits 1-channel digits, RGB images and
    4-channel latents of any size without knowing their shape in advance.

    Args:
        width: channels of the convolutions and the hidden layer.
        resolution: inputs larger than this (per side) are average-pooled down first, which bounds the cost.
        concentration: ``'softplus'``: ``alpha = softplus(z) + floor`` (the paper's code, floor 1e-5). As alpha
            nears the floor the discretised distribution stops changing (it tends to ``p(t) ∝ 1 / u_t``) and the
            gradient in z vanishes: a policy that gets there freezes. ``'natural'``: ``alpha - 1 = z``: the
            discretised Beta ``p(t) ∝ u_t^(alpha-1) (1-u_t)^(beta-1)`` is an exponential family in ``(alpha - 1,
            beta - 1)``, its log-probabilities are linear in them and need no positivity (the bins avoid u = 0 and
            1), so the gradient vanishes only if the policy becomes a point mass, which the entropy bonus resists.
        initial_concentration: both concentrations at the start (1.0: uniform; the paper's code starts at 0.97).
        floor: the softplus floor.
    """

    def __init__(self, width: int = 32, resolution: int = 16, concentration: str = 'natural',
                 initial_concentration: float = 1.0, floor: float = 1e-5):
        super().__init__()
        if concentration not in CONCENTRATIONS:
            raise ValueError(f'concentration must be one of {CONCENTRATIONS}, got {concentration!r}.')
        if concentration == 'softplus' and not initial_concentration > floor:
            raise ValueError(f'initial_concentration ({initial_concentration}) must exceed the floor ({floor}).')
        self.resolution = int(resolution)
        self.concentration = concentration
        self.floor = float(floor)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 * width, width), nn.SiLU(), nn.Linear(width, 2))
        out = self.head[-1]
        # Small (not zero) weights: the policy starts within ~1e-3 of its initial Beta and every layer gets a gradient.
        nn.init.normal_(out.weight, std=1e-3)
        bias = (_softplus_inverse(initial_concentration - self.floor) if concentration == 'softplus' else
                initial_concentration - 1.0)
        nn.init.constant_(out.bias, bias)

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)``, each of shape ``(B,)``."""
        x = x0.float()
        b, c, h, w = x.shape
        if h > self.resolution or w > self.resolution:
            x = F.adaptive_avg_pool2d(x, (min(h, self.resolution), min(w, self.resolution)))
        codes = self.encoder(x.reshape(b * c, 1, *x.shape[-2:])).reshape(b, c, -1)
        z = self.head(torch.cat([codes.mean(1), codes.amax(1)], dim=1))
        params = F.softplus(z) + self.floor if self.concentration == 'softplus' else 1.0 + z
        return params[:, 0], params[:, 1]

    def log_probs(self, x0: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the discretised Beta of each sample."""
        alpha, beta = self(x0)
        return beta_grid_log_probs(alpha, beta, num_timesteps)


class GlobalPolicy(nn.Module):
    """An unconditional categorical policy: one logit per timestep, starting uniform."""

    def __init__(self, num_timesteps: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(int(num_timesteps)))

    def log_probs(self, x0: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """``(B, T)`` log-probabilities, the same for every sample."""
        if num_timesteps != self.logits.numel():
            raise ValueError(f'GlobalPolicy has {self.logits.numel()} timesteps, asked for {num_timesteps}.')
        return torch.log_softmax(self.logits, 0)[None].expand(x0.shape[0], -1)


class PolicySampler(TimestepSampler):
    """The timestep sampler installed in the model: the policy's per-sample ``(B, T)`` distribution, without grad."""

    def __init__(self, policy: nn.Module, num_timesteps: int):
        super().__init__(num_timesteps)
        self.policy = policy

    def probs(self, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x0 is None:
            raise ValueError('The adaptive timestep sampler gives per-sample probabilities; pass the batch (x0).')
        device = module_device(self.policy)
        # Outside autocast: t is drawn from the same fp32 distribution whose log-probabilities REINFORCE uses.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return self.policy.log_probs(x0.to(device), self.num_timesteps).exp().to(x0.device)

    def __repr__(self) -> str:
        return f'PolicySampler(policy={type(self.policy).__name__}, num_timesteps={self.num_timesteps})'
