"""The adaptive sampler's policies over timesteps (arXiv 2411.09998), their REINFORCE update and their sampler."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_algos.algorithms.adaptive_timestep_sampling.functional import (
    beta_grid_log_probs,
    clipped_importance_weights,
    kl_divergence,
    mix_with_uniform,
    reinforce_loss,
    standardised,
)
from composer_algos.diffusion.timestep_samplers import FixedDistributionSampler, TimestepSampler, tilt_log_probs
from composer_algos.diffusion.utils import module_device
from composer_algos.distributed import all_reduce, rank_world

__all__ = [
    'CONCENTRATIONS',
    'NORMALIZATIONS',
    'BetaPolicy',
    'FrozenSampler',
    'GlobalPolicy',
    'PolicyLearner',
    'PolicySampler',
]

log = logging.getLogger(__name__)

# How the Beta policy's head maps to the Beta's parameters: softplus above a floor (the paper's code), or the
# discretised Beta's natural parameters alpha - 1 and beta - 1 themselves.
CONCENTRATIONS = ('softplus', 'natural')
# What the policy gradient multiplies: the raw reward, or the reward standardised by the batch's or running moments.
NORMALIZATIONS = ('none', 'batch', 'running')


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

    def __init__(
        self,
        width: int = 32,
        resolution: int = 16,
        concentration: str = 'natural',
        initial_concentration: float = 1.0,
        floor: float = 1e-5,
    ):
        super().__init__()
        if concentration not in CONCENTRATIONS:
            raise ValueError(f'concentration must be one of {CONCENTRATIONS}, got {concentration!r}.')
        if concentration == 'softplus' and not initial_concentration > floor:
            raise ValueError(f'initial_concentration ({initial_concentration}) must exceed the floor ({floor}).')
        self.resolution = int(resolution)
        self.concentration = concentration
        self.floor = float(floor)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8 * width, width), nn.SiLU(), nn.Linear(width, 2))
        out = self.head[-1]
        # Small (not zero) weights: the policy starts within ~1e-3 of its initial Beta and every layer gets a gradient.
        nn.init.normal_(out.weight, std=1e-3)
        bias = (
            _softplus_inverse(initial_concentration - self.floor)
            if concentration == 'softplus'
            else initial_concentration - 1.0
        )
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
    """The timestep sampler installed in the model: the policy's per-sample ``(B, T)`` distribution, without grad.

    Args:
        policy: the policy.
        num_timesteps: T.
        uniform_mix: ``eps``: t is drawn from ``(1 - eps) pi + eps U`` (0: the policy itself).
        importance: weight each draw's loss by ``1 / (T p(t | x))`` (towards the prior-tilted uniform under a
            curriculum), clipped at ``importance_clip`` and normalised to mean 1 over the batch, so that the objective
            stays uniform's and only the variance of its gradient changes.
        importance_clip: the largest weight before the normalisation.
    """

    def __init__(
        self,
        policy: BetaPolicy | GlobalPolicy,
        num_timesteps: int,
        uniform_mix: float = 0.0,
        importance: bool = False,
        importance_clip: float = 10.0,
    ):
        super().__init__(num_timesteps)
        self.policy = policy
        self.uniform_mix = float(uniform_mix)
        self.importance = bool(importance)
        self.importance_clip = float(importance_clip)

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        if x0 is None:
            raise ValueError('The adaptive timestep sampler gives per-sample probabilities; pass the batch (x0).')
        device = module_device(self.policy)
        # Outside autocast: t is drawn from the same fp32 distribution whose log-probabilities REINFORCE uses.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            log_probs = mix_with_uniform(self.policy.log_probs(x0.to(device), self.num_timesteps), self.uniform_mix)
            return log_probs.exp().to(x0.device)

    def importance_weights(self, ratios: torch.Tensor) -> torch.Tensor:
        """``ratios`` clipped at ``importance_clip``, then divided by their mean over the batch
        (:func:`~.functional.clipped_importance_weights`)."""
        return clipped_importance_weights(ratios, self.importance_clip)

    def __repr__(self) -> str:
        return (
            f'PolicySampler(policy={type(self.policy).__name__}, num_timesteps={self.num_timesteps}, '
            f'uniform_mix={self.uniform_mix}, importance={self.importance})'
        )


class FrozenSampler(TimestepSampler):
    """A fixed ``(T,)`` distribution that a checkpoint can replace in place (the sampler stays installed)."""

    def __init__(self, distribution: torch.Tensor):
        super().__init__(distribution.numel())
        self.load(distribution)

    def load(self, distribution: torch.Tensor) -> None:
        self.fixed = FixedDistributionSampler(distribution)

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        return self.fixed.probs(x0)


class PolicyLearner:
    """A policy over timesteps with its own Adam, updated by REINFORCE from per-sample rewards.

    Each update minimises :func:`~.functional.reinforce_loss` (the entropy bonus inside the reward, as in the paper's
    code) on the distribution t was drawn from: the policy mixed with uniform (``uniform_mix``) and tilted by the
    curriculum's prior. Every rank holds the same policy, optimizer and statistics: each update averages the gradients
    over ranks and every decision is taken on global sums, so they stay equal.

    Args:
        policy: a :class:`BetaPolicy` or :class:`GlobalPolicy`.
        num_timesteps: T.
        lr: the Adam learning rate.
        grad_clip: maximum norm of the (rank-averaged) gradient.
        normalize: the advantage: ``'none'`` (the raw reward, no baseline), ``'batch'`` (standardised with the mean
            and standard deviation of the global batch) or ``'running'`` (standardised with running moments of the
            rewards, an exponential average over updates with weight ``RUNNING_DECAY`` on the past, bias-corrected).
        entropy_coef: weight of the entropy bonus.
        uniform_mix: ``eps`` of the distribution t is drawn from, ``(1 - eps) pi + eps U``.
        max_kl: a trust region: after the Adam step, the step is halved (up to ``MAX_HALVINGS`` times, then undone)
            until the policy's mean ``KL(pi_old || pi_new)`` over the global batch is at most ``max_kl`` nats; 0: off.
    """

    RUNNING_DECAY = 0.9
    MAX_HALVINGS = 10

    def __init__(
        self,
        policy: BetaPolicy | GlobalPolicy,
        num_timesteps: int,
        lr: float,
        grad_clip: float,
        normalize: str,
        entropy_coef: float,
        uniform_mix: float = 0.0,
        max_kl: float = 0.0,
    ):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f'normalize must be one of {NORMALIZATIONS}, got {normalize!r}.')
        self.policy = policy
        self.num_timesteps = int(num_timesteps)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.grad_clip = float(grad_clip)
        self.normalize = normalize
        self.entropy_coef = float(entropy_coef)
        self.uniform_mix = float(uniform_mix)
        self.max_kl = float(max_kl)
        self.num_updates = 0
        self.num_skipped = 0
        # Exponential averages over updates of 1 and of the global batch's mean and E[R^2] (``'running'``).
        self.reward_moments = torch.zeros(3, dtype=torch.float64)

    def place(self, device: torch.device) -> None:
        """Move the policy and its Adam state to ``device``, in place (the sampler keeps the same objects)."""
        if module_device(self.policy) == device:
            return
        self.policy.to(device)
        for param_state in self.optimizer.state.values():
            for key, value in param_state.items():
                if torch.is_tensor(value) and key != 'step':
                    param_state[key] = value.to(device)

    def log_probs(self, x0: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the distribution t is drawn from (the policy mixed with uniform and tilted
        by ``prior``), with grad."""
        policy_log_probs = self.policy.log_probs(x0.to(module_device(self.policy)), self.num_timesteps)
        return tilt_log_probs(mix_with_uniform(policy_log_probs, self.uniform_mix), prior)

    def advantages(self, reward: torch.Tensor, mean: float, second_moment: float) -> torch.Tensor:
        """This rank's advantages from its finite rewards and the global batch's mean and ``E[R^2]`` (see
        ``normalize``); updates the running moments."""
        if self.normalize == 'none':
            return reward
        if self.normalize == 'running':
            decay = self.RUNNING_DECAY
            self.reward_moments = decay * self.reward_moments + (1 - decay) * self.reward_moments.new_tensor(
                [1.0, mean, second_moment]
            )
            # The first entry is the weight the average has accumulated, 1 - decay^k: dividing by it corrects the
            # average's bias towards its zero start, as Adam does.
            mean, second_moment = (self.reward_moments[1:] / self.reward_moments[0]).tolist()
        std = math.sqrt(max(second_moment - mean * mean, 0.0))
        return standardised(reward, mean, std)

    def update(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        reward: torch.Tensor,
        prior: torch.Tensor | None = None,
        loss_finite: bool = True,
        number: int = 0,
    ) -> dict[str, float]:
        """One REINFORCE step on the policy from this rank's ``(x0, t, reward)`` (collective across ranks).

        A non-finite loss, reward or averaged gradient on any rank skips the step on every rank (probe ``number`` is
        named in the warning). Returns the metrics to log.
        """
        device = module_device(self.policy)
        reward = reward.to(device, torch.float64)
        finite = torch.isfinite(reward)
        clean = torch.where(finite, reward, torch.zeros_like(reward))
        bad = float(not (loss_finite and bool(finite.all())))
        stats = all_reduce(
            torch.stack(
                [clean.sum(), (clean * clean).sum(), clean.new_tensor(float(clean.numel())), clean.new_tensor(bad)]
            )
        )
        ok = float(stats[3]) == 0
        count = max(float(stats[2]), 1.0)
        mean = float(stats[0]) / count
        second_moment = float(stats[1]) / count
        std = math.sqrt(max(second_moment - mean * mean, 0.0))
        advantage = self.advantages(clean, mean, second_moment) if ok else torch.zeros_like(clean)

        x0 = x0.to(device)
        policy_log_probs = self.policy.log_probs(x0, self.num_timesteps)
        sample_log_probs = tilt_log_probs(mix_with_uniform(policy_log_probs, self.uniform_mix), prior)
        loss, entropy = reinforce_loss(sample_log_probs, t, advantage, self.entropy_coef, policy_log_probs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.policy.parameters())
        flat = (
            all_reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
            / rank_world()[1]
        )
        ok = ok and bool(torch.isfinite(flat).all())
        step_kl = 0.0
        if ok:
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            before = [p.detach().clone() for p in params] if self.max_kl > 0 else None
            self.optimizer.step()
            if before is not None:
                step_kl = self._stay_within_trust_region(x0, policy_log_probs.detach(), before)
            self.num_updates += 1
        else:
            self.num_skipped += 1
            log.warning(
                'AdaptiveTimestepSampling: non-finite loss, reward or policy gradient at probe %d; the policy '
                'update was skipped (policy and optimizer unchanged).',
                number,
            )
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            marginal = sample_log_probs.exp().mean(0)
            steps = torch.arange(self.num_timesteps, device=device, dtype=marginal.dtype)
            metrics = {
                'adaptive/reward': mean if ok else float('nan'),
                'adaptive/reward_std': std if ok else float('nan'),
                'adaptive/mean_t': float((marginal * steps).sum()),
                'adaptive/entropy': float(-torch.special.xlogy(marginal, marginal).sum()),
                'adaptive/policy_entropy': float(entropy),
                'adaptive/policy_loss': float(loss),
                'adaptive/updates': self.num_updates,
                'adaptive/skipped': self.num_skipped,
            }
            if self.max_kl > 0:
                metrics['adaptive/step_kl'] = step_kl
            return metrics

    @torch.no_grad()
    def _stay_within_trust_region(
        self, x0: torch.Tensor, old_log_probs: torch.Tensor, before: list[torch.Tensor]
    ) -> float:
        """Shrink the step just taken until the mean KL over the global batch is within ``max_kl``; return it."""
        params = list(self.policy.parameters())
        after = [p.detach().clone() for p in params]
        scale = 1.0
        for _ in range(self.MAX_HALVINGS + 1):
            new_log_probs = self.policy.log_probs(x0, self.num_timesteps)
            kl = kl_divergence(old_log_probs, new_log_probs).double()
            total = all_reduce(torch.stack([kl.sum(), kl.new_tensor(float(kl.numel()))]))
            mean_kl = float(total[0]) / max(float(total[1]), 1.0)
            if mean_kl <= self.max_kl:
                return mean_kl
            scale /= 2
            for p, b, a in zip(params, before, after, strict=True):
                p.copy_(b + scale * (a - b))
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            'policy': _to_cpu(self.policy.state_dict()),
            'optimizer': _to_cpu(self.optimizer.state_dict()),
            'num_updates': self.num_updates,
            'num_skipped': self.num_skipped,
            'reward_moments': self.reward_moments.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load in place: the sampler installed in the model keeps using the same policy object."""
        device = module_device(self.policy)
        self.policy.load_state_dict(state['policy'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.place(device)
        self.num_updates = int(state['num_updates'])
        self.num_skipped = int(state['num_skipped'])
        self.reward_moments = state.get('reward_moments', torch.zeros(3)).clone().double()


def _to_cpu(value: Any) -> Any:
    """A copy of a nested state with every tensor on the CPU (tensors and Python primitives only)."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
