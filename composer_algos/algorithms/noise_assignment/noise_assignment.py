"""Noise assignment: Li et al., "Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment",
NeurIPS 2024 (arXiv 2406.12303), its KNN variant in "Improved Immiscible Diffusion" (arXiv 2505.18521), and the
minibatch optimal-transport coupling of OT-CFM (Tong et al., TMLR 2024, arXiv 2302.00482); code read:
yhli123/Immiscible-Diffusion and atong01/conditional-flow-matching (``torchcfm/optimal_transport.py``).

Each training batch's data x0 and its noise are re-paired before noising, so that an image trains with a nearby
noise. ``mode: hungarian``: the permutation ``pi`` of the batch's noises minimising ``sum_i c(x0_i, eps_pi(i))`` (by
``scipy.optimize.linear_sum_assignment``), ``c`` the L2 distance of the flattened tensors (``cost: l2``, Immiscible
Diffusion) or its square (``cost: sq_l2``, OT-CFM's exact plan, which for equal batches is a permutation too); over
the global batch (``scope: global``: x0 and noise all-gathered once, every rank solves the same problem and keeps its
own rows) or each rank's (``scope: rank``). The set of noises is unchanged, so each one is still N(0, I); a sample's
noise now depends on the batch. ``mode: knn``: each image draws ``k - 1`` more noises and keeps the nearest of its
``k``; no exchange between samples, but the kept noise is no longer N(0, I) (it is pulled towards the image: the
minimum of ``k`` distances), a bias the method accepts. Timesteps are drawn as before; inference is unchanged.

Deviations from the papers' code, each stated once:

- The noises are the model's keyed draws (candidates in a keyed stream of their own), not ``torch.randn``: a
  resumed run, or one on another number of ranks, assigns exactly the same noises.
- Costs are computed in float64 on the unscaled data; Immiscible's code scales both sides by 0.1 and computes in
  float16 (the scale does not change the assignment; float16 can, through rounding ties).
- ``scope: global`` solves on every rank the same gathered problem (deterministic) instead of solving on rank 0 and
  sending each rank its rows: one all-gather, no point-to-point sends.
- OT-CFM draws ``batch_size`` pairs from the plan with replacement (about 63% distinct pairs); the permutation is
  used as it is here, as Immiscible Diffusion does, so every image and every noise trains once per batch.
- Class labels stay with their image (only noises move); ``by_condition: true`` assigns within each class, so the
  noise paired with a class is drawn from that class's own samples (the papers pair across the whole batch, which
  skews the noise prior per condition, arXiv 2503.10636). Captions (not in this package yet) are paired within the
  batch ignoring the text, as the papers do.
- A degenerate assignment (non-finite costs, a batch of one, every pairing costing the same) keeps the drawn noise
  and says so in the run's log; torchcfm falls back to a uniform plan with a warning only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Event, State
from composer.loggers import Logger
from scipy.optimize import linear_sum_assignment

from composer_algos.algorithms.base import DiffusionAlgorithm
from composer_algos.algorithms.common import draw_record
from composer_algos.diffusion.draw import NoiseDraw, NoisePairing
from composer_algos.distributed import all_gather_variable, global_positions, is_distributed, rank_world
from composer_algos.registry import ConfigError

__all__ = ['COSTS', 'MODES', 'NoiseAssignment', 'SCOPES', 'candidate_costs', 'hungarian_assignment', 'pairwise_cost']

log = logging.getLogger(__name__)

MODES = ('hungarian', 'knn')
COSTS = ('l2', 'sq_l2')
SCOPES = ('global', 'rank')


def pairwise_cost(x0: torch.Tensor, noise: torch.Tensor, cost: str = 'l2') -> torch.Tensor:
    """``(B, B)`` float64 costs ``c(x0_i, noise_j)`` of the flattened tensors: the L2 distance (``'l2'``) or its
    square (``'sq_l2'``), on ``x0``'s device.

    Example:
        >>> pairwise_cost(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]))
        tensor([[5.]], dtype=torch.float64)
    """
    _check_choice('cost', cost, COSTS)
    a, b = x0.flatten(1).double(), noise.flatten(1).to(x0.device, torch.float64)
    # |a|^2 + |b|^2 - 2 a.b in float64: B x B memory, exact to about 1e-15 of the norms.
    squared = (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)
    return squared if cost == 'sq_l2' else squared.sqrt()


def hungarian_assignment(cost: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """The permutation ``perm`` (``(B,)`` long) minimising ``sum_i cost[i, perm[i]]``: sample ``i`` gets noise
    ``perm[i]``; with ``groups`` (``(B,)``, e.g. class labels) samples only take noises of their own group.

    Solved by ``scipy.optimize.linear_sum_assignment`` on the CPU, one problem per group. A group of one keeps its
    own noise.

    Raises:
        ValueError: for fewer than 2 samples (there is nothing to permute) or non-finite costs.

    Example:
        >>> hungarian_assignment(torch.tensor([[5.0, 1.0], [1.0, 5.0]])).tolist()
        [1, 0]
    """
    size = cost.shape[0]
    if cost.dim() != 2 or cost.shape[1] != size:
        raise ValueError(f'cost must be a square (B, B) matrix, got shape {tuple(cost.shape)}.')
    if size < 2:
        raise ValueError(
            f'Noise assignment permutes the noises of a batch; a batch of {size} sample has nothing to permute.'
        )
    matrix = cost.detach().to('cpu', torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError('Noise assignment got non-finite costs (NaN or infinite values in the data or the noise).')
    perm = torch.arange(size)
    members = (
        [perm] if groups is None else [torch.nonzero(groups.cpu() == g).flatten() for g in torch.unique(groups.cpu())]
    )
    for idx in members:
        if idx.numel() < 2:
            continue
        rows, cols = linear_sum_assignment(matrix[idx][:, idx].numpy())
        perm[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
    return perm


def candidate_costs(x0: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` float64 L2 distances from each sample ``x0[i]`` to its own candidates ``candidates[i, j]``
    (``(B, k, *shape)``); its squared distance orders the candidates the same way."""
    return torch.stack(
        [(x0 - candidates[:, j]).flatten(1).double().square().sum(1).sqrt() for j in range(candidates.shape[1])], dim=1
    )


