"""Adaptive non-uniform timestep sampling of Kim, Ki, Shim & Lee (CVPR 2025, arXiv 2411.09998).

A policy ``pi_phi(t | x0)`` chooses the timesteps the diffusion model trains on. Every ``update_every`` optimizer
steps it is rewarded, per sample, by how much that step's diffusion update reduced the variational bound at a small
set ``S`` of timesteps, ``R_n = sum_{tau in S} [KL_tau(x_n; before) - KL_tau(x_n; after)]``, and updated by
REINFORCE with an entropy bonus. ``S`` is re-chosen after each probe: the ``k`` timesteps whose KL change best
predicts the total KL change of a probe image (over a grid of timesteps), by a univariate F-test over a FIFO queue.

Deviations from the paper and its official code (ku-dmlab/Adaptive-Timestep-Sampler), one per line:

- Discretisation: the Beta density at the bin centres ``(t + 0.5) / T``, normalised; rounding a continuous draw (the
  code) gives t=0 and t=T-1 half the mass of the others.
- Policy network: a CNN shared across channels behind an adaptive pooling, for any image size, channel count and T
  (the code fixes 3x32x32 and T); its output layer starts within ~1e-3 of Beta(1, 1) (the code: Beta(0.97, 0.97)).
- A global (unconditional) categorical policy over the T timesteps is offered as a cheaper option (``policy='global'``).
- Probes use common random numbers (the same noise before and after the step), eval mode (no dropout) and evaluate
  each KL term once, all terms of a probe pass in one batched denoiser forward; the code draws fresh noise, probes in
  train mode and runs the network twice per term.
- The cadence counts global optimizer steps (``state.timestamp.batch``), not batches within an epoch or micro-steps.
- The entropy bonus is part of the policy loss, not added to the reward (the code adds it to the reward).
- Rewards are standardised over the global batch (mean as baseline, divided by the standard deviation); the code uses
  raw rewards. The KL reduction shrinks by orders of magnitude during training, so raw rewards make the balance
  between the policy-gradient term and the fixed-coefficient entropy bonus drift with training time. Subtracting the
  batch mean equals a leave-one-out baseline up to the factor (N-1)/N, so the gradient's direction stays unbiased.
- Default entropy coefficient 0.5 instead of the paper's 1e-2, because the rewards are standardised: measured on
  digits (docs/benchmark.md), 1e-2 let the policy drift onto the smallest timesteps and freeze there (final FID
  17.65 +- 3.20 alone, 27.73 +- 15.84 with the curriculum, against uniform's 16.21 +- 0.44); 0.5 gave 15.88 +- 0.18
  and 17.24 +- 0.98.
- The entropy bonus is the policy's own entropy, not that of the prior-tilted product: the latter would push the
  policy to undo a curriculum prior.
- The feature-selection probe uses ``num_probe_timesteps`` evenly spaced timesteps instead of all T, split across
  ranks and all-gathered (the code shares memory, single node only); S is chosen once the queue holds 3 entries (the
  fewest for which the F statistic is defined); before that S is evenly spaced over the grid.
- The F-test target is, as in the code, the total KL change of the probe image (the sum over the grid); the code's
  S becomes a tuple after the first selection and its next use fails, here S is always a tensor of timesteps.
- Everything (policy, its Adam state, the queue, S, counters) is saved in checkpoints; the probes' noise is keyed by
  the probe's number and each sample's position in the global batch, so a resumed run (on any number of ranks)
  draws the same numbers.
- Curriculum priors tilt the policy, ``p(t | x) ∝ pi(t | x) prior(t)``; the policy gradient uses the log-probability
  of that normalised product. No importance weights on the diffusion loss (as in the paper).
- Probes run outside autocast with fp32 weights: when FSDP's mixed precision casts the parameters to bf16, on an
  fp32 replica of the denoiser (one small step moves most weights by less than a bf16 ulp; see ``precision.py``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from composer_algos.algorithms.adaptive_timestep_sampling.precision import (PROBE_PRECISIONS, FullPrecisionReplica,
                                                                           casts_parameters, probe_math)
from composer_algos.algorithms.common import diffusion_model
from composer_algos.diffusion.samplers import TimestepSampler
from composer_algos.diffusion.utils import device_batch
from composer_algos.distributed import all_gather, all_reduce, broadcast, global_positions, rank_world
from composer_algos.evaluation.sampling import eval_mode
from composer_algos.seeding import derive_seed, keyed_uniform_and_normal

__all__ = ['AdaptiveTimestepSampling', 'BetaPolicy', 'GlobalPolicy', 'PolicySampler', 'POLICIES',
           'beta_grid_log_probs', 'f_regression_scores', 'reinforce_loss', 'select_timesteps', 'tilted_log_probs']

log = logging.getLogger(__name__)

POLICIES = ('beta', 'global')
# Keys of the probes' random streams (see composer_algos.seeding).
_IMAGE_STREAM, _BATCH_STREAM, _GRID_STREAM = 0, 1, 2
MIN_QUEUE = 3  # the F statistic has n - 2 degrees of freedom


# ------------------------------------------------------------------------------------------------ functional forms
def beta_grid_log_probs(alpha: torch.Tensor, beta: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """``(B, T)`` log-probabilities of Beta(alpha, beta) on the grid of T timesteps.

    ``p(t) ∝ u_t^(alpha-1) (1 - u_t)^(beta-1)`` at the bin centres ``u_t = (t + 0.5) / T``, normalised over t, so
    every timestep (the ends included) is a full bin and Beta(1, 1) is exactly uniform.

    Example:
        >>> p = beta_grid_log_probs(torch.tensor([1.0]), torch.tensor([1.0]), 4).exp()
        >>> p
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    u = (torch.arange(num_timesteps, device=alpha.device, dtype=alpha.dtype) + 0.5) / num_timesteps
    log_density = torch.stack([alpha - 1, beta - 1], dim=1) @ torch.stack([torch.log(u), torch.log1p(-u)])
    return torch.log_softmax(log_density, dim=1)


