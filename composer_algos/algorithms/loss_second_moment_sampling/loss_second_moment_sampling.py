"""Importance sampling of timesteps by the loss's second moment: Nichol & Dhariwal, "Improved Denoising Diffusion
Probabilistic Models", ICML 2021 (arXiv 2102.09672), section 3.3; ``LossSecondMomentResampler`` in
openai/improved-diffusion ``resample.py``.

Each timestep keeps its last ``history`` (10) per-sample unweighted losses. Until every timestep has a full
history, t is uniform. Then ``p(t) ∝ sqrt(E[L_t^2])`` over the history, mixed with ``uniform_prob`` (0.001) of the
uniform distribution, and the model weights the loss by ``1 / (T p(t))`` (the sampler declares
``importance = True``), so the expected loss is unchanged and only its variance drops.

Distributed: per-sample losses are read at every micro-batch's ``Event.AFTER_LOSS``, gathered from all ranks once
per batch (padded, so ranks may hold different numbers of samples) and appended in rank order; every rank holds
the same history and draws from the same distribution with its own generator.

Deviations from the original, each stated once:

- With loss weightings installed (Min-SNR, P2, SpeeD), the objective is ``E_t[w(t) L_t]``; its variance-optimal
  proposal is ``p(t) ∝ w(t) sqrt(E[L_t^2])``, which is used. Without weightings ``w = 1``: the original.
- The history of t is a ring: its n-th loss (counting from 0) is stored at ``losses[t, n % history]``;
  ``counts[t]`` counts every loss seen (the original caps it). The second moment does not depend on the order.
- Non-finite losses are not recorded.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from composer.core import Event, State
from composer.loggers import Logger

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.common import draw_record
from composer_algos.diffusion.timestep_samplers import TimestepSampler
from composer_algos.distributed import all_gather_variable

__all__ = ['LossSecondMomentSampler', 'LossSecondMomentSampling', 'append_losses', 'loss_second_moment_probs']

log = logging.getLogger(__name__)


def append_losses(
    losses: torch.Tensor, counts: torch.Tensor, t: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Record ``values[i]`` as the newest loss of timestep ``t[i]``, in order; return the new ``(losses, counts)``.

    ``losses`` is the ``(T, history)`` ring of each timestep, ``counts`` the ``(T,)`` number of losses seen so far.
    The inputs are not modified.
    """
    history = losses.shape[1]
    t = t.detach().long().cpu()
    values = values.detach().to(torch.float64).cpu()
    order = torch.argsort(t, stable=True)
    t, values = t[order], values[order]
    steps, group, group_size = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    # Position of each loss among those of its timestep in this call, in arrival order.
    occurrence = torch.arange(t.numel()) - (torch.cumsum(group_size, 0) - group_size)[group]
    # Only the last `history` losses of a timestep survive; keeping just those makes every slot written once.
    keep = occurrence >= group_size[group] - history
    slot = (counts[t] + occurrence) % history
    losses = losses.clone()
    losses[t[keep], slot[keep]] = values[keep]
    counts = counts.clone()
    counts[steps] += group_size
    return losses, counts


