"""Adaptive non-uniform timestep sampling of Kim, Ki, Shim & Lee (CVPR 2025, arXiv 2411.09998).

A policy ``pi_phi(t | x0)`` chooses the timesteps the diffusion model trains on. Every ``update_every`` optimizer
steps it is rewarded, per sample, by how much that step's update improved the model at a small set ``S`` of
timesteps, and updated by REINFORCE with an entropy bonus. ``S`` is re-chosen after each probe: the ``k`` grid
timesteps whose change best predicts the total change of a probe image over all T timesteps, by a univariate F-test
over a FIFO queue of probes.

What the reward measures is the ``reward`` setting (all share the probe, the queue and the F-test):

- ``'paper'``, the method as published and coded: ``R_n = sum_{tau in S} [KL_tau(before) - KL_tau(after)]``, the
  Gaussian KL between the true and the model posterior at every tau (0 included, predicted x0 not clamped), in
  bits; raw rewards without a baseline; entropy coefficient 1e-2; S starts as {0, 1, 2}; concentrations
  ``softplus(.) + 1e-5`` starting at Beta(0.97, 0.97).
- ``'loss'``: the reduction of the unweighted training loss (the MSE to the prediction target) at S. The VLB term
  at tau is that MSE times a weight that grows without bound as tau -> 0 (for epsilon prediction), so VLB rewards
  are carried by the smallest timesteps whatever S is; the training loss weighs the timesteps as training does.
- ``'normalized'``: the paper's KL changes, each timestep's divided by its mean absolute change over the global
  batch before summing, so every timestep of S counts alike.

The default is ``'loss'``: of the three it alone reached uniform's final FID on every seed of the MNIST race
(docs/benchmark.md), although by a margin within seed noise; ``'paper'`` stays the reproduction.

Flow matching has no variational bound: on a flow-matching model every setting measures the reduction of the
flow-matching loss (the unweighted velocity MSE) at the noise levels of S, the centres of the cells of the model's
grid of sigma, with the same noise before and after the step; ``'paper'`` sums those reductions raw, ``'loss'``
standardises them, ``'normalized'`` scales each level's by its mean absolute change first. Everything else (the Beta
policy over the cells of sigma, its natural form; the F-test over a grid of sigma whose points are weighted by the
cells they stand for, so the total estimates the integral over [0, 1]; entropy, concentrations, initial S) is the
setting's.

The improved rewards (``'loss'``, ``'normalized'``) are standardised over the global batch (the mean is the
baseline), use entropy coefficient 0.1 and the discretised Beta's natural parameters (alpha - 1, beta - 1) as the
policy's output, starting at Beta(1, 1): its log-probabilities are linear in them, so the policy cannot freeze at a
parameter floor (with the paper's softplus floor one seed froze on digits: docs/benchmark.md); S starts evenly spaced
over the grid.

Deviations from the paper and its official code (ku-dmlab/Adaptive-Timestep-Sampler), one per line:

- Discretisation: the Beta density at the bin centres ``(t + 0.5) / T``, normalised; rounding a continuous draw (the
  code) gives t=0 and t=T-1 half the mass of the others.
- Policy network: a CNN shared across channels behind an adaptive pooling, for any image size, channel count and T
  (the code fixes 3x32x32 and T).
- A global (unconditional) categorical policy over the T timesteps is offered as a cheaper option (``policy='global'``).
- Probes use common random numbers (the same noise before and after the step), eval mode (no dropout) and evaluate
  each term once, all terms of a probe pass in one batched denoiser forward; the code draws fresh noise, probes in
  train mode and runs the network twice per term.
- The cadence counts global optimizer steps (``state.timestamp.batch``), not batches within an epoch or micro-steps;
  a probe due on a step whose learning rate is 0 (warm-up start) waits for the next step with a non-zero one (its
  reward would be 0).
- The entropy bonus is part of the policy loss, not added to the reward (the code adds it to the reward).
- The entropy bonus is the policy's own entropy, not that of the prior-tilted product: the latter would push the
  policy to undo a curriculum prior.
- The feature-selection probe uses ``num_probe_timesteps`` evenly spaced timesteps (both ends included) instead of
  all T (``num_probe_timesteps = T`` is the code's probe), split across ranks and all-gathered (the code shares
  memory, single node only); the F-test target weights each grid point by the timesteps it stands for, so it
  estimates the code's sum over all T.
- S is re-chosen once the queue holds 3 entries (the fewest for which the F statistic is defined; the code: 2); the
  code's S becomes a tuple after the first selection and its next use fails, here S is always a tensor of timesteps.
- The queue holds 20 probes (the paper; the code's CIFAR-10 configuration: 5).
- Everything (policy, its Adam state, the queue, S, counters) is saved in checkpoints; the probes' noise is keyed by
  the probe's number and each sample's position in the global batch, so a resumed run (on any number of ranks)
  draws the same numbers.
- Curriculum priors tilt the policy, ``p(t | x) ∝ pi(t | x) prior(t)``; the policy gradient uses the log-probability
  of that normalised product. No importance weights on the diffusion loss (as in the paper).
- Probes run outside autocast with fp32 weights: when FSDP's mixed precision casts the parameters to bf16, on an
  fp32 replica of the denoiser (one small step moves most weights by less than a bf16 ulp; see ``precision.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Optional

import torch
import torch.nn as nn
from composer.core import Event, State
from composer.loggers import Logger

from composer_algos.algorithms.adaptive_timestep_sampling.functional import (grid_timesteps, grid_weights,
                                                                            nats_to_bits, reinforce_loss,
                                                                            select_timesteps, standardised,
                                                                            sum_of_changes)
from composer_algos.algorithms.adaptive_timestep_sampling.policy import BetaPolicy, GlobalPolicy, PolicySampler
from composer_algos.algorithms.adaptive_timestep_sampling.precision import (PROBE_PRECISIONS, FullPrecisionReplica,
                                                                           casts_parameters, probe_math)
from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.common import draw_record, objective_of
from composer_algos.diffusion.timestep_samplers import tilt_log_probs
from composer_algos.diffusion.utils import device_batch, module_device
from composer_algos.distributed import all_gather, all_reduce, broadcast, global_positions, rank_world
from composer_algos.evaluation.generation import eval_mode
from composer_algos.seeding import derive_seed, keyed_uniform_and_normal

__all__ = ['AdaptiveTimestepSampling', 'POLICIES', 'REWARDS', 'RewardSetting']

log = logging.getLogger(__name__)

POLICIES = ('beta', 'global')
MIN_QUEUE = 3  # the F statistic has n - 2 degrees of freedom
# Keys of the probes' random streams (see composer_algos.seeding).
_IMAGE_STREAM, _BATCH_STREAM, _GRID_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class RewardSetting:
    """What a ``reward`` name means.

    Attributes:
        terms: ``'kl'``: the Gaussian KL term of the VLB at every timestep, 0 included; ``'loss'``: the unweighted
            training loss.
        per_timestep_scale: divide each selected timestep's changes by their mean absolute value before summing.
        standardise: standardise the rewards over the global batch (else raw rewards, no baseline).
        in_bits: the terms in bits (the code's unit, which sets the balance with the entropy bonus) or nats.
        entropy_coef: the default entropy coefficient.
        concentration: the Beta policy's output map (``'softplus'`` with a 1e-5 floor, or ``'natural'``).
        initial_concentration: both concentrations of the Beta policy at the start.
        initial_selection: ``'first'``: S starts as the first ``num_selected`` timesteps ({0, 1, 2}); ``'spread'``:
            evenly spaced over the grid.
    """

    terms: str
    per_timestep_scale: bool
    standardise: bool
    in_bits: bool
    entropy_coef: float
    concentration: str
    initial_concentration: float
    initial_selection: str


REWARDS = {
    'paper': RewardSetting(terms='kl', per_timestep_scale=False, standardise=False, in_bits=True, entropy_coef=1e-2,
                           concentration='softplus', initial_concentration=0.97, initial_selection='first'),
    'loss': RewardSetting(terms='loss', per_timestep_scale=False, standardise=True, in_bits=False, entropy_coef=0.1,
                          concentration='natural', initial_concentration=1.0, initial_selection='spread'),
    'normalized': RewardSetting(terms='kl', per_timestep_scale=True, standardise=True, in_bits=False,
                                entropy_coef=0.1, concentration='natural', initial_concentration=1.0,
                                initial_selection='spread'),
}


@dataclasses.dataclass
class Probe:
    """One probe, from its first pass (before the optimizer step) to its second (after it)."""

    step: int
    x0: torch.Tensor  # this rank's batch, on the device
    tau: torch.Tensor  # S
    inputs: torch.Tensor  # |S| copies of the batch, then the grid's copies of the probe image
    timesteps: torch.Tensor  # the timestep of each input
    conditioning: dict[str, torch.Tensor]
    noise_keys: list[tuple[int, ...]]
    num_real: int  # this rank's real (not padding) grid entries
    before: torch.Tensor = None  # (|S|, B) terms of the batch
    grid_before: torch.Tensor = None  # the probe image's terms at this rank's grid share
    seconds: float = 0.0
    t: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the timesteps drawn, per micro-batch
    prior: Optional[torch.Tensor] = None  # the curriculum prior t was drawn under (from the model's draw record)


class AdaptiveTimestepSampling(DiffusionAlgorithm):
    """Learns which timesteps to train on, per sample (Kim et al., CVPR 2025, arXiv 2411.09998).

    On every ``update_every``-th optimizer step (counted globally, from step 0; deferred while the learning rate is 0)
    the algorithm

    1. before the step (``BEFORE_TRAIN_BATCH``) computes the per-sample terms (see ``reward``) of the batch (moved to
       the device as the model will see it) at each ``tau`` in ``S``, and of one probe image of the global batch
       (broadcast by its rank) over a grid of ``num_probe_timesteps`` timesteps split across ranks, with noise
       keyed by the probe and each sample's position in the global batch, in eval mode, in one batched denoiser
       forward of ``|S| B + num_probe_timesteps / world_size`` samples;
    2. collects the timesteps the model drew for the batch from the forward outputs (every micro-batch);
    3. after the step (``BATCH_END``) recomputes the same terms with the same noise, rewards each sample by their
       change, takes a REINFORCE step on the policy (``loss = -mean(A_n log p(t_n | x_n)) - entropy_coef * H(pi)``,
       gradients averaged across ranks, clipped to ``grad_clip``, Adam at ``lr``), pushes the probe image's changes
       to the FIFO queue and re-chooses ``S`` by the F-test of each grid timestep's change against their total
       (each grid point weighted by the timesteps it stands for).

    Between probes the only cost is one forward of the small policy per batch (under ``no_grad``). Curriculum priors
    registered on the model tilt the policy; the policy gradient uses the tilted, normalised distribution. A
    non-finite loss, reward or gradient skips the update (policy and Adam state unchanged) with a warning.

    Logs ``adaptive/reward``, ``adaptive/reward_std``, ``adaptive/mean_t`` and ``adaptive/entropy`` (of the batch's
    marginal sampling distribution), ``adaptive/policy_entropy``, ``adaptive/policy_loss``, ``adaptive/S{i}``,
    ``adaptive/probe_seconds``, ``adaptive/updates`` and ``adaptive/skipped`` at each probe.

    Args:
        update_every: optimizer steps between probes (the paper's f_S).
        num_selected: ``|S|``, the timesteps whose change makes the reward.
        queue_size: capacity of the FIFO queue of the F-test.
        num_probe_timesteps: evenly spaced timesteps of the feature-selection probe (at most T).
        reward: ``'loss'`` (the default: it did best of the three on the MNIST tier, docs/benchmark.md),
            ``'paper'`` (the reproduction of the published method) or ``'normalized'`` (see the module docstring).
        policy: ``'beta'`` (per-sample Beta from a CNN on x0) or ``'global'`` (one categorical distribution).
        width: channels of the Beta policy's CNN.
        policy_resolution: the Beta policy average-pools larger inputs to this many pixels a side.
        lr: learning rate of the policy's Adam.
        grad_clip: maximum norm of the policy gradient.
        entropy_coef: weight of the entropy bonus in the policy loss; ``None``: the reward setting's default.
        seed: seed of the policy's initialisation (the same on every rank) and of the probes' keyed noise.
        probe_precision: ``'tf32'`` or ``'fp32'``: the probes' math on CUDA (see ``precision.py``). When FSDP's mixed
            precision casts the parameters, probes run on an fp32 replica of the denoiser refreshed from the shards.

    Example:
        >>> adaptive = AdaptiveTimestepSampling(update_every=40, reward='loss', policy='global')
        >>> adaptive.update_every, adaptive.entropy_coef
        (40, 0.1)
    """

    events = (Event.FIT_START, Event.BEFORE_TRAIN_BATCH, Event.AFTER_FORWARD, Event.BATCH_END)
    owns_timestep_sampler = True

    def __init__(self, update_every: int = 40, num_selected: int = 3, queue_size: int = 20,
                 num_probe_timesteps: int = 32, reward: str = 'loss', policy: str = 'beta', width: int = 32,
                 policy_resolution: int = 16, lr: float = 1e-2, grad_clip: float = 1.0,
                 entropy_coef: Optional[float] = None, seed: int = 0, probe_precision: str = 'tf32'):
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
        for name, value, allowed in (('reward', reward, tuple(REWARDS)), ('policy', policy, POLICIES),
                                     ('probe_precision', probe_precision, PROBE_PRECISIONS)):
            if value not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
        setting = REWARDS[reward]
        entropy_coef = setting.entropy_coef if entropy_coef is None else entropy_coef
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
        self.reward = reward
        self.setting = setting
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
        self.probe_weights = torch.empty(0, dtype=torch.float64)  # the timesteps each grid point stands for
        self.selected = torch.empty(0, dtype=torch.long)  # S, as timesteps
        self._clear_history()
        self._replica: Optional[FullPrecisionReplica] = None
        self._probe: Optional[Probe] = None
        self._terms = setting.terms  # 'loss' on a flow-matching model, whatever the setting (no VLB there)

    def __repr__(self) -> str:
        return (f'AdaptiveTimestepSampling(update_every={self.update_every}, num_selected={self.num_selected}, '
                f'queue_size={self.queue_size}, num_probe_timesteps={self.num_probe_timesteps}, '
                f'reward={self.reward!r}, policy={self.policy_kind!r}, width={self.width}, '
                f'policy_resolution={self.policy_resolution}, lr={self.lr}, grad_clip={self.grad_clip}, '
                f'entropy_coef={self.entropy_coef}, seed={self.seed}, probe_precision={self.probe_precision!r})')

    @property
    def needs(self) -> tuple[str, ...]:
        """The contract members it uses: the probes' terms are VLB terms or training losses."""
        terms = 'vlb_terms' if self.setting.terms == 'kl' else 'training_losses'
        return ('conditioning', 'denoiser', 'images', 'num_timesteps', 'set_timestep_sampler', terms)

    @property
    def selected_timesteps(self) -> list[int]:
        """The current set S, as timesteps."""
        return self.selected.tolist()

    # -------------------------------------------------------------------------------------------- events
    def match(self, event: Event, state: State) -> bool:
        # The draws and the step are collected only while a probe is under way.
        probing = self._probe is not None or event not in (Event.AFTER_FORWARD, Event.BATCH_END)
        return super().match(event, state) and probing

    def act(self, event: Event, state: State, logger: Logger) -> None:
        model = self.diffusion_model(state)
        if event == Event.FIT_START:
            device = module_device(model)
            self._place(device)
            if self._replica is not None:
                self._replica.to(device)
        elif event == Event.BEFORE_TRAIN_BATCH:
            if int(state.timestamp.batch) % self.update_every == 0:
                self.probe_due = True
            if self.probe_due and _learning_rate(state) > 0:
                self._probe_before(state, model)
        elif event == Event.AFTER_FORWARD:
            self._collect_timesteps(state, model)
        elif event == Event.BATCH_END:
            self._probe_after(state, model, logger)

    def install(self, model: Any, state: State, logger: Logger) -> None:
        if self.num_probe_timesteps > model.num_timesteps:
            raise ValueError(f'num_probe_timesteps ({self.num_probe_timesteps}) must not exceed the number of '
                             f'timesteps of the noise schedule ({model.num_timesteps}).')
        self._terms = 'loss' if objective_of(model) == 'flow_matching' else self.setting.terms
        # Made from the bare denoiser, before FSDP wraps it (see precision.py).
        self._replica = FullPrecisionReplica(model.denoiser) if casts_parameters(state) else None
        # Built once: installing again (a rebuilt Trainer) keeps the policy, its optimizer, the queue and S.
        if self.policy is None or self.num_timesteps != model.num_timesteps:
            self._build(int(model.num_timesteps))
        model.set_timestep_sampler(self.sampler, owner=self.owner)

    def _build(self, num_timesteps: int) -> None:
        """The policy, its optimizer and sampler, the probe grid, the initial S and an empty queue for
        ``num_timesteps``: what it learns belongs to one T."""
        self.num_timesteps = num_timesteps
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the same initial policy on every rank
            if self.policy_kind == 'beta':
                self.policy = BetaPolicy(self.width, self.policy_resolution, self.setting.concentration,
                                         self.setting.initial_concentration)
            else:
                self.policy = GlobalPolicy(self.num_timesteps)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.sampler = PolicySampler(self.policy, self.num_timesteps)
        self.probe_timesteps = grid_timesteps(self.num_timesteps, self.num_probe_timesteps)
        self.probe_weights = grid_weights(self.probe_timesteps, self.num_timesteps)
        if self.setting.initial_selection == 'first':
            self.selected = torch.arange(self.num_selected)
        else:
            self.selected = self.probe_timesteps[_evenly_spaced(self.num_probe_timesteps, self.num_selected)]
        self._clear_history()

    def _clear_history(self) -> None:
        """An empty queue and no probes yet."""
        self.queue_x = torch.empty(0, self.num_probe_timesteps, dtype=torch.float64)
        self.queue_y = torch.empty(0, dtype=torch.float64)
        self.num_probes = 0
        self.num_updates = 0
        self.num_skipped = 0
        self.probe_due = False  # a probe is due and waits for a step with a non-zero learning rate

    def _place(self, device: torch.device) -> None:
        """Move the policy and its Adam state to ``device``, in place (the sampler keeps the same objects)."""
        if module_device(self.policy) == device:
            return
        self.policy.to(device)
        for param_state in self.optimizer.state.values():
            for key, value in param_state.items():
                if torch.is_tensor(value) and key != 'step':
                    param_state[key] = value.to(device)

    # -------------------------------------------------------------------------------------------- probe
    def _probe_before(self, state: State, model: Any) -> None:
        step = int(state.timestamp.batch)
        if self._probe is not None and self._probe.step == step:
            # Composer retries a batch (automatic micro-batching after an OOM): the weights did not change, so the
            # measurement stands; only the timesteps are drawn again.
            self._probe.t = []
            return
        start = time.perf_counter()
        batch = device_batch(state)
        x0 = model.images(batch).detach()
        self._place(x0.device)
        conditioning = model.conditioning(batch)
        tau = self.selected.to(x0.device)
        _, world_size = rank_world()
        batch_size = x0.shape[0]
        # The feature probe: one image of the global batch, chosen by the probe's key; its owner broadcasts it and
        # every rank takes its share of the grid.
        index, owner = divmod(derive_seed(self.seed, _IMAGE_STREAM, self.num_probes) % (batch_size * world_size),
                              world_size)
        image = broadcast(x0[index:index + 1].clone(), src=owner)
        image_cond = {k: broadcast(v[index:index + 1].clone(), src=owner) for k, v in conditioning.items()}
        grid_index, num_real = self._grid_share()
        grid = self.probe_timesteps[grid_index].to(x0.device)
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
        probe = Probe(step=step, x0=x0, tau=tau, inputs=stack(x0, image),
                      timesteps=torch.cat([tau.repeat_interleave(batch_size), grid]),
                      conditioning={k: stack(v, image_cond[k]) for k, v in conditioning.items()},
                      noise_keys=noise_keys, num_real=num_real)
        probe.before, probe.grid_before = self._probe_pass(model, probe)
        probe.seconds = time.perf_counter() - start
        self._probe = probe
        self.probe_due = False

    def _collect_timesteps(self, state: State, model: Any) -> None:
        record = draw_record(state, self)
        if not self._probe.t:
            # The prior in force when t was drawn (a curriculum may change it at the next batch).
            self._probe.prior = None if record.prior is None else record.prior.detach()
        self._probe.t.append(record.t.detach())

    def _probe_pass(self, model: Any, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
        """Every term of a probe in one batched denoiser forward, eval mode, with the probe's keyed noise.

        Returns the ``(|S|, B)`` terms of the batch and the grid share's terms of the probe image.
        """
        x = probe.inputs
        _, noise = keyed_uniform_and_normal(self.seed, probe.noise_keys, x.shape[1:])
        noise = noise.to(x.device, x.dtype)
        denoiser = self._replica.refresh(model.denoiser) if self._replica is not None else None
        with eval_mode(model), probe_math(x.device, self.probe_precision):
            if self._terms == 'kl':
                terms = model.vlb_terms(x, probe.timesteps, noise, probe.conditioning, denoiser=denoiser,
                                        decoder_nll=False, clip=False).double()
            else:
                terms = model.training_losses(x, probe.timesteps, noise, probe.conditioning,
                                              denoiser=denoiser).double()
        if self.setting.in_bits and self._terms == 'kl':
            terms = nats_to_bits(terms)
        num_batch_terms = len(probe.tau) * probe.x0.shape[0]
        return terms[:num_batch_terms].view(len(probe.tau), -1), terms[num_batch_terms:]

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
        after, grid_after = self._probe_pass(model, probe)
        self._push_queue((probe.grid_before - grid_after)[:probe.num_real])
        batch_size = probe.x0.shape[0]
        t = torch.cat(probe.t) if probe.t else torch.empty(0, dtype=torch.long)
        if t.numel() != batch_size:
            raise RuntimeError(f'AdaptiveTimestepSampling collected {t.numel()} drawn timesteps for a batch of '
                               f'{batch_size}; the forward outputs must hold one t per sample.')
        with torch.enable_grad():
            metrics = self.update_policy(probe.x0, t, self.rewards(probe.before - after), probe.prior,
                                         _loss_is_finite(state.loss))
        self.num_probes += 1
        if self.queue_x.shape[0] >= MIN_QUEUE:
            self.selected = self.probe_timesteps[select_timesteps(self.queue_x, self.queue_y, self.num_selected)]
        metrics['adaptive/probe_seconds'] = probe.seconds + time.perf_counter() - start
        for i, step in enumerate(self.selected_timesteps):
            metrics[f'adaptive/S{i}'] = step
        logger.log_metrics(metrics)

    def rewards(self, changes: torch.Tensor) -> torch.Tensor:
        """Per-sample rewards from this rank's ``(|S|, B)`` changes (before minus after) at the selected timesteps.

        With a per-timestep scale, each timestep's scale is its mean absolute change over all ranks' samples.
        """
        scale = None
        if self.setting.per_timestep_scale:
            clean = torch.where(torch.isfinite(changes), changes, torch.zeros_like(changes))
            totals = all_reduce(torch.cat([clean.abs().sum(1), clean.new_tensor([float(changes.shape[1])])]))
            scale = totals[:-1] / totals[-1].clamp(min=1)
        return sum_of_changes(changes, self.setting.per_timestep_scale, scale)

    def _push_queue(self, local_change: torch.Tensor) -> None:
        """All-gather the probe image's changes and append them, and their weighted total, to the FIFO queue."""
        per_rank = math.ceil(self.num_probe_timesteps / rank_world()[1])
        padded = torch.zeros(per_rank, dtype=torch.float64, device=local_change.device)
        padded[:local_change.numel()] = local_change
        row = torch.cat(all_gather(padded)).cpu()[:self.num_probe_timesteps]
        if not bool(torch.isfinite(row).all()):
            log.warning('AdaptiveTimestepSampling: non-finite change in the feature probe; the queue is unchanged.')
            return
        self.queue_x = torch.cat([self.queue_x, row[None]])[-self.queue_size:]
        total = (row * self.probe_weights).sum()  # estimates the change summed over all T timesteps
        self.queue_y = torch.cat([self.queue_y, total[None]])[-self.queue_size:]

    # -------------------------------------------------------------------------------------------- REINFORCE
    def log_probs(self, x0: torch.Tensor, prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the distribution t is drawn from (the policy tilted by ``prior``), with
        grad."""
        return tilt_log_probs(self.policy.log_probs(x0.to(module_device(self.policy)), self.num_timesteps), prior)

    def update_policy(self, x0: torch.Tensor, t: torch.Tensor, reward: torch.Tensor,
                      prior: Optional[torch.Tensor] = None, loss_finite: bool = True) -> dict[str, float]:
        """One REINFORCE step on the policy from this rank's ``(x0, t, reward)`` (collective across ranks).

        The advantage is the reward standardised with the mean and standard deviation over all ranks' samples, or the
        raw reward (``'paper'``). A non-finite loss, reward or averaged gradient on any rank skips the step on every
        rank. Returns the metrics to log.
        """
        device = module_device(self.policy)
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
        if not ok:
            advantage = torch.zeros_like(clean)
        else:
            advantage = standardised(clean, mean, std) if self.setting.standardise else clean

        policy_log_probs = self.policy.log_probs(x0.to(device), self.num_timesteps)
        sample_log_probs = tilt_log_probs(policy_log_probs, prior)
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
            'probe_due': self.probe_due,
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
        device = module_device(self.policy)
        self.policy.load_state_dict(state['policy'])
        self.optimizer.load_state_dict(state['optimizer'])
        self._place(device)
        self.selected = state['selected'].clone().long()
        self.queue_x = state['queue_x'].clone()[-self.queue_size:]
        self.queue_y = state['queue_y'].clone()[-self.queue_size:]
        self.num_probes = int(state['num_probes'])
        self.num_updates = int(state['num_updates'])
        self.num_skipped = int(state['num_skipped'])
        self.probe_due = bool(state.get('probe_due', False))
        self._probe = None


# ------------------------------------------------------------------------------------------------ helpers
def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced interior indices of ``range(n)``."""
    return torch.linspace(0, n - 1, k + 2)[1:-1].round().long().clamp(0, n - 1)


def _learning_rate(state: State) -> float:
    """The largest learning rate the optimizers will use in this step."""
    return max((float(group['lr']) for optimizer in state.optimizers for group in optimizer.param_groups),
               default=1.0)


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