def tilted_log_probs(log_probs: torch.Tensor, priors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the normalised product ``pi(t | x) * prod_j prior_j(t)`` for ``(B, T)`` log-probabilities.

    A prior with no positive mass is ignored, as the model's ``tilt`` keeps the sampler's distribution then.
    """
    out = log_probs
    for prior in priors:
        prior = prior.to(out.device, out.dtype).clamp(min=0)
        if float(prior.sum()) > 0:
            out = out + torch.log(prior)
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


def f_regression_scores(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Univariate F statistic of each column of ``features`` (n, d) against ``target`` (n,), in float64.

    ``F_j = r_j^2 / (1 - r_j^2) * (n - 2)`` with ``r_j`` the Pearson correlation of column j with the target: the
    score of scikit-learn's ``f_regression`` (with ``force_finite=True``: a constant column or target scores 0, a
    perfectly correlated column the largest float).
    """
    x = features.double() - features.double().mean(0)
    y = target.double() - target.double().mean()
    denom = x.norm(dim=0) * y.norm()
    r = torch.where(denom > 0, (x * y[:, None]).sum(0) / denom.clamp(min=torch.finfo(torch.float64).tiny),
                    torch.zeros_like(denom))
    r2 = r * r
    dof = features.shape[0] - 2
    scores = r2 / (1.0 - r2).clamp(min=0) * dof
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, torch.finfo(torch.float64).max))