def loss_second_moment_probs(
    losses: torch.Tensor, counts: torch.Tensor, uniform_prob: float = 0.001, loss_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Improved DDPM's distribution over T timesteps, ``(T,)`` float64.

    Uniform until every timestep has ``history`` losses; then
    ``(1 - uniform_prob) * w sqrt(mean L^2) / sum(w sqrt(mean L^2)) + uniform_prob / T`` (``w = 1`` when
    ``loss_weights`` is None). Uniform as well if every ``w sqrt(mean L^2)`` is 0.
    """
    num_timesteps, history = losses.shape
    uniform = torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)
    if not bool((counts >= history).all()):
        return uniform
    scores = losses.to(torch.float64).pow(2).mean(1).sqrt()
    if loss_weights is not None:
        scores = scores * loss_weights.detach().to(torch.float64).cpu().abs()
    total = scores.sum()
    if not (float(total) > 0 and math.isfinite(float(total))):
        return uniform
    return scores / total * (1.0 - uniform_prob) + uniform_prob / num_timesteps


class LossSecondMomentSampler(TimestepSampler):
    """The timestep sampler: a loss history per timestep and :func:`loss_second_moment_probs` over it.

    Args:
        num_timesteps: T.
        history: losses kept per timestep.
        uniform_prob: probability mass mixed in uniformly.
    The model gives it its ``(T,)`` loss weights ``w(t)`` (the product of its weightings) whenever they change, and
    the distribution is recomputed only when the history or the weights change.
    """

    importance = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.loss_weights: torch.Tensor | None = None
        self.losses = torch.zeros(num_timesteps, self.history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)
        self._probs: torch.Tensor | None = None

    def warm(self) -> bool:
        """Whether every timestep has a full history (before that, t is uniform)."""
        return bool((self.counts >= self.history).all())

    def set_loss_weights(self, weights: torch.Tensor) -> None:
        self.loss_weights = weights.detach().to(torch.float64).cpu()
        self._probs = None

    def probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        if self._probs is None:
            self._probs = loss_second_moment_probs(
                self.losses, self.counts, self.uniform_prob, self.loss_weights
            ).float()
        return self._probs if x0 is None else self._probs.to(x0.device)

    def load(self, losses: torch.Tensor, counts: torch.Tensor) -> None:
        """Replace the history (from a checkpoint)."""
        self.losses = losses.detach().to(torch.float64).cpu().clone()
        self.counts = counts.detach().long().cpu().clone()
        self._probs = None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append per-sample losses of timesteps ``t`` in order (non-finite ones are skipped)."""
        finite = torch.isfinite(losses)
        self.losses, self.counts = append_losses(self.losses, self.counts, t[finite], losses[finite])
        self._probs = None

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(num_timesteps={self.num_timesteps}, history={self.history}, '
            f'uniform_prob={self.uniform_prob})'
        )


class LossSecondMomentSampling(DiffusionAlgorithm):
    """Owns the timestep sampler: Improved DDPM's importance sampling by ``sqrt(E[L_t^2])``, weights ``1 / (T p)``.

    Reads ``t`` and the unweighted ``per_sample_loss`` from the model's draw record at every ``Event.AFTER_LOSS`` (once
    per micro-batch), all-gathers them at ``Event.AFTER_TRAIN_BATCH`` and appends them to the history, which is
    therefore the same on every rank. The history (``losses``, ``counts``) is saved in checkpoints. Logs
    ``loss_second_moment/filled`` (fraction of timesteps with a full history) and, once warm,
    ``loss_second_moment/max_importance_weight``.

    Args:
        history: losses kept per timestep (10 in Improved DDPM).
        uniform_prob: probability mass mixed in uniformly, in (0, 1] (0.001); it bounds the importance weights
            by ``1 / uniform_prob``.

    Example:
        >>> LossSecondMomentSampling(history=10, uniform_prob=0.001)
        LossSecondMomentSampling(history=10, uniform_prob=0.001)
    """

    needs = ('num_timesteps', 'set_timestep_sampler')
    events = (Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH)
    owns_timestep_sampler = True

    def __init__(self, history: int = 10, uniform_prob: float = 0.001):
        if isinstance(history, bool) or int(history) != history or history < 1:
            raise ValueError(f'history must be a positive integer, got {history!r}.')
        if not 0.0 < uniform_prob <= 1.0:
            raise ValueError(f'uniform_prob must be in (0, 1], got {uniform_prob}.')
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.sampler: LossSecondMomentSampler | None = None
        self._pending: list[torch.Tensor] = []
        self._loaded: dict[str, Any] | None = None

    def install(self, model: Any, state: State, logger: Logger) -> None:
        # Built once: installing again (a rebuilt Trainer) keeps the history.
        if self.sampler is None or self.sampler.num_timesteps != model.num_timesteps:
            self.sampler = LossSecondMomentSampler(model.num_timesteps, self.history, self.uniform_prob)
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        model.set_timestep_sampler(self.sampler, self.owner)

    def act(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_TRAIN_BATCH:
            # Fires again when automatic micro-batching retries a batch after running out of memory: the failed
            # attempt's losses must not be recorded.
            self._pending = []
        elif event == Event.AFTER_LOSS:
            record = draw_record(state, self)
            if record.per_sample_loss is None:
                raise ValueError(f'{self.owner} reads the per-sample loss from the draw record; the model set none.')
            self._pending.append(
                torch.stack(
                    [record.t.detach().to(torch.float64), record.per_sample_loss.detach().to(torch.float64)], dim=1
                )
            )
        else:
            self._record(logger)

    def _record(self, logger: Logger) -> None:
        assert self.sampler is not None
        rows = torch.cat(self._pending) if self._pending else torch.zeros((0, 2), dtype=torch.float64)
        self._pending = []
        rows = torch.cat(all_gather_variable(rows)).cpu()
        was_warm = self.sampler.warm()
        self.sampler.update(rows[:, 0].long(), rows[:, 1])
        if self.sampler.warm() and not was_warm:
            log.info('%s: every timestep has %d losses; importance sampling starts.', type(self).__name__, self.history)
        metrics = {'loss_second_moment/filled': float((self.sampler.counts >= self.history).double().mean())}
        if self.sampler.warm():
            metrics['loss_second_moment/max_importance_weight'] = float(
                1.0 / (self.sampler.num_timesteps * self.sampler.probs().min())
            )
        logger.log_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.sampler is not None:
            state.update(losses=self.sampler.losses.clone(), counts=self.sampler.counts.clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'losses' not in state:
            return
        if self.sampler is None:
            self._loaded = state  # Applied at Event.INIT, once the number of timesteps is known.
        else:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.sampler is not None
        losses, counts = state['losses'], state['counts']
        if tuple(losses.shape) != tuple(self.sampler.losses.shape):
            raise ValueError(
                f'{type(self).__name__}: the checkpoint holds a loss history of shape '
                f'{tuple(losses.shape)}, this run needs (num_timesteps, history) = '
                f'{tuple(self.sampler.losses.shape)}.'
            )
        self.sampler.load(losses, counts)