def _all_costs_equal(cost: torch.Tensor) -> bool:
    """Whether every permutation of this cost matrix costs the same: ``cost[i, j] = a_i + b_j``, i.e. its double
    centring vanishes (identical images, or identical noises)."""
    centred = cost - cost.mean(0, keepdim=True) - cost.mean(1, keepdim=True) + cost.mean()
    return float(centred.abs().max()) <= 1e-12 * max(float(cost.abs().max()), 1e-300)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {", ".join(allowed)}; got {value!r}.')


class NoiseAssignment(DiffusionAlgorithm):
    """Pairs each training batch's keyed noise with its data: Immiscible Diffusion's linear assignment (or OT-CFM's
    squared cost), or its KNN variant. DDPM and flow matching.

    Installs a noise coupling on the model (``set_noise_coupling``); the model's forward calls it with the batch's
    data, keyed noise and class labels, and publishes what it did in the draw record (``noise_pairing``). Logs per
    batch ``noise_assignment/cost_drawn`` and ``noise_assignment/cost_assigned`` (the mean distance from an image to
    its noise before and after), ``noise_assignment/moved`` (the fraction of samples whose noise changed) and
    ``noise_assignment/degenerate`` (micro-batches whose drawn noise was kept, each reported in the run's log).

    Args:
        mode: ``'hungarian'`` (a permutation of the batch's noises) or ``'knn'`` (each image keeps the nearest of
            ``k`` noises of its own; the noise is then not exactly N(0, I)).
        cost: ``'l2'`` (the L2 distance, as Immiscible Diffusion) or ``'sq_l2'`` (its square, as OT-CFM); for
            ``knn`` both pick the same candidate.
        scope: ``'global'`` (the whole global batch, all-gathered once per micro-batch) or ``'rank'`` (each rank's
            batch); ``knn`` works per image and ignores it.
        by_condition: assign only within each class (needs class labels); images always keep their labels.
        k: candidates per image for ``knn`` (4 in the flow-matching code, 64 in the Stable Diffusion code), at
            least 2.

    Example:
        >>> NoiseAssignment(mode='hungarian', cost='l2')
        NoiseAssignment(mode='hungarian', cost='l2', scope='global', by_condition=False, k=4)
    """

    needs = ('set_noise_coupling',)
    events = (Event.FIT_START, Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH)

    def __init__(
        self, mode: str = 'hungarian', cost: str = 'l2', scope: str = 'global', by_condition: bool = False, k: int = 4
    ):
        _check_choice('mode', mode, MODES)
        _check_choice('cost', cost, COSTS)
        _check_choice('scope', scope, SCOPES)
        if isinstance(k, bool) or int(k) != k or k < 2:
            raise ValueError(
                f'k must be an integer of at least 2 (candidates per image, the drawn noise among them), got {k!r}.'
            )
        self.mode = mode
        self.cost = cost
        self.scope = scope
        self.by_condition = bool(by_condition)
        self.k = int(k)
        self._totals = torch.zeros(4, dtype=torch.float64)  # samples, cost drawn, cost assigned, moved
        self._degenerate = 0
        self._reported: set[str] = set()

    # ----------------------------------------------------------------------------------------- the coupling
    def __call__(self, draw: NoiseDraw) -> tuple[torch.Tensor, NoisePairing]:
        """The noise the batch trains on and how it was paired (the model's noise coupling)."""
        if self.by_condition and (draw.labels is None or draw.labels.dim() != 1 or draw.labels.is_floating_point()):
            raise ConfigError(
                f'{self.owner}: by_condition assigns noise within each class and needs integer class '
                'labels of shape (batch,) (model.label_key); this model has '
                f'{"none" if draw.labels is None else tuple(draw.labels.shape)}. Set by_condition: '
                'false to pair across the batch.'
            )
        return self._knn(draw) if self.mode == 'knn' else self._hungarian(draw)

    def _knn(self, draw: NoiseDraw) -> tuple[torch.Tensor, NoisePairing]:
        candidates = torch.cat([draw.noise[:, None], draw.candidates(self.k - 1)], dim=1)
        costs = candidate_costs(draw.x0, candidates)
        if self.cost == 'sq_l2':
            costs = costs.square()
        choice = costs.argmin(1)
        rows = torch.arange(costs.shape[0], device=costs.device)
        return candidates[rows, choice], NoisePairing('candidates', choice, costs[:, 0], costs[rows, choice])

    def _hungarian(self, draw: NoiseDraw) -> tuple[torch.Tensor, NoisePairing]:
        local = draw.x0.shape[0]
        positions = torch.as_tensor(draw.positions, dtype=torch.long, device=draw.x0.device)
        if self.by_condition:
            assert draw.labels is not None, '__call__ refuses by_condition without labels'
            labels = draw.labels.to(draw.x0.device).long()
        else:
            labels = torch.zeros_like(positions)
        x0, noise = draw.x0, draw.noise
        if self.scope == 'global' and is_distributed():
            # One gather of data and noise side by side (in a dtype that holds both exactly), one of positions and
            # labels.
            dtype = torch.promote_types(x0.dtype, noise.dtype)
            flat = torch.cat([x0.flatten(1).to(dtype), noise.flatten(1).to(dtype)], dim=1)
            flat = torch.cat(all_gather_variable(flat))
            keys = torch.cat(all_gather_variable(torch.stack([positions, labels], dim=1)))
            order = torch.argsort(keys[:, 0])
            flat, keys = flat[order], keys[order]
            width = x0[0].numel()
            x0 = flat[:, :width].reshape(-1, *draw.x0.shape[1:]).to(draw.x0.dtype)
            noise = flat[:, width:].reshape(-1, *draw.noise.shape[1:]).to(draw.noise.dtype)
            all_positions, labels = keys[:, 0].contiguous(), keys[:, 1]
            rows = torch.searchsorted(all_positions, positions)
        else:
            all_positions, rows = positions, torch.arange(local, device=positions.device)
        cost = pairwise_cost(x0, noise, self.cost)
        degenerate = ''
        if cost.shape[0] < 2:
            degenerate = f'a batch of {cost.shape[0]} sample has nothing to permute'
        elif not bool(torch.isfinite(cost).all()):
            degenerate = 'non-finite costs (NaN or infinite values in the data)'
        elif _all_costs_equal(cost):
            degenerate = 'every pairing costs the same (identical images or noises)'
        if degenerate:
            perm = torch.arange(cost.shape[0])
            self._report(degenerate)
        else:
            perm = hungarian_assignment(cost, labels if self.by_condition else None)
        mine = perm.to(rows.device)[rows]
        pairing = NoisePairing('permutation', all_positions[mine], cost[rows, rows], cost[rows, mine], degenerate)
        return noise[mine.to(noise.device)], pairing

    def _report(self, reason: str) -> None:
        """Say in the run's log that the drawn noise was kept (once per reason; the metric counts every case)."""
        self._degenerate += 1
        if reason not in self._reported:
            self._reported.add(reason)
            log.warning(
                '%s: %s; this micro-batch keeps its drawn noise (noise_assignment/degenerate counts every '
                'such micro-batch).',
                self.owner,
                reason,
            )

    # ----------------------------------------------------------------------------------------- the algorithm
    def install(self, model: Any, state: State, logger: Logger) -> dict[str, Any]:
        if self.by_condition and getattr(model, 'label_key', None) is None:
            raise ConfigError(
                f'{self.owner}: by_condition assigns noise within each class, but the model is '
                'unconditional (no model.label_key). Set by_condition: false, or give the model its '
                'class labels.'
            )
        model.set_noise_coupling(self, self.owner)
        return {
            'noise_assignment/mode': self.mode,
            'noise_assignment/cost': self.cost,
            'noise_assignment/scope': self.scope,
            'noise_assignment/by_condition': self.by_condition,
            'noise_assignment/k': self.k,
        }

    def act(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._refuse_single_samples(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            # Fires again when automatic micro-batching retries a batch after running out of memory.
            self._totals.zero_()
            self._degenerate = 0
        elif event == Event.AFTER_LOSS:
            pairing = draw_record(state, self).noise_pairing
            if pairing is not None:
                own = (
                    torch.zeros_like(pairing.source)
                    if pairing.kind == 'candidates'
                    else torch.as_tensor(global_positions(pairing.source.shape[0]), device=pairing.source.device)
                )
                self._totals += torch.tensor(
                    [
                        pairing.source.numel(),
                        float(pairing.cost_drawn.sum()),
                        float(pairing.cost_assigned.sum()),
                        float((pairing.source != own).sum()),
                    ],
                    dtype=torch.float64,
                )
        elif self._totals[0] > 0:
            count = float(self._totals[0])
            logger.log_metrics(
                {
                    'noise_assignment/cost_drawn': float(self._totals[1]) / count,
                    'noise_assignment/cost_assigned': float(self._totals[2]) / count,
                    'noise_assignment/moved': float(self._totals[3]) / count,
                    'noise_assignment/degenerate': self._degenerate,
                }
            )

    def _refuse_single_samples(self, state: State) -> None:
        """A linear assignment over one sample is a no-op: refuse a batch (per rank for ``scope: rank``) of one."""
        if self.mode != 'hungarian':
            return
        batch = getattr(state.train_dataloader, 'batch_size', None)
        micro = state.device_train_microbatch_size
        sizes = [s for s in (batch, micro) if isinstance(s, int) and not isinstance(s, bool)]
        if not sizes:
            return
        world = rank_world()[1] if self.scope == 'global' else 1
        if min(sizes) * world < 2:
            where = 'the global batch' if self.scope == 'global' else "each rank's batch"
            raise ConfigError(
                f'noise_assignment (mode: hungarian, scope: {self.scope}) permutes the noises of '
                f'{where}, which holds 1 sample here: nothing to permute. Raise '
                'train_loader.global_batch_size (and device_train_microbatch_size), use scope: global '
                'on several ranks, or mode: knn.'
            )
