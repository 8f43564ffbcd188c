"""Adaptive non-uniform timestep sampling of Kim, Ki, Shim & Lee (CVPR 2025, arXiv 2411.09998).

A policy ``pi_phi(t | x0)`` chooses the timesteps the diffusion model trains on. Every ``update_every`` optimizer
steps it is rewarded, per sample, by how much that step's update improved the model at a small set ``S`` of
timesteps, and updated by REINFORCE with an entropy bonus in the reward. ``S`` is re-chosen after each probe: the
``k`` probe timesteps whose change best predicts the total change of a probe image over all T timesteps, by a
univariate F-test over a FIFO queue of probes. The pieces: ``policy.py`` (the policies, their update, the sampler),
``probe.py`` (the two passes and the reward), ``selection.py`` (the queue and the F-test); this class says when.

Every update minimises, on the distribution ``p`` t was drawn from,
``-mean_n[ log(T p(t_n | x_n)) * (A_n + entropy_coef * (H(pi_n) - ln T)) ]`` (entropy not detached): the paper's
code adds the entropy bonus to the reward and uses the continuous Beta's log-density and differential entropy, which
are ``log(T p)`` and ``H - ln T`` on the grid of T timesteps. Both vanish near uniform, so the bonus only restrains a
policy that has sharpened (a ``-c H`` penalty in the loss instead pins the policy at uniform: docs/benchmark.md).

What the reward measures, and how the policy is held, is the ``reward`` setting:

- ``'paper'``, the method as published and coded: ``R_n = sum_{tau in S} [KL_tau(before) - KL_tau(after)]``, the
  Gaussian KL between the true and the model posterior at every tau (0 included, predicted x0 not clamped), in
  bits; raw rewards without a baseline; entropy coefficient 1e-2; S starts as {0, 1, 2} and is chosen among all T
  timesteps, against the KL change summed over all T of one probe image; concentrations ``softplus(.) + 1e-5``
  starting at Beta(0.97, 0.97).
- ``'loss'``: the reduction of the unweighted training loss (the MSE to the prediction target) at S. The VLB term
  at tau is that MSE times a weight that grows without bound as tau -> 0 (for epsilon prediction), so VLB rewards
  are carried by the smallest timesteps whatever S is; the training loss weighs the timesteps as training does.
- ``'normalized'``: the paper's KL changes, each timestep's divided by its mean absolute change over the global
  batch before summing, so every timestep of S counts alike.

The improved rewards (``'loss'``, ``'normalized'``) are standardised over the global batch (``normalize: batch``; the
mean is the baseline), with entropy coefficient 0.1, t drawn from ``(1 - 0.1) pi + 0.1 U`` (``uniform_mix``) and
each update's mean ``KL(pi_old || pi_new)`` held within 0.01 nats (``max_kl``), chosen on a toy problem
(``tests/test_adaptive_timestep_sampling.py``, the ``policy_moves`` tests; README): the policy leaves uniform within
a few dozen updates when the reward favours some timesteps, drifts little when it does not, and does not collapse.
They use the discretised Beta's natural parameters (alpha - 1, beta - 1) as the policy's output, starting at
Beta(1, 1), whose log-probabilities are linear in them, so the policy cannot freeze at a parameter floor; S starts
evenly spaced over a grid of 32 probe timesteps. The default is ``'loss'`` (docs/benchmark.md).

``importance_weighted: true`` weights each draw's loss by ``1 / (T p(t | x))`` (clipped at ``importance_clip``,
normalised to mean 1 over the batch), so that the objective stays uniform's: sampling t from ``p`` without weights
trains with the loss weighting ``T p(t)`` (Kingma & Gao 2023), and this setting keeps only the change in the
gradient's variance. ``frozen_average: <timestep_heatmap.npz>`` is the control for the other half of that reading:
a fixed sampler at the time-averaged distribution an adaptive run drew from, without probes or policy.

Flow matching has no variational bound: on a flow-matching model every setting measures the reduction of the
flow-matching loss (the unweighted velocity MSE) at the noise levels of S, the centres of the cells of the model's
grid of sigma, with the same noise before and after the step; ``'paper'`` sums those reductions raw, ``'loss'``
standardises them, ``'normalized'`` scales each level's by its mean absolute change first. Everything else (the Beta
policy over the cells of sigma; the F-test over a grid of sigma whose points are weighted by the cells they stand
for, so the total estimates the integral over [0, 1]; entropy, concentrations, initial S) is the setting's.

Deviations of ``'paper'`` from the paper and its official code (ku-dmlab/Adaptive-Timestep-Sampler), one per line:

- Discretisation: the Beta density at the bin centres ``(t + 0.5) / T``, normalised, so ``log(T p)`` and
  ``H - ln T`` stand for the continuous log-density and differential entropy; rounding a continuous draw (the code)
  gives t=0 and t=T-1 half the mass of the others.
- Policy network: a CNN shared across channels behind an adaptive pooling, for any image size, channel count and T
  (the code fixes 3x32x32 and T).
- Probes use common random numbers (the same noise before and after the step), eval mode (no dropout) and evaluate
  each term once, all terms of a probe pass in one batched denoiser forward; the code draws fresh noise, probes in
  train mode and runs the network twice per term.
- The cadence counts global optimizer steps (``state.timestamp.batch``), not batches within an epoch or micro-steps;
  a probe due on a step whose learning rate is 0 (warm-up start) waits for the next step with a non-zero one (its
  reward would be 0).
- The probe's T timesteps are split across ranks and all-gathered (the code shares memory, single node only).
- S is re-chosen once the queue holds 3 entries (the fewest for which the F statistic is defined; the code: 2); the
  code's S becomes a tuple after the first selection and its next use fails, here S is always a tensor of timesteps.
- The queue holds 20 probes (the paper; the code's CIFAR-10 configuration: 5).
- Everything (policy, its Adam state, the queue, S, counters) is saved in checkpoints; the probes' noise is keyed by
  the probe's number and each sample's position in the global batch, so a resumed run (on any number of ranks)
  draws the same numbers.
- Curriculum priors (not in the paper) tilt the policy, ``p(t | x) ∝ pi(t | x) prior(t)``: the REINFORCE
  log-probability is that of the normalised product, the entropy bonus the policy's own (the product's would push the
  policy to undo the prior).
- Probes run outside autocast with fp32 weights: when FSDP's mixed precision casts the parameters to bf16, on an
  fp32 replica of the denoiser (one small step moves most weights by less than a bf16 ulp; see ``precision.py``).

Options beyond the paper: a global (unconditional) categorical policy over the T timesteps (``policy='global'``,
cheaper); a coarser probe grid (``num_probe_timesteps`` < T: the F-test target then weights each grid point by the
timesteps it stands for, so it still estimates the sum over all T).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
from composer.core import Event, State
from composer.loggers import Logger
from torch import nn

from composer_algos.algorithms.adaptive_timestep_sampling.functional import time_averaged_distribution
from composer_algos.algorithms.adaptive_timestep_sampling.policy import (
    CONCENTRATIONS,
    NORMALIZATIONS,
    BetaPolicy,
    FrozenSampler,
    GlobalPolicy,
    PolicyLearner,
    PolicySampler,
)
from composer_algos.algorithms.adaptive_timestep_sampling.precision import (
    PROBE_PRECISIONS,
    FullPrecisionReplica,
    casts_parameters,
)
from composer_algos.algorithms.adaptive_timestep_sampling.probe import TERMS, Probe, Prober
from composer_algos.algorithms.adaptive_timestep_sampling.selection import (
    INITIAL_SELECTIONS,
    MIN_QUEUE,
    TimestepSelection,
)
from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.common import draw_record, objective_of
from composer_algos.diffusion.utils import device_batch, module_device

__all__ = ['AdaptiveTimestepSampling', 'POLICIES', 'REWARDS', 'RewardSetting', 'read_time_averaged_distribution']

log = logging.getLogger(__name__)

POLICIES = ('beta', 'global')


@dataclasses.dataclass(frozen=True)
class RewardSetting:
    """What a ``reward`` name means: what the probe measures and how the policy learns from it.

    Attributes:
        terms: ``'kl'``: the Gaussian KL term of the VLB at every timestep, 0 included; ``'loss'``: the unweighted
            training loss.
        per_timestep_scale: divide each selected timestep's changes by their mean absolute value before summing.
        in_bits: the terms in bits (the code's unit, which sets the balance with the entropy bonus) or nats.
        normalize: the advantage (``'none'``: the raw reward; ``'batch'``, ``'running'``: see
            :class:`~.policy.PolicyLearner`).
        entropy_coef: the default entropy coefficient.
        uniform_mix: the default share of uniform in the distribution t is drawn from.
        max_kl: the default trust region of an update (mean KL in nats; 0: none).
        concentration: the Beta policy's output map (``'softplus'`` with a 1e-5 floor, or ``'natural'``).
        initial_concentration: both concentrations of the Beta policy at the start.
        initial_selection: ``'first'``: S starts as the first ``num_selected`` timesteps ({0, 1, 2}); ``'spread'``:
            evenly spaced over the grid.
        num_probe_timesteps: the default probe grid (``None``: all T timesteps).
    """

    terms: str
    per_timestep_scale: bool
    in_bits: bool
    normalize: str
    entropy_coef: float
    uniform_mix: float
    max_kl: float
    concentration: str
    initial_concentration: float
    initial_selection: str
    num_probe_timesteps: int | None

    def __post_init__(self):
        for name, value, allowed in (
            ('terms', self.terms, TERMS),
            ('normalize', self.normalize, NORMALIZATIONS),
            ('concentration', self.concentration, CONCENTRATIONS),
            ('initial_selection', self.initial_selection, INITIAL_SELECTIONS),
        ):
            if value not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')


_IMPROVED: dict[str, Any] = {
    'normalize': 'batch',
    'entropy_coef': 0.1,
    'uniform_mix': 0.1,
    'max_kl': 0.01,
    'concentration': 'natural',
    'initial_concentration': 1.0,
    'initial_selection': 'spread',
    'num_probe_timesteps': 32,
}
REWARDS = {
    'paper': RewardSetting(
        terms='kl',
        per_timestep_scale=False,
        in_bits=True,
        normalize='none',
        entropy_coef=1e-2,
        uniform_mix=0.0,
        max_kl=0.0,
        concentration='softplus',
        initial_concentration=0.97,
        initial_selection='first',
        num_probe_timesteps=None,
    ),
    'loss': RewardSetting(terms='loss', per_timestep_scale=False, in_bits=False, **_IMPROVED),
    'normalized': RewardSetting(terms='kl', per_timestep_scale=True, in_bits=False, **_IMPROVED),
}


class AdaptiveTimestepSampling(DiffusionAlgorithm):
    """Learns which timesteps to train on, per sample (Kim et al., CVPR 2025, arXiv 2411.09998).

    On every ``update_every``-th optimizer step (counted globally, from step 0; deferred while the learning rate is 0)
    the algorithm

    1. before the step (``BEFORE_TRAIN_BATCH``) computes the per-sample terms (see ``reward``) of the batch (moved to
       the device as the model will see it) at each ``tau`` in ``S``, and of one probe image of the global batch
       (broadcast by its rank) over the probe grid split across ranks, with noise keyed by the probe and each
       sample's position in the global batch, in eval mode, in one batched denoiser forward of
       ``|S| B + num_probe_timesteps / world_size`` samples;
    2. collects the timesteps the model drew for the batch from the forward outputs (every micro-batch);
    3. after the step (``BATCH_END``) recomputes the same terms with the same noise, rewards each sample by their
       change, takes a REINFORCE step on the policy (the loss in the module docstring; gradients averaged across
       ranks, clipped to ``grad_clip``, Adam at ``lr``, the step shrunk to ``max_kl``), pushes the probe image's
       changes to the FIFO queue and re-chooses ``S`` by the F-test of each probe timestep's change against their
       total.

    Between probes the only cost is one forward of the small policy per batch (under ``no_grad``). Curriculum priors
    registered on the model tilt the policy; the policy gradient uses the tilted, normalised distribution. A
    non-finite loss, reward or gradient skips the update (policy and Adam state unchanged) with a warning. With
    ``frozen_average`` none of this happens: the model draws t from the fixed distribution read from the file.

    Logs ``adaptive/reward``, ``adaptive/reward_std``, ``adaptive/mean_t`` and ``adaptive/entropy`` (of the batch's
    marginal sampling distribution), ``adaptive/policy_entropy``, ``adaptive/policy_loss``, ``adaptive/S{i}``,
    ``adaptive/probe_seconds``, ``adaptive/updates``, ``adaptive/skipped`` and, with a trust region,
    ``adaptive/step_kl`` at each probe.

    Args:
        update_every: optimizer steps between probes (the paper's f_S).
        num_selected: ``|S|``, the timesteps whose change makes the reward.
        queue_size: capacity of the FIFO queue of the F-test.
        num_probe_timesteps: evenly spaced timesteps of the feature-selection probe (at most T); ``None``: the reward
            setting's (``'paper'``: all T, as the code; the others: 32).
        reward: ``'loss'`` (the default: it did best of the three on the MNIST tier, docs/benchmark.md),
            ``'paper'`` (the reproduction of the published method) or ``'normalized'`` (see the module docstring).
        policy: ``'beta'`` (per-sample Beta from a CNN on x0) or ``'global'`` (one categorical distribution).
        width: channels of the Beta policy's CNN.
        policy_resolution: the Beta policy average-pools larger inputs to this many pixels a side.
        lr: learning rate of the policy's Adam.
        grad_clip: maximum norm of the policy gradient.
        entropy_coef: weight of the entropy bonus in the reward; ``None``: the reward setting's (paper 0.01, else 0.1).
        seed: seed of the policy's initialisation (the same on every rank) and of the probes' keyed noise.
        probe_precision: ``'tf32'`` or ``'fp32'``: the probes' math on CUDA (see ``precision.py``). When FSDP's mixed
            precision casts the parameters, probes run on an fp32 replica of the denoiser refreshed from the shards.
        normalize: ``'none'``, ``'batch'`` or ``'running'``: the advantage (see :class:`~.policy.PolicyLearner`);
            ``None``: the setting's (paper ``'none'``, else ``'batch'``).
        uniform_mix: ``eps`` in [0, 1): t is drawn from ``(1 - eps) pi + eps U``; ``None``: the setting's (paper 0,
            else 0.1).
        max_kl: the largest mean ``KL(pi_old || pi_new)`` (nats) of one update, 0 for none; ``None``: the setting's
            (paper 0, else 0.01).
        importance_weighted: weight each draw's loss by ``1 / (T p(t | x))``, clipped and normalised over the batch.
        importance_clip: the largest importance weight before the normalisation (>= 1).
        frozen_average: a ``timestep_heatmap.npz`` of an earlier run: draw t from its time-averaged distribution
            (:func:`read_time_averaged_distribution`) instead, with no policy and no probes.

    Example:
        >>> adaptive = AdaptiveTimestepSampling(update_every=40, reward='loss', policy='global')
        >>> adaptive.update_every, adaptive.entropy_coef, adaptive.uniform_mix, adaptive.max_kl
        (40, 0.1, 0.1, 0.01)
    """

    events = (Event.FIT_START, Event.BEFORE_TRAIN_BATCH, Event.AFTER_FORWARD, Event.BATCH_END)
    owns_timestep_sampler = True

    def __init__(
        self,
        update_every: int = 40,
        num_selected: int = 3,
        queue_size: int = 20,
        num_probe_timesteps: int | None = None,
        reward: str = 'loss',
        policy: str = 'beta',
        width: int = 32,
        policy_resolution: int = 16,
        lr: float = 1e-2,
        grad_clip: float = 1.0,
        entropy_coef: float | None = None,
        seed: int = 0,
        probe_precision: str = 'tf32',
        normalize: str | None = None,
        uniform_mix: float | None = None,
        max_kl: float | None = None,
        importance_weighted: bool = False,
        importance_clip: float = 10.0,
        frozen_average: str | None = None,
    ):
        value: object  # the arguments as given, checked below
        low: float | None
        for name, value, low in (
            ('update_every', update_every, 1),
            ('num_selected', num_selected, 1),
            ('queue_size', queue_size, MIN_QUEUE),
            ('width', width, 1),
            ('policy_resolution', policy_resolution, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'{name} must be an integer >= {low}, got {value!r}.')
        if num_probe_timesteps is not None and (
            isinstance(num_probe_timesteps, bool) or not isinstance(num_probe_timesteps, int) or num_probe_timesteps < 2
        ):
            raise ValueError(
                f"num_probe_timesteps must be an integer >= 2 or null (the setting's), got {num_probe_timesteps!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f'seed must be an integer, got {seed!r}.')
        for name, value, allowed in (
            ('reward', reward, tuple(REWARDS)),
            ('policy', policy, POLICIES),
            ('probe_precision', probe_precision, PROBE_PRECISIONS),
            ('normalize', normalize, (*NORMALIZATIONS, None)),
        ):
            if value not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
        setting = REWARDS[reward]
        num_probe_timesteps = setting.num_probe_timesteps if num_probe_timesteps is None else num_probe_timesteps
        if num_probe_timesteps is not None and num_selected > num_probe_timesteps:
            raise ValueError(
                f'num_selected ({num_selected}) must not exceed num_probe_timesteps '
                f'({num_probe_timesteps}): S is chosen among the probe timesteps.'
            )
        entropy_coef = setting.entropy_coef if entropy_coef is None else entropy_coef
        uniform_mix = setting.uniform_mix if uniform_mix is None else uniform_mix
        max_kl = setting.max_kl if max_kl is None else max_kl
        for name, value, low, high in (
            ('lr', lr, 0, None),
            ('grad_clip', grad_clip, 0, None),
            ('entropy_coef', entropy_coef, None, None),
            ('max_kl', max_kl, None, None),
            ('uniform_mix', uniform_mix, None, 1.0),
            ('importance_clip', importance_clip, None, None),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (low is not None and value <= low)
                or (high is not None and value >= high)
                or (name == 'importance_clip' and value < 1)
            ):
                bound = {'lr': '> 0', 'grad_clip': '> 0', 'uniform_mix': 'in [0, 1)', 'importance_clip': '>= 1'}
                raise ValueError(f'{name} must be a finite number {bound.get(name, ">= 0")}, got {value!r}.')
        if not isinstance(importance_weighted, bool):
            raise ValueError(f'importance_weighted must be true or false, got {importance_weighted!r}.')
        self.frozen_distribution: torch.Tensor | None = None
        if frozen_average is not None:
            if importance_weighted:
                raise ValueError(
                    'frozen_average and importance_weighted exclude each other: the frozen average is the '
                    'control of the sampler without weights.'
                )
            self.frozen_distribution = read_time_averaged_distribution(frozen_average)
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
        self.normalize = setting.normalize if normalize is None else normalize
        self.uniform_mix = float(uniform_mix)
        self.max_kl = float(max_kl)
        self.importance_weighted = importance_weighted
        self.importance_clip = float(importance_clip)
        self.frozen_average = frozen_average

        # What it learns, built at Event.INIT for the model's T: the policy with its optimizer, and S with its queue.
        self.learner: PolicyLearner | None = None
        self.selection: TimestepSelection | None = None
        self.sampler: Any | None = None
        self.num_timesteps = 0
        self.prober = Prober(seed, setting.terms, setting.in_bits, setting.per_timestep_scale, probe_precision)
        self.num_probes = 0
        self.probe_due = False  # a probe is due and waits for a step with a non-zero learning rate
        self._probe: Probe | None = None

    def __repr__(self) -> str:
        text = (
            f'AdaptiveTimestepSampling(update_every={self.update_every}, num_selected={self.num_selected}, '
            f'queue_size={self.queue_size}, num_probe_timesteps={self.num_probe_timesteps}, '
            f'reward={self.reward!r}, policy={self.policy_kind!r}, width={self.width}, '
            f'policy_resolution={self.policy_resolution}, lr={self.lr}, grad_clip={self.grad_clip}, '
            f'entropy_coef={self.entropy_coef}, seed={self.seed}, probe_precision={self.probe_precision!r}, '
            f'normalize={self.normalize!r}, uniform_mix={self.uniform_mix}, max_kl={self.max_kl}, '
            f'importance_weighted={self.importance_weighted}, importance_clip={self.importance_clip}'
        )
        return text + (f', frozen_average={self.frozen_average!r})' if self.frozen_average else ')')

    @property
    def needs(self) -> tuple[str, ...]:
        """The contract members it uses: the probes' terms are VLB terms or training losses."""
        if self.frozen_distribution is not None:
            return ('num_timesteps', 'set_timestep_sampler')
        terms = 'vlb_terms' if self.setting.terms == 'kl' else 'training_losses'
        return ('conditioning', 'denoiser', 'images', 'num_timesteps', 'set_timestep_sampler', terms)

    # What the learner and the selection hold, under the names the checkpoint and the logs use.
    @property
    def policy(self) -> nn.Module | None:
        return None if self.learner is None else self.learner.policy

    @property
    def optimizer(self) -> torch.optim.Adam | None:
        return None if self.learner is None else self.learner.optimizer

    @property
    def num_updates(self) -> int:
        return 0 if self.learner is None else self.learner.num_updates

    @property
    def num_skipped(self) -> int:
        return 0 if self.learner is None else self.learner.num_skipped

    @property
    def selected(self) -> torch.Tensor:
        """S, as a tensor of timesteps."""
        return torch.empty(0, dtype=torch.long) if self.selection is None else self.selection.selected

    @property
    def selected_timesteps(self) -> list[int]:
        """The current set S, as timesteps."""
        return self.selected.tolist()

    @property
    def queue_x(self) -> torch.Tensor:
        return self._selection.queue_x

    @property
    def queue_y(self) -> torch.Tensor:
        return self._selection.queue_y

    @property
    def probe_timesteps(self) -> torch.Tensor:
        """The grid of the feature-selection probe."""
        return self._selection.probe_timesteps

    @property
    def probe_weights(self) -> torch.Tensor:
        """The timesteps each grid point stands for."""
        return self._selection.probe_weights

    @property
    def _learner(self) -> PolicyLearner:
        """The learner, which exists from Event.INIT on (never with ``frozen_average``)."""
        if self.learner is None:
            raise RuntimeError('AdaptiveTimestepSampling has no policy before Event.INIT, nor with frozen_average.')
        return self.learner

    @property
    def _selection(self) -> TimestepSelection:
        """The selection of S, which exists from Event.INIT on (never with ``frozen_average``)."""
        if self.selection is None:
            raise RuntimeError(
                'AdaptiveTimestepSampling has no timestep selection before Event.INIT, nor with frozen_average.'
            )
        return self.selection

    # -------------------------------------------------------------------------------------------- events
    def match(self, event: Event, state: State) -> bool:
        if self.frozen_distribution is not None:
            return event == Event.INIT  # a fixed sampler: nothing to learn
        # The draws and the step are collected only while a probe is under way.
        probing = self._probe is not None or event not in (Event.AFTER_FORWARD, Event.BATCH_END)
        return super().match(event, state) and probing

    def act(self, event: Event, state: State, logger: Logger) -> None:
        model = self.diffusion_model(state)
        if event == Event.FIT_START:
            device = module_device(model)
            self._learner.place(device)
            if self.prober.replica is not None:
                self.prober.replica.to(device)
        elif event == Event.BEFORE_TRAIN_BATCH:
            if int(state.timestamp.batch) % self.update_every == 0:
                self.probe_due = True
            if self.probe_due and _learning_rate(state) > 0:
                self._probe_before(state, model)
        elif event == Event.AFTER_FORWARD:
            self._collect_timesteps(state)
        elif event == Event.BATCH_END:
            self._probe_after(state, model, logger)

    def install(self, model: Any, state: State, logger: Logger) -> None:
        if self.frozen_distribution is not None:
            self._install_frozen(model, self.frozen_distribution)
            return
        num_probe_timesteps = self.num_probe_timesteps or model.num_timesteps
        if num_probe_timesteps > model.num_timesteps or self.num_selected > num_probe_timesteps:
            raise ValueError(
                f'num_probe_timesteps ({num_probe_timesteps}) must not exceed the number of timesteps of '
                f'the noise schedule ({model.num_timesteps}), nor fall below num_selected '
                f'({self.num_selected}).'
            )
        # No variational bound on a flow-matching model: every setting probes the training loss there.
        self.prober.terms = 'loss' if objective_of(model) == 'flow_matching' else self.setting.terms
        # Made from the bare denoiser, before FSDP wraps it (see precision.py).
        self.prober.replica = FullPrecisionReplica(model.denoiser) if casts_parameters(state) else None
        # Built once: installing again (a rebuilt Trainer) keeps the policy, its optimizer, the queue and S.
        if self.learner is None or self.num_timesteps != model.num_timesteps:
            self._build(int(model.num_timesteps))
        model.set_timestep_sampler(self.sampler, owner=self.owner)

    def _install_frozen(self, model: Any, distribution: torch.Tensor) -> None:
        """The fixed sampler of ``frozen_average``, ``distribution`` (a checkpoint's replaces the file's when
        loaded)."""
        if distribution.numel() != model.num_timesteps:
            raise ValueError(
                f'frozen_average {self.frozen_average!r} holds a distribution over '
                f'{distribution.numel()} timesteps; the model has {model.num_timesteps}.'
            )
        if self.sampler is None or self.num_timesteps != model.num_timesteps:
            self.num_timesteps = int(model.num_timesteps)
            self.sampler = FrozenSampler(distribution)
        model.set_timestep_sampler(self.sampler, owner=self.owner)

    def _build(self, num_timesteps: int) -> None:
        """The policy, its optimizer and sampler, the probe grid, the initial S and an empty queue for
        ``num_timesteps``: what it learns belongs to one T."""
        self.num_timesteps = num_timesteps
        policy: BetaPolicy | GlobalPolicy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the same initial policy on every rank
            if self.policy_kind == 'beta':
                policy = BetaPolicy(
                    self.width, self.policy_resolution, self.setting.concentration, self.setting.initial_concentration
                )
            else:
                policy = GlobalPolicy(self.num_timesteps)
        self.learner = PolicyLearner(
            policy,
            self.num_timesteps,
            self.lr,
            self.grad_clip,
            self.normalize,
            self.entropy_coef,
            self.uniform_mix,
            self.max_kl,
        )
        self.sampler = PolicySampler(
            policy, self.num_timesteps, self.uniform_mix, self.importance_weighted, self.importance_clip
        )
        self.selection = TimestepSelection(
            self.num_timesteps,
            self.num_probe_timesteps or num_timesteps,
            self.num_selected,
            self.queue_size,
            self.setting.initial_selection,
        )
        self.num_probes = 0
        self.probe_due = False

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
        self._learner.place(x0.device)
        tau = self.selected.to(x0.device)
        probe = self.prober.before(model, x0, model.conditioning(batch), tau, self._selection, self.num_probes, step)
        probe.seconds = time.perf_counter() - start
        self._probe = probe
        self.probe_due = False

    def _collect_timesteps(self, state: State) -> None:
        probe = self._probe
        assert probe is not None, 'match() passes the draws on only while a probe is under way'
        record = draw_record(state, self)
        if not probe.t:
            # The prior in force when t was drawn (a curriculum may change it at the next batch).
            probe.prior = None if record.prior is None else record.prior.detach()
        probe.t.append(record.t.detach())

    def _probe_after(self, state: State, model: Any, logger: Logger) -> None:
        probe, self._probe = self._probe, None
        assert probe is not None, 'match() passes the step on only while a probe is under way'
        start = time.perf_counter()
        changes, grid_changes = self.prober.after(model, probe)
        self._selection.push(grid_changes)
        batch_size = probe.x0.shape[0]
        t = torch.cat(probe.t) if probe.t else torch.empty(0, dtype=torch.long)
        if t.numel() != batch_size:
            raise RuntimeError(
                f'AdaptiveTimestepSampling collected {t.numel()} drawn timesteps for a batch of '
                f'{batch_size}; the forward outputs must hold one t per sample.'
            )
        with torch.enable_grad():
            metrics = self.update_policy(probe.x0, t, self.rewards(changes), probe.prior, _loss_is_finite(state.loss))
        self.num_probes += 1
        self._selection.reselect()
        metrics['adaptive/probe_seconds'] = probe.seconds + time.perf_counter() - start
        for i, step in enumerate(self.selected_timesteps):
            metrics[f'adaptive/S{i}'] = step
        logger.log_metrics(metrics)

    def rewards(self, changes: torch.Tensor) -> torch.Tensor:
        """Per-sample rewards from this rank's ``(|S|, B)`` changes at the selected timesteps (see ``probe.py``)."""
        return self.prober.rewards(changes)

    # -------------------------------------------------------------------------------------------- REINFORCE
    def log_probs(self, x0: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` log-probabilities of the distribution t is drawn from (the policy tilted by ``prior``), with
        grad."""
        return self._learner.log_probs(x0, prior)

    def update_policy(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        reward: torch.Tensor,
        prior: torch.Tensor | None = None,
        loss_finite: bool = True,
    ) -> dict[str, float]:
        """One REINFORCE step on the policy from this rank's ``(x0, t, reward)`` (collective across ranks; see
        :meth:`PolicyLearner.update`). Returns the metrics to log."""
        return self._learner.update(x0, t, reward, prior, loss_finite, self.num_probes)

    # -------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.frozen_distribution is not None:
            return {**super().state_dict(), 'frozen_distribution': self.frozen_distribution.clone()}
        if self.learner is None:
            raise RuntimeError('AdaptiveTimestepSampling has no state before Event.INIT.')
        learner = self.learner.state_dict()
        return {
            **super().state_dict(),
            'policy': learner['policy'],
            'optimizer': learner['optimizer'],
            **self._selection.state_dict(),
            'num_probes': self.num_probes,
            'num_updates': learner['num_updates'],
            'num_skipped': learner['num_skipped'],
            'reward_moments': learner['reward_moments'],
            'probe_due': self.probe_due,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        if self.frozen_distribution is not None:
            if 'frozen_distribution' not in state:
                raise ValueError('The checkpoint holds a learnt policy; this run has frozen_average set.')
            # The distribution the run trained with, whatever the file holds now: the resumed run draws the same t.
            self.frozen_distribution = state['frozen_distribution'].clone().double()
            if self.sampler is not None:
                self.sampler.load(self.frozen_distribution)
            return
        if self.learner is None:
            raise RuntimeError('AdaptiveTimestepSampling must see Event.INIT before its state is loaded.')
        self._selection.load_state_dict(state)
        self.learner.load_state_dict(state)
        self.num_probes = int(state['num_probes'])
        self.probe_due = bool(state.get('probe_due', False))
        self._probe = None


# ------------------------------------------------------------------------------------------------ helpers
def read_time_averaged_distribution(path: str) -> torch.Tensor:
    """The ``(T,)`` time-averaged distribution of a run's ``timestep_heatmap.npz`` (its ``steps`` and ``probs`` rows,
    as the ``timestep_heatmap`` callback writes them), each row weighted by the training steps it covers
    (:func:`~.functional.time_averaged_distribution`)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(
            f'frozen_average must be the path of a timestep_heatmap.npz (written by the timestep_heatmap '
            f'callback of an adaptive run), got {path!r}: no such file.'
        )
    with np.load(path) as record:
        if 'steps' not in record or 'probs' not in record:
            raise ValueError(
                f'frozen_average {path!r} holds {sorted(record)}, not the steps and probs rows of a timestep heatmap.'
            )
        steps, probs = torch.as_tensor(record['steps']), torch.as_tensor(record['probs'])
    return time_averaged_distribution(steps, probs)


def _learning_rate(state: State) -> float:
    """The largest learning rate the optimizers will use in this step."""
    return max((float(group['lr']) for optimizer in state.optimizers for group in optimizer.param_groups), default=1.0)


def _loss_is_finite(loss: Any) -> bool:
    if loss is None:
        return True
    if isinstance(loss, dict):
        return all(_loss_is_finite(v) for v in loss.values())
    if isinstance(loss, (list, tuple)):
        return all(_loss_is_finite(v) for v in loss)
    return bool(torch.isfinite(torch.as_tensor(loss).detach()).all())