def select_timesteps(queue_x: torch.Tensor, queue_y: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` columns of ``queue_x`` with the highest F statistic against ``queue_y``."""
    scores = f_regression_scores(queue_x, queue_y)
    return torch.sort(torch.topk(scores, k).indices).values


def reinforce_loss(sample_log_probs: torch.Tensor, t: torch.Tensor, advantage: torch.Tensor, entropy_coef: float,
                   policy_log_probs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE loss with an entropy bonus: ``-mean_n(A_n log p(t_n | x_n)) - entropy_coef * H``.

    Args:
        sample_log_probs: ``(B, T)`` log-probabilities of the distribution ``t`` was drawn from (with grad).
        t: ``(B,)`` drawn timesteps.
        advantage: ``(B,)`` advantages (treated as constants).
        entropy_coef: weight of the entropy bonus.
        policy_log_probs: ``(B, T)`` log-probabilities whose mean entropy ``H`` is the bonus (default:
            ``sample_log_probs``).

    Returns:
        The loss and the mean entropy ``H``.
    """
    policy_log_probs = sample_log_probs if policy_log_probs is None else policy_log_probs
    chosen = sample_log_probs.gather(1, t.to(sample_log_probs.device).long()[:, None]).squeeze(1)
    entropy = -(policy_log_probs.exp() * policy_log_probs).sum(1).mean()
    loss = -(advantage.detach().to(chosen) * chosen).mean() - entropy_coef * entropy
    return loss, entropy


# ------------------------------------------------------------------------------------------------ policies
def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class BetaPolicy(nn.Module):
    """A small CNN on x0 giving a per-sample Beta(alpha, beta) over ``u = t / T``; starts at Beta(1, 1).

    Each channel is encoded by the same convolutions (after average pooling to at most ``resolution`` pixels a side)
    and the codes are pooled over channels by mean and max, so one policy fits 1-channel digits, RGB images and
    4-channel latents of any size without knowing their shape in advance.

    Args:
        width: channels of the convolutions and the hidden layer.
        resolution: inputs larger than this (per side) are average-pooled down first, which bounds the cost.
    """

    min_concentration = 1e-3

    def __init__(self, width: int = 32, resolution: int = 16):
        super().__init__()
        self.resolution = int(resolution)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 * width, width), nn.SiLU(), nn.Linear(width, 2))
        out = self.head[-1]
        # Small (not zero) weights: the policy starts within ~1e-3 of uniform and every layer gets a gradient.
        nn.init.normal_(out.weight, std=1e-3)
        nn.init.constant_(out.bias, _softplus_inverse(1.0 - self.min_concentration))

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)``, each of shape ``(B,)``."""
        x = x0.float()
        b, c, h, w = x.shape
        if h > self.resolution or w > self.resolution:
            x = F.adaptive_avg_pool2d(x, (min(h, self.resolution), min(w, self.resolution)))
        codes = self.encoder(x.reshape(b * c, 1, *x.shape[-2:])).reshape(b, c, -1)
        params = F.softplus(self.head(torch.cat([codes.mean(1), codes.amax(1)], dim=1))) + self.min_concentration
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
        device = _device(self.policy)
        # Outside autocast: t is drawn from the same fp32 distribution whose log-probabilities REINFORCE uses.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return self.policy.log_probs(x0.to(device), self.num_timesteps).exp().to(x0.device)

    def __repr__(self) -> str:
        return f'PolicySampler(policy={type(self.policy).__name__}, num_timesteps={self.num_timesteps})'


# ------------------------------------------------------------------------------------------------ algorithm
class AdaptiveTimestepSampling(Algorithm):
    """Learns which timesteps to train on, per sample (Kim et al., CVPR 2025, arXiv 2411.09998).

    On every ``update_every``-th optimizer step (counted globally, from step 0) the algorithm

    1. before the step (``BEFORE_TRAIN_BATCH``) computes the per-sample VLB terms ``KL_tau`` of the batch (moved to
       the device as the model will see it) at each ``tau`` in ``S``, and of one probe image of the global batch
       (broadcast by its rank) over a grid of ``num_probe_timesteps`` timesteps split across ranks, with noise
       keyed by the probe and each sample's position in the global batch, in eval mode, in one batched denoiser
       forward of ``|S| B + num_probe_timesteps / world_size`` samples;
    2. collects the timesteps the model drew for the batch from the forward outputs (every micro-batch);
    3. after the step (``BATCH_END``) recomputes the same terms with the same noise, rewards each sample by
       ``R_n = sum_{tau in S} [KL_tau(before) - KL_tau(after)]``, takes a REINFORCE step on the policy
       (``loss = -mean(A_n log p(t_n | x_n)) - entropy_coef * H(pi)``, ``A`` the standardised reward, gradients
       averaged across ranks, clipped to ``grad_clip``, Adam at ``lr``), pushes the probe image's KL changes to the
       FIFO queue and re-chooses ``S`` by the F-test of each grid timestep's KL change against their sum.

    Between probes the only cost is one forward of the small policy per batch (under ``no_grad``). Curriculum priors
    registered on the model tilt the policy; the policy gradient uses the tilted, normalised distribution. A
    non-finite loss, reward or gradient skips the update (policy and Adam state unchanged) with a warning.

    Logs ``adaptive/reward``, ``adaptive/reward_std``, ``adaptive/mean_t`` and ``adaptive/entropy`` (of the batch's
    marginal sampling distribution), ``adaptive/policy_entropy``, ``adaptive/policy_loss``, ``adaptive/S{i}``,
    ``adaptive/probe_seconds``, ``adaptive/updates`` and ``adaptive/skipped`` at each probe.

    Args:
        update_every: optimizer steps between probes (the paper's f_S).
        num_selected: ``|S|``, the timesteps whose KL change makes the reward.
        queue_size: capacity of the FIFO queue of the F-test.
        num_probe_timesteps: evenly spaced timesteps of the feature-selection probe (at most T).
        policy: ``'beta'`` (per-sample Beta from a CNN on x0) or ``'global'`` (one categorical distribution).
        width: channels of the Beta policy's CNN.
        policy_resolution: the Beta policy average-pools larger inputs to this many pixels a side.
        lr: learning rate of the policy's Adam.
        grad_clip: maximum norm of the policy gradient.
        entropy_coef: weight of the entropy bonus in the policy loss, on the scale of the standardised rewards (the
            paper's 1e-2 multiplies raw KL reductions, whose spread over a batch was about 0.02 on digits: 0.5
            here keeps about the paper's balance between the two terms).
        seed: seed of the policy's initialisation (the same on every rank) and of the probes' keyed noise.
        probe_precision: ``'tf32'`` or ``'fp32'``: the probes' math on CUDA (see ``precision.py``). When FSDP's mixed
            precision casts the parameters, probes run on an fp32 replica of the denoiser refreshed from the shards.

    Example:
        >>> adaptive = AdaptiveTimestepSampling(update_every=40, policy='global')
        >>> adaptive.update_every, adaptive.policy_kind
        (40, 'global')
    """

    def __init__(self, update_every: int = 40, num_selected: int = 3, queue_size: int = 20,
                 num_probe_timesteps: int = 32, policy: str = 'beta', width: int = 32, policy_resolution: int = 16,
                 lr: float = 1e-2, grad_clip: float = 1.0, entropy_coef: float = 0.5, seed: int = 0,
                 probe_precision: str = 'tf32'):
        for name, value, low in (('update_every', update_every, 1), ('num_selected', num_selected, 1),
                                 ('queue_size', queue_size, MIN_QUEUE), ('num_probe_timesteps', num_probe_timesteps, 2),
                                 ('width', width, 1), ('policy_resolution', policy_resolution, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'{name} must be an integer >= {low}, got {value!r}.')
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f'seed must be an integer, got {seed!r}.')
        if num_selected > num_probe_timesteps:
            raise ValueError(f'num_selected ({num_selected}) must not exceed num_probe_timesteps '
                             f'({num_probe_timesteps}): S is chosen among the probe timesteps.')
        if policy not in POLICIES:
            raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}.')
        if probe_precision not in PROBE_PRECISIONS:
            raise ValueError(f'probe_precision must be one of {PROBE_PRECISIONS}, got {probe_precision!r}.')
        for name, value, allow_zero in (('lr', lr, False), ('grad_clip', grad_clip, False),
                                        ('entropy_coef', entropy_coef, True)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                    value == 0 and not allow_zero):
                bound = '>= 0' if allow_zero else '> 0'
                raise ValueError(f'{name} must be a finite number {bound}, got {value!r}.')
        self.update_every = update_every
        self.num_selected = num_selected
        self.queue_size = queue_size
        self.num_probe_timesteps = num_probe_timesteps
        self.policy_kind = policy
        self.width = width
        self.policy_resolution = policy_resolution
        self.lr = float(lr)
        self.grad_clip = float(grad_clip)
        self.entropy_coef = float(entropy_coef)
        self.seed = seed
        self.probe_precision = probe_precision

        self.policy: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Adam] = None
        self.sampler: Optional[PolicySampler] = None
        self.num_timesteps = 0
        self.probe_timesteps = torch.empty(0, dtype=torch.long)  # the grid of the feature-selection probe
        self.selected = torch.empty(0, dtype=torch.long)  # S, as indices into probe_timesteps
        self.queue_x = torch.empty(0, num_probe_timesteps, dtype=torch.float64)
        self.queue_y = torch.empty(0, dtype=torch.float64)
        self.num_probes = 0
        self.num_updates = 0
        self.num_skipped = 0
        self._replica: Optional[FullPrecisionReplica] = None
        self._probe: Optional[dict[str, Any]] = None

    def __repr__(self) -> str:
        return (f'AdaptiveTimestepSampling(update_every={self.update_every}, num_selected={self.num_selected}, '
                f'queue_size={self.queue_size}, num_probe_timesteps={self.num_probe_timesteps}, '
                f'policy={self.policy_kind!r}, width={self.width}, policy_resolution={self.policy_resolution}, '
                f'lr={self.lr}, grad_clip={self.grad_clip}, entropy_coef={self.entropy_coef}, seed={self.seed}, '
                f'probe_precision={self.probe_precision!r})')

    @property
    def selected_timesteps(self) -> list[int]:
        """The current set S, as timesteps."""
        return self.probe_timesteps[self.selected].tolist()

    # -------------------------------------------------------------------------------------------- events
    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.FIT_START, Event.BEFORE_TRAIN_BATCH):
            return True
        return self._probe is not None and event in (Event.AFTER_FORWARD, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = diffusion_model(state, self)
        if event == Event.INIT:
            self._setup(model, state)
        elif event == Event.FIT_START:
            device = _module_device(model)
            self._place(device)
            if self._replica is not None:
                self._replica.to(device)
        elif event == Event.BEFORE_TRAIN_BATCH:
            if int(state.timestamp.batch) % self.update_every == 0:
                self._probe_before(state, model)
        elif event == Event.AFTER_FORWARD:
            self._collect_timesteps(state, model)
        elif event == Event.BATCH_END:
            self._probe_after(state, model, logger)

    def _setup(self, model: Any, state: State) -> None:
        self.num_timesteps = int(model.num_timesteps)
        if casts_parameters(state):
            # Made from the bare denoiser, before FSDP wraps it (see precision.py).
            self._replica = FullPrecisionReplica(model.denoiser)
        if self.num_probe_timesteps > self.num_timesteps:
            raise ValueError(f'num_probe_timesteps ({self.num_probe_timesteps}) must not exceed the number of '
                             f'timesteps of the noise schedule ({self.num_timesteps}).')
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the same initial policy on every rank
            if self.policy_kind == 'beta':
                self.policy = BetaPolicy(self.width, self.policy_resolution)
            else:
                self.policy = GlobalPolicy(self.num_timesteps)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.sampler = PolicySampler(self.policy, self.num_timesteps)
        model.set_timestep_sampler(self.sampler, owner=type(self).__name__)
        self.probe_timesteps = torch.linspace(0, self.num_timesteps - 1, self.num_probe_timesteps).round().long()
        self.selected = _evenly_spaced(self.num_probe_timesteps, self.num_selected)

    def _place(self, device: torch.device) -> None:
        """Move the policy and its Adam state to ``device``, in place (the sampler keeps the same objects)."""
        if _device(self.policy) == device:
            return
        self.policy.to(device)
        for param_state in self.optimizer.state.values():
            for key, value in param_state.items():
                if torch.is_tensor(value) and key != 'step':
                    param_state[key] = value.to(device)

    # -------------------------------------------------------------------------------------------- probe
    def _probe_before(self, state: State, model: Any) -> None:
        step = int(state.timestamp.batch)
        if self._probe is not None and self._probe['step'] == step:
            # Composer retries a batch (automatic micro-batching after an OOM): the weights did not change, so the
            # measurement stands; only the timesteps are drawn again.
            self._probe['t'] = []
            return
        start = time.perf_counter()
        batch = device_batch(state)
        x0 = model.images(batch).detach()
        self._place(x0.device)
        conditioning = model.conditioning(batch)
        tau = self.probe_timesteps[self.selected]
        _, world_size = rank_world()
        batch_size = x0.shape[0]
        # The feature probe: one image of the global batch, chosen by the probe's key; its owner broadcasts it and
        # every rank takes its share of the grid.
        index, owner = divmod(derive_seed(self.seed, _IMAGE_STREAM, self.num_probes) % (batch_size * world_size),
                              world_size)
        image = broadcast(x0[index:index + 1].clone(), src=owner)
        image_cond = {k: broadcast(v[index:index + 1].clone(), src=owner) for k, v in conditioning.items()}
        grid_index, num_real = self._grid_share()
        grid = self.probe_timesteps[grid_index]
        num_selected = len(tau)

        def stack(batch_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
            # |S| copies of the batch (tau-major), then the grid's copies of the probe image.
            return torch.cat([batch_part.repeat((num_selected,) + (1,) * (batch_part.dim() - 1)),
                              image_part.expand(len(grid), *image_part.shape[1:])])

        # Noise keyed by (probe, tau, position in the global batch) and (probe, grid timestep): the pass after the
        # step draws the same numbers (common random numbers) on any number of ranks, and nothing is stored.
        positions = global_positions(batch_size)
        noise_keys = [(_BATCH_STREAM, self.num_probes, i, p) for i in range(num_selected) for p in positions]
        noise_keys += [(_GRID_STREAM, self.num_probes, int(g)) for g in grid_index]
        probe = {
            'step': step, 'x0': x0, 'tau': tau, 'num_real': num_real, 't': [], 'priors': None,
            'inputs': {'x0': stack(x0, image), 't': torch.cat([tau.repeat_interleave(batch_size), grid]).to(x0.device),
                       'conditioning': {k: stack(v, image_cond[k]) for k, v in conditioning.items()}},
            'noise_keys': noise_keys,
        }
        probe['kl_before'], probe['grid_before'] = self._probe_pass(model, probe)
        probe['seconds'] = time.perf_counter() - start
        self._probe = probe

    def _collect_timesteps(self, state: State, model: Any) -> None:
        outputs = state.outputs
        if not isinstance(outputs, dict) or 't' not in outputs:
            raise ValueError("AdaptiveTimestepSampling reads the drawn timesteps from the forward outputs, which must "
                             f"be a dict with key 't' (got {type(outputs).__name__}).")
        if self._probe['priors'] is None:
            # The priors in force when t was drawn (a curriculum may change them at the next batch).
            self._probe['priors'] = [p.detach() for p in model.timestep_priors(_device(self.policy))]
        self._probe['t'].append(outputs['t'].detach())

    def _probe_pass(self, model: Any, probe: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every KL term of a probe in one batched denoiser forward, eval mode, with the probe's keyed noise.

        Returns the ``(|S|, B)`` terms of the batch and the grid share's terms of the probe image.
        """
        inputs = probe['inputs']
        x = inputs['x0']
        _, noise = keyed_uniform_and_normal(self.seed, probe['noise_keys'], x.shape[1:])
        denoiser = self._replica.refresh(model.denoiser) if self._replica is not None else None
        with eval_mode(model), probe_math(x.device, self.probe_precision):
            kl = model.vlb_terms(x, inputs['t'], noise.to(x.device, x.dtype), inputs['conditioning'],
                                 denoiser=denoiser).double()
        num_batch_terms = len(probe['tau']) * probe['x0'].shape[0]
        return kl[:num_batch_terms].view(len(probe['tau']), -1), kl[num_batch_terms:]

    def _grid_share(self) -> tuple[torch.Tensor, int]:
        """This rank's equal-sized share of the probe grid (indices, padded by repeats) and its number of real
        entries."""
        rank, world = rank_world()
        per_rank = math.ceil(self.num_probe_timesteps / world)
        index = torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp(max=self.num_probe_timesteps - 1)
        num_real = max(0, min(per_rank, self.num_probe_timesteps - rank * per_rank))
        return index, num_real

    def _probe_after(self, state: State, model: Any, logger: Logger) -> None:
        probe, self._probe = self._probe, None
        start = time.perf_counter()
        kl_after, grid_after = self._probe_pass(model, probe)
        reward = (probe['kl_before'] - kl_after).sum(0)
        self._push_queue((probe['grid_before'] - grid_after)[:probe['num_real']])
        batch_size = probe['x0'].shape[0]
        t = torch.cat(probe['t']) if probe['t'] else torch.empty(0, dtype=torch.long)
        if t.numel() != batch_size:
            raise RuntimeError(f'AdaptiveTimestepSampling collected {t.numel()} drawn timesteps for a batch of '
                               f'{batch_size}; the forward outputs must hold one t per sample.')
        with torch.enable_grad():
            metrics = self.update_policy(probe['x0'], t, reward, probe['priors'] or [], _loss_is_finite(state.loss))
        self.num_probes += 1
        if self.queue_x.shape[0] >= MIN_QUEUE:
            self.selected = select_timesteps(self.queue_x, self.queue_y, self.num_selected)
        metrics['adaptive/probe_seconds'] = probe['seconds'] + time.perf_counter() - start
        for i, step in enumerate(self.selected_timesteps):
            metrics[f'adaptive/S{i}'] = step
        logger.log_metrics(metrics)

    def _push_queue(self, local_change: torch.Tensor) -> None:
        """All-gather the probe image's KL changes and append them to the FIFO queue (the same on every rank)."""
        per_rank = math.ceil(self.num_probe_timesteps / rank_world()[1])
        padded = torch.zeros(per_rank, dtype=torch.float64, device=local_change.device)
        padded[:local_change.numel()] = local_change
        row = torch.cat(all_gather(padded)).cpu()[:self.num_probe_timesteps]
        if not bool(torch.isfinite(row).all()):
            log.warning('AdaptiveTimestepSampling: non-finite KL change in the feature probe; the queue is unchanged.')
            return
        self.queue_x = torch.cat([self.queue_x, row[None]])[-self.queue_size:]
        self.queue_y = torch.cat([self.queue_y, row.sum()[None]])[-self.queue_size:]

    # -------------------------------------------------------------------------------------------- REINFORCE
    def log_probs(self, x0: torch.Tensor, priors: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the distribution t is drawn from (the tilted policy), with grad."""
        return tilted_log_probs(self.policy.log_probs(x0.to(_device(self.policy)), self.num_timesteps), priors)

    def update_policy(self, x0: torch.Tensor, t: torch.Tensor, reward: torch.Tensor,
                      priors: Sequence[torch.Tensor] = (), loss_finite: bool = True) -> dict[str, float]:
        """One REINFORCE step on the policy from this rank's ``(x0, t, reward)`` (collective across ranks).

        Rewards are standardised with the mean and standard deviation over all ranks' samples. A non-finite loss,
        reward or averaged gradient on any rank skips the step on every rank. Returns the metrics to log.
        """
        device = _device(self.policy)
        reward = reward.to(device, torch.float64)
        finite = torch.isfinite(reward)
        clean = torch.where(finite, reward, torch.zeros_like(reward))
        bad = float(not (loss_finite and bool(finite.all())))
        stats = all_reduce(torch.stack([clean.sum(), (clean * clean).sum(), clean.new_tensor(float(clean.numel())),
                                        clean.new_tensor(bad)]))
        ok = float(stats[3]) == 0
        count = max(float(stats[2]), 1.0)
        mean = float(stats[0]) / count
        std = math.sqrt(max(float(stats[1]) / count - mean * mean, 0.0))
        advantage = (clean - mean) / std if ok and std > 0 else torch.zeros_like(clean)

        policy_log_probs = self.policy.log_probs(x0.to(device), self.num_timesteps)
        sample_log_probs = tilted_log_probs(policy_log_probs, priors)
        loss, entropy = reinforce_loss(sample_log_probs, t, advantage, self.entropy_coef, policy_log_probs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.policy.parameters())
        flat = all_reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                     for p in params])) / rank_world()[1]
        ok = ok and bool(torch.isfinite(flat).all())
        if ok:
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
            self.num_updates += 1
        else:
            self.num_skipped += 1
            log.warning('AdaptiveTimestepSampling: non-finite loss, reward or policy gradient at probe %d; the policy '
                        'update was skipped (policy and optimizer unchanged).', self.num_probes)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            marginal = sample_log_probs.exp().mean(0)
            steps = torch.arange(self.num_timesteps, device=device, dtype=marginal.dtype)
            return {
                'adaptive/reward': mean if ok else float('nan'),
                'adaptive/reward_std': std if ok else float('nan'),
                'adaptive/mean_t': float((marginal * steps).sum()),
                'adaptive/entropy': float(-torch.special.xlogy(marginal, marginal).sum()),
                'adaptive/policy_entropy': float(entropy),
                'adaptive/policy_loss': float(loss),
                'adaptive/updates': self.num_updates,
                'adaptive/skipped': self.num_skipped,
            }

    # -------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.policy is None:
            raise RuntimeError('AdaptiveTimestepSampling has no state before Event.INIT.')
        return {
            **super().state_dict(),
            'policy': _to_cpu(self.policy.state_dict()),
            'optimizer': _to_cpu(self.optimizer.state_dict()),
            'selected': self.selected.clone(),
            'queue_x': self.queue_x.clone(),
            'queue_y': self.queue_y.clone(),
            'num_probes': self.num_probes,
            'num_updates': self.num_updates,
            'num_skipped': self.num_skipped,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        if self.policy is None:
            raise RuntimeError('AdaptiveTimestepSampling must see Event.INIT before its state is loaded.')
        if state['queue_x'].shape[1:] != (self.num_probe_timesteps,):
            raise ValueError(f'The checkpoint was written with num_probe_timesteps={state["queue_x"].shape[1]}; this '
                             f'run has num_probe_timesteps={self.num_probe_timesteps}.')
        if state['selected'].numel() != self.num_selected:
            raise ValueError(f'The checkpoint was written with num_selected={state["selected"].numel()}; this run has '
                             f'num_selected={self.num_selected}.')
        # In place: the sampler installed in the model keeps using these very objects.
        device = _device(self.policy)
        self.policy.load_state_dict(state['policy'])
        self.optimizer.load_state_dict(state['optimizer'])
        self._place(device)
        self.selected = state['selected'].clone().long()
        self.queue_x = state['queue_x'].clone()[-self.queue_size:]
        self.queue_y = state['queue_y'].clone()[-self.queue_size:]
        self.num_probes = int(state['num_probes'])
        self.num_updates = int(state['num_updates'])
        self.num_skipped = int(state['num_skipped'])
        self._probe = None


# ------------------------------------------------------------------------------------------------ helpers
def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced interior indices of ``range(n)`` (the default S)."""
    return torch.linspace(0, n - 1, k + 2)[1:-1].round().long().clamp(0, n - 1)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _module_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


def _loss_is_finite(loss: Any) -> bool:
    if loss is None:
        return True
    if isinstance(loss, dict):
        return all(_loss_is_finite(v) for v in loss.values())
    if isinstance(loss, (list, tuple)):
        return all(_loss_is_finite(v) for v in loss)
    return bool(torch.isfinite(torch.as_tensor(loss).detach()).all())


def _to_cpu(value: Any) -> Any:
    """A copy of a nested state with every tensor on the CPU (tensors and Python primitives only)."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
