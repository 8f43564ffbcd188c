"""Adaptive non-uniform timestep sampling of Kim, Ki, Shim & Lee (CVPR 2025, arXiv 2411.09998).

A policy ``pi_phi(t | x0)`` chooses the timesteps to train on. Every ``update_every`` optimizer steps it is
rewarded, per sample, by how much the diffusion update on that sample reduced the variational bound at a small
set ``S`` of timesteps: ``R_n = sum_{tau in S} [KL_tau(before) - KL_tau(after)]``, and updated by REINFORCE with an
entropy bonus. ``S`` is the ``k`` timesteps whose KL changes best predict the total KL change, by a univariate
F-test over a FIFO queue of per-timestep KL changes of one probe image.

Deviations from the paper and its official code (each fixes a fault of that code or states a choice):
- The Beta density is evaluated at the centres ``(t + 0.5) / T`` of the T bins and normalised over the grid, so
  no timestep gets half weight (rounding a continuous draw gives t=0 and t=T-1 half the mass of the others).
- The same noise is used for the KL terms before and after the step (common random numbers), in eval mode,
  one denoiser forward per term; the code draws fresh noise, probes in train mode with dropout and runs the
  network twice per term.
- The cadence counts global optimizer steps, not batches within an epoch or micro-steps.
- The entropy bonus is part of the policy loss, not added to the reward.
- Rewards are standardised over the global batch (mean subtracted as a baseline, divided by the standard
  deviation) so that the step size does not depend on the KL's scale, which changes by orders of magnitude
  during training; the code uses raw rewards.
- The feature-selection probe uses ``num_probe_timesteps`` evenly spaced timesteps instead of all T, split
  across ranks and all-gathered; every rank holds the same queue, ``S`` and policy (gradients are averaged).
- Everything (policy, its optimizer, the queue, ``S``, counters, per-rank RNG) is saved in checkpoints.
- Curriculum priors tilt the policy: ``p(t | x) ∝ pi(t | x) prior(t)``; the policy gradient uses the log
  probability of that normalised product.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_algos.algorithms.common import diffusion_model, gather_per_rank, pick_rank
from composer_algos.diffusion.samplers import TimestepSampler

__all__ = ['AdaptiveTimestepSampling', 'BetaPolicy', 'GlobalPolicy', 'PolicySampler', 'f_regression_scores',
           'beta_grid_log_probs', 'POLICIES']

log = logging.getLogger(__name__)

POLICIES = ('beta', 'global')
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1 at this x


def beta_grid_log_probs(alpha: torch.Tensor, beta: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """``(B, T)`` log-probabilities of Beta(alpha, beta) evaluated at the bin centres ``(t + 0.5) / T``, normalised."""
    u = (torch.arange(num_timesteps, device=alpha.device, dtype=alpha.dtype) + 0.5) / num_timesteps
    a, b = alpha[:, None], beta[:, None]
    log_density = (a - 1) * torch.log(u) + (b - 1) * torch.log1p(-u)
    return log_density - torch.logsumexp(log_density, dim=1, keepdim=True)


class BetaPolicy(nn.Module):
    """A small CNN on x0 giving a per-sample Beta(alpha, beta) over ``u = t / T``; starts at Beta(1, 1) (uniform).

    Adaptive pooling makes it work for any spatial size and the first convolution for any channel count.
    """

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, _SOFTPLUS_INV_ONE)

    def log_probs(self, x0: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        params = F.softplus(self.head(self.features(x0.float()))) + 1e-3
        return beta_grid_log_probs(params[:, 0], params[:, 1], num_timesteps)


class GlobalPolicy(nn.Module):
    """An unconditional categorical policy: ``num_bins`` logits, each bin spread evenly over its timesteps."""

    def __init__(self, num_timesteps: int, num_bins: Optional[int] = None):
        super().__init__()
        self.num_bins = min(num_bins or num_timesteps, num_timesteps)
        self.logits = nn.Parameter(torch.zeros(self.num_bins))
        bins = torch.arange(num_timesteps) * self.num_bins // num_timesteps
        self.register_buffer('bins', bins, persistent=False)
        self.register_buffer('log_bin_size', torch.bincount(bins, minlength=self.num_bins).float().log(),
                             persistent=False)

    def log_probs(self, x0: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        per_t = torch.log_softmax(self.logits, 0)[self.bins] - self.log_bin_size[self.bins]
        return per_t[None].expand(x0.shape[0], -1)


class PolicySampler(TimestepSampler):
    """The timestep sampler installed in the model: the policy's per-sample distribution, without grad."""

    def __init__(self, policy: nn.Module, num_timesteps: int):
        super().__init__(num_timesteps)
        self.policy = policy

    def probs(self, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x0 is None:
            raise ValueError('The adaptive timestep sampler needs the batch (x0) to give probabilities.')
        with torch.no_grad():
            return self.policy.log_probs(x0.to(_device(self.policy)), self.num_timesteps).exp().to(x0.device)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def f_regression_scores(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Univariate F statistics of each column of ``features`` (n, d) against ``target`` (n,); NaN-free.

    ``F_j = r_j^2 / (1 - r_j^2) * (n - 2)`` with ``r_j`` the correlation of column j with the target (the score of
    scikit-learn's ``f_regression``). Constant columns score 0.
    """
    x = features.double() - features.double().mean(0)
    y = target.double() - target.double().mean()
    denom = x.norm(dim=0) * y.norm()
    r = torch.where(denom > 0, (x * y[:, None]).sum(0) / denom.clamp(min=1e-300), torch.zeros_like(denom))
    r2 = (r * r).clamp(max=1.0 - 1e-15)
    return r2 / (1.0 - r2) * (features.shape[0] - 2)


class AdaptiveTimestepSampling(Algorithm):
    """Learns which timesteps to train on (arXiv 2411.09998); see the module docstring for the method.

    Args:
        update_every: optimizer steps between probes and policy updates.
        num_selected: ``|S|``, timesteps whose KL change makes the reward.
        queue_size: capacity of the FIFO queue for the F-test.
        num_probe_timesteps: evenly spaced timesteps of the feature-selection probe.
        policy: ``'beta'`` (per-sample, a CNN on x0) or ``'global'`` (one categorical distribution).
        num_bins: bins of the global policy (default: T).
        width: channels of the Beta policy's CNN.
        in_channels: channels of x0; default: read from the denoiser's first convolution.
        lr: learning rate of the policy's Adam.
        grad_clip: policy gradient-norm clip.
        entropy_coef: weight of the entropy bonus in the policy loss.
        seed: seed of the policy's initialisation (the same on every rank) and of the probe noise (per rank).

    Example:
        >>> AdaptiveTimestepSampling(update_every=40)
        AdaptiveTimestepSampling(update_every=40, num_selected=3, queue_size=20, num_probe_timesteps=32, policy='beta', lr=0.01, entropy_coef=0.01)
    """

    def __init__(self, update_every: int = 40, num_selected: int = 3, queue_size: int = 20,
                 num_probe_timesteps: int = 32, policy: str = 'beta', num_bins: Optional[int] = None,
                 width: int = 32, in_channels: Optional[int] = None, lr: float = 1e-2, grad_clip: float = 1.0,
                 entropy_coef: float = 1e-2, seed: int = 0):
        for name, value, low in (('update_every', update_every, 1), ('num_selected', num_selected, 1),
                                 ('queue_size', queue_size, 3), ('num_probe_timesteps', num_probe_timesteps, 2),
                                 ('width', width, 1)):
            if int(value) != value or value < low:
                raise ValueError(f'{name} must be an integer >= {low}, got {value!r}.')
        if num_selected > num_probe_timesteps:
            raise ValueError(f'num_selected ({num_selected}) cannot exceed num_probe_timesteps ({num_probe_timesteps}).')
        if policy not in POLICIES:
            raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}.')
        if lr <= 0 or grad_clip <= 0 or entropy_coef < 0:
            raise ValueError('lr and grad_clip must be positive and entropy_coef non-negative, got '
                             f'lr={lr}, grad_clip={grad_clip}, entropy_coef={entropy_coef}.')
        self.update_every = int(update_every)
        self.num_selected = int(num_selected)
        self.queue_size = int(queue_size)
        self.num_probe_timesteps = int(num_probe_timesteps)
        self.policy_kind = policy
        self.num_bins = num_bins
        self.width = int(width)
        self.in_channels = in_channels
        self.lr = float(lr)
        self.grad_clip = float(grad_clip)
        self.entropy_coef = float(entropy_coef)
        self.seed = int(seed)

        self.policy: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.sampler: Optional[PolicySampler] = None
        self.num_timesteps = 0
        self.probe_grid = torch.empty(0, dtype=torch.long)
        self.selected = torch.empty(0, dtype=torch.long)  # indices into probe_grid
        self.queue_x = torch.empty(0, 0, dtype=torch.float64)
        self.queue_y = torch.empty(0, dtype=torch.float64)
        self.num_updates = 0
        self.num_skipped = 0
        self.generator = torch.Generator()
        self._probe: Optional[dict[str, Any]] = None

    def __repr__(self) -> str:
        return (f'AdaptiveTimestepSampling(update_every={self.update_every}, num_selected={self.num_selected}, '
                f'queue_size={self.queue_size}, num_probe_timesteps={self.num_probe_timesteps}, '
                f'policy={self.policy_kind!r}, lr={self.lr}, entropy_coef={self.entropy_coef})')

    @property
    def selected_timesteps(self) -> list[int]:
        """The current set S, as timesteps."""
        return self.probe_grid[self.selected].tolist()

    # --------------------------------------------------------------------------------------------- events
    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.FIT_START, Event.BEFORE_TRAIN_BATCH):
            return True
        return self._probe is not None and event in (Event.AFTER_FORWARD, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        model = diffusion_model(state, self)
        if event == Event.INIT:
            self._setup(model)
        elif event == Event.FIT_START:
            self.policy.to(_model_device(model))
        elif event == Event.BEFORE_TRAIN_BATCH:
            if int(state.timestamp.batch) % self.update_every == 0:
                self._probe_before(state, model)
        elif event == Event.AFTER_FORWARD:
            self._probe['t'].append(state.outputs['t'].detach())
        elif event == Event.BATCH_END:
            self._probe_after_and_update(state, model, logger)
        return None

    def _setup(self, model: Any) -> None:
        self.num_timesteps = model.num_timesteps
        init = torch.random.fork_rng(devices=[])
        with init:
            torch.manual_seed(self.seed)  # the same initial policy on every rank
            if self.policy_kind == 'beta':
                self.policy = BetaPolicy(self.in_channels or _input_channels(model), self.width)
            else:
                self.policy = GlobalPolicy(self.num_timesteps, self.num_bins)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.sampler = PolicySampler(self.policy, self.num_timesteps)
        model.set_timestep_sampler(self.sampler, owner=type(self).__name__)
        self.probe_grid = torch.linspace(0, self.num_timesteps - 1, self.num_probe_timesteps).round().long()
        self.selected = torch.linspace(0, self.num_probe_timesteps - 1, self.num_selected + 2)[1:-1].round().long()
        self.queue_x = torch.empty(0, self.num_probe_timesteps, dtype=torch.float64)
        self.generator.manual_seed(self.seed + 1_000_003 * dist.get_global_rank())

    # --------------------------------------------------------------------------------------------- probe
    def _kl_terms(self, model: Any, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                  conditioning: dict) -> torch.Tensor:
        """``(len(timesteps), B)`` VLB terms, one denoiser forward per timestep, in eval mode."""
        was_training = model.training
        model.eval()
        try:
            rows = []
            for i, step in enumerate(timesteps.tolist()):
                t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
                rows.append(model.vlb_terms(x0, t, noise[i], conditioning).double())
            return torch.stack(rows)
        finally:
            model.train(was_training)

    def _grid_share(self) -> tuple[torch.Tensor, int]:
        """This rank's equal-sized share of the probe grid (padded by repeats) and its number of real entries."""
        world, rank = dist.get_world_size(), dist.get_global_rank()
        per_rank = math.ceil(self.num_probe_timesteps / world)
        index = torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp(max=self.num_probe_timesteps - 1)
        real = max(0, min(per_rank, self.num_probe_timesteps - rank * per_rank))
        return self.probe_grid[index], real

    def _probe_before(self, state: State, model: Any) -> None:
        start = time.perf_counter()
        x0 = model.images(state.batch).detach()
        conditioning = model.conditioning(state.batch)
        tau = self.probe_grid[self.selected]
        noise = torch.randn((len(tau), *x0.shape), generator=self.generator).to(x0.device, x0.dtype)
        # The feature probe: one image, the same on every rank (rank 0's), across this rank's share of the grid.
        grid, real = self._grid_share()
        image = x0[:1].clone()
        image_cond = {k: v[:1].clone() for k, v in conditioning.items()}
        if dist.get_world_size() > 1:
            dist.broadcast(image, src=0)
            for value in image_cond.values():
                dist.broadcast(value, src=0)
        image_batch = image.expand(len(grid), *image.shape[1:])
        grid_cond = {k: v.expand(len(grid), *v.shape[1:]) for k, v in image_cond.items()}
        grid_noise = torch.randn(image_batch.shape, generator=self.generator).to(x0.device, x0.dtype)
        self._probe = {
            'x0': x0, 'conditioning': conditioning, 'tau': tau, 'noise': noise, 'grid': grid, 'real': real,
            'image': image_batch, 'grid_cond': grid_cond, 'grid_noise': grid_noise, 't': [],
            'kl_before': self._kl_terms(model, x0, tau, noise, conditioning),
            'grid_before': self._grid_kl(model, image_batch, grid, grid_noise, grid_cond),
        }
        self._probe['seconds'] = time.perf_counter() - start

    def _grid_kl(self, model: Any, image: torch.Tensor, grid: torch.Tensor, noise: torch.Tensor,
                 conditioning: dict) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model.vlb_terms(image, grid.to(image.device), noise, conditioning).double()
        finally:
            model.train(was_training)

    def _probe_after_and_update(self, state: State, model: Any, logger: Logger) -> None:
        probe, self._probe = self._probe, None
        assert probe is not None
        start = time.perf_counter()
        kl_after = self._kl_terms(model, probe['x0'], probe['tau'], probe['noise'], probe['conditioning'])
        grid_after = self._grid_kl(model, probe['image'], probe['grid'], probe['grid_noise'], probe['grid_cond'])
        reward = (probe['kl_before'] - kl_after).sum(0)  # (B,)
        grid_change = (probe['grid_before'] - grid_after)[:probe['real']]
        self._push_queue(grid_change)
        t = torch.cat(probe['t'])
        metrics = self._update_policy(probe['x0'], t, reward, model, state)
        self._select()
        metrics['adaptive/probe_seconds'] = probe['seconds'] + time.perf_counter() - start
        for i, step in enumerate(self.selected_timesteps):
            metrics[f'adaptive/S{i}'] = step
        logger.log_metrics(metrics)

    # --------------------------------------------------------------------------------------------- selection
    def _push_queue(self, local_change: torch.Tensor) -> None:
        """All-gather the grid's KL changes and append them to the FIFO queue (the same on every rank)."""
        per_rank = math.ceil(self.num_probe_timesteps / dist.get_world_size())
        padded = torch.zeros(per_rank, dtype=torch.float64, device=local_change.device)
        padded[:len(local_change)] = local_change
        gathered = dist.all_gather(padded) if dist.get_world_size() > 1 else [padded]
        row = torch.cat([g.cpu() for g in gathered])[:self.num_probe_timesteps]
        if not bool(torch.isfinite(row).all()):
            warnings.warn('AdaptiveTimestepSampling: non-finite KL change in the feature probe; not queued.')
            return
        self.queue_x = torch.cat([self.queue_x, row[None]])[-self.queue_size:]
        self.queue_y = torch.cat([self.queue_y, row.sum()[None]])[-self.queue_size:]

    def _select(self) -> None:
        if self.queue_x.shape[0] < 3:
            return
        scores = f_regression_scores(self.queue_x, self.queue_y)
        self.selected = torch.sort(torch.topk(scores, self.num_selected).indices).values

    # --------------------------------------------------------------------------------------------- REINFORCE
    def policy_log_probs(self, x0: torch.Tensor, model: Any) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the tilted, normalised sampling distribution, with grad."""
        log_probs = self.policy.log_probs(x0.to(_device(self.policy)), self.num_timesteps)
        for prior in model.timestep_priors(log_probs.device):
            log_probs = log_probs + torch.log(prior.to(log_probs.dtype).clamp(min=1e-30))
        return log_probs - torch.logsumexp(log_probs, dim=1, keepdim=True)

    def _update_policy(self, x0: torch.Tensor, t: torch.Tensor, reward: torch.Tensor, model: Any,
                       state: State) -> dict[str, float]:
        device = _device(self.policy)
        reward = reward.to(device)
        loss_ok = state.loss is None or bool(torch.isfinite(torch.as_tensor(_total_loss(state.loss))).all())
        # Global mean and standard deviation of the reward (collectives run on every rank, finite or not).
        stats = torch.stack([reward.sum(), (reward * reward).sum(), torch.tensor(float(reward.numel()), device=device,
                                                                                  dtype=reward.dtype)])
        stats = torch.nan_to_num(stats, nan=float('inf'))
        if dist.get_world_size() > 1:
            dist.all_reduce(stats)
        finite = loss_ok and bool(torch.isfinite(stats).all()) and bool(torch.isfinite(reward).all())
        count = float(stats[2])
        mean = float(stats[0]) / count if finite else 0.0
        std = math.sqrt(max(float(stats[1]) / count - mean * mean, 0.0)) if finite else 0.0
        advantage = (reward - mean) / (std + 1e-12) if finite else torch.zeros_like(reward)

        self.optimizer.zero_grad(set_to_none=False)
        log_probs = self.policy_log_probs(x0, model)
        chosen = log_probs.gather(1, t.to(device)[:, None]).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(1).mean()
        loss = -(advantage.detach().float() * chosen).mean() - self.entropy_coef * entropy
        loss.backward()
        grads = [p.grad for p in self.policy.parameters()]
        if dist.get_world_size() > 1:
            for g in grads:
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        finite = finite and all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
            self.optimizer.step()
            self.num_updates += 1
        else:
            self.num_skipped += 1
            warnings.warn('AdaptiveTimestepSampling: non-finite loss, reward or policy gradient; the policy update '
                          f'at step {int(state.timestamp.batch)} was skipped (policy unchanged).')
        self.optimizer.zero_grad(set_to_none=False)
        with torch.no_grad():
            marginal = log_probs.exp().mean(0)
            steps = torch.arange(self.num_timesteps, device=device, dtype=marginal.dtype)
            return {
                'adaptive/reward': mean,
                'adaptive/reward_std': std,
                'adaptive/mean_t': float((marginal * steps).sum()),
                'adaptive/entropy': float(entropy),
                'adaptive/updates': self.num_updates,
                'adaptive/skipped': self.num_skipped,
            }

    # --------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            'policy': {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()},
            'optimizer': self.optimizer.state_dict(),
            'selected': self.selected.clone(),
            'queue_x': self.queue_x.clone(),
            'queue_y': self.queue_y.clone(),
            'num_updates': self.num_updates,
            'num_skipped': self.num_skipped,
            'generators': gather_per_rank(self.generator.get_state()),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        if self.policy is None:
            raise RuntimeError('AdaptiveTimestepSampling must see Event.INIT before its state is loaded.')
        # In place, so the sampler installed in the model keeps using the same policy and optimizer.
        self.policy.load_state_dict(state['policy'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.selected = state['selected'].clone()
        self.queue_x = state['queue_x'].clone()
        self.queue_y = state['queue_y'].clone()
        self.num_updates = int(state['num_updates'])
        self.num_skipped = int(state['num_skipped'])
        generator_state = pick_rank(state['generators'])
        if generator_state is not None:
            self.generator.set_state(generator_state)


def _total_loss(loss: Any) -> torch.Tensor:
    if isinstance(loss, dict):
        return sum(v.detach().float().sum() for v in loss.values())
    if isinstance(loss, (list, tuple)):
        return sum(v.detach().float().sum() for v in loss)
    return loss.detach().float()


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _input_channels(model: Any) -> int:
    for module in model.denoiser.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError('AdaptiveTimestepSampling could not find a Conv2d in the denoiser to read the input channels '
                     'from; pass in_channels.')
