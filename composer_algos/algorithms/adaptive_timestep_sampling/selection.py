"""The adaptive sampler's choice of S (arXiv 2411.09998): a FIFO queue of probe-image changes, a univariate F-test."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from composer_algos.algorithms.adaptive_timestep_sampling.functional import (
    grid_timesteps,
    grid_weights,
    select_timesteps,
)
from composer_algos.distributed import all_gather_variable, rank_world

__all__ = ['INITIAL_SELECTIONS', 'MIN_QUEUE', 'TimestepSelection']

log = logging.getLogger(__name__)

MIN_QUEUE = 3  # the F statistic has n - 2 degrees of freedom
# How S starts: the first timesteps ({0, 1, 2}, the paper's code) or evenly spaced over the probe grid.
INITIAL_SELECTIONS = ('first', 'spread')


class TimestepSelection:
    """The set ``S`` of timesteps whose change makes the reward, re-chosen by an F-test over a FIFO queue.

    Each probe measures the change (before minus after the optimizer step) of one probe image's terms at every
    timestep of the probe grid; the queue keeps the last ``queue_size`` rows of those changes with their weighted
    total (each grid point weighted by the timesteps it stands for, so the total estimates the sum over all T). Once
    it holds :data:`MIN_QUEUE` rows, ``S`` is the ``num_selected`` grid timesteps whose change best predicts the
    total (:func:`~.functional.select_timesteps`). Every rank holds the same queue and ``S``.

    Args:
        num_timesteps: T.
        num_probe_timesteps: evenly spaced timesteps of the probe grid (both ends included); T: all of them.
        num_selected: ``|S|``.
        queue_size: capacity of the queue.
        initial: ``'first'`` or ``'spread'`` (:data:`INITIAL_SELECTIONS`).
    """

    def __init__(self, num_timesteps: int, num_probe_timesteps: int, num_selected: int, queue_size: int, initial: str):
        if initial not in INITIAL_SELECTIONS:
            raise ValueError(f'initial must be one of {INITIAL_SELECTIONS}, got {initial!r}.')
        self.num_timesteps = int(num_timesteps)
        self.num_probe_timesteps = int(num_probe_timesteps)
        self.num_selected = int(num_selected)
        self.queue_size = int(queue_size)
        self.probe_timesteps = grid_timesteps(self.num_timesteps, self.num_probe_timesteps)
        self.probe_weights = grid_weights(self.probe_timesteps, self.num_timesteps)
        if initial == 'first':
            self.selected = torch.arange(self.num_selected)
        else:
            self.selected = self.probe_timesteps[_evenly_spaced(self.num_probe_timesteps, self.num_selected)]
        self.queue_x = torch.empty(0, self.num_probe_timesteps, dtype=torch.float64)
        self.queue_y = torch.empty(0, dtype=torch.float64)

    def grid_share(self) -> tuple[torch.Tensor, int]:
        """This rank's equal-sized share of the probe grid (indices, padded by repeats) and its number of real
        entries."""
        rank, world = rank_world()
        per_rank = math.ceil(self.num_probe_timesteps / world)
        index = torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp(max=self.num_probe_timesteps - 1)
        num_real = max(0, min(per_rank, self.num_probe_timesteps - rank * per_rank))
        return index, num_real

    def push(self, local_change: torch.Tensor) -> None:
        """All-gather the probe image's changes (this rank's real share) and append them, and their weighted total,
        to the queue (collective across ranks)."""
        # The ranks' shares are consecutive slices of the grid, so their concatenation in rank order is the grid.
        row = torch.cat(all_gather_variable(local_change.to(torch.float64))).cpu()
        if not bool(torch.isfinite(row).all()):
            log.warning('AdaptiveTimestepSampling: non-finite change in the feature probe; the queue is unchanged.')
            return
        self.queue_x = torch.cat([self.queue_x, row[None]])[-self.queue_size :]
        total = (row * self.probe_weights).sum()  # estimates the change summed over all T timesteps
        self.queue_y = torch.cat([self.queue_y, total[None]])[-self.queue_size :]

    def reselect(self) -> None:
        """Re-choose ``S`` by the F-test once the queue holds enough probes."""
        if self.queue_x.shape[0] >= MIN_QUEUE:
            self.selected = self.probe_timesteps[select_timesteps(self.queue_x, self.queue_y, self.num_selected)]

    def state_dict(self) -> dict[str, Any]:
        return {'selected': self.selected.clone(), 'queue_x': self.queue_x.clone(), 'queue_y': self.queue_y.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state['queue_x'].shape[1:] != (self.num_probe_timesteps,):
            raise ValueError(
                f'The checkpoint was written with num_probe_timesteps={state["queue_x"].shape[1]}; this '
                f'run has num_probe_timesteps={self.num_probe_timesteps}.'
            )
        if state['selected'].numel() != self.num_selected:
            raise ValueError(
                f'The checkpoint was written with num_selected={state["selected"].numel()}; this run has '
                f'num_selected={self.num_selected}.'
            )
        self.selected = state['selected'].clone().long()
        self.queue_x = state['queue_x'].clone()[-self.queue_size :]
        self.queue_y = state['queue_y'].clone()[-self.queue_size :]


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced interior indices of ``range(n)``."""
    return torch.linspace(0, n - 1, k + 2)[1:-1].round().long().clamp(0, n - 1)
