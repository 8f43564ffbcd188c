"""Schedule-free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024, arXiv 2405.15682) under Composer.

The optimizer is the ``schedulefree`` package's ``AdamWScheduleFree``. It keeps three sequences: ``z`` (the base
AdamW iterate), ``x`` (a weighted average of the ``z``, the weights to evaluate) and the point where gradients are
taken, ``y = (1 - beta1) z + beta1 x``; the parameters hold ``y`` while training (its ``train`` mode) and ``x``
otherwise (``eval`` mode). There is no learning-rate schedule, only a linear warm-up over ``warmup_steps``
optimizer steps:

    z_{t+1} = z_t - lr_t (g_t / (sqrt(v_t / (1 - beta2^t)) + eps) + weight_decay y_t)     (g_t taken at y_t)
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1},   c_{t+1} = w_t / sum_{i <= t} w_i,
    w_t = (t + 1)^r max_{i <= t}(lr_i)^weight_lr_power
    x = lerp(y, z, 1 - 1 / beta1)   (eval mode)          y = lerp(x, z, 1 - beta1)   (train mode)

:class:`ScheduleFree` switches between ``y`` and ``x`` at the right moments of a Composer run (its docstring says
which weights each part of a run sees); :func:`schedulefree_adamw` builds the optimizer with checked arguments (the
``schedulefree_adamw`` optimizer of recipes).

Deviations from the package's usage and code, one per line:
- ``x`` is put in after every optimizer step, not only before evaluations: an EMA averages ``x`` at every step. So
  ``y`` is recomputed from ``x`` and ``z`` at every step, which differs by rounding from a loop that calls
  ``train()`` once; it is also what makes a resumed run exact (the checkpoint holds ``x`` and ``z``, and the
  uninterrupted run recomputes ``y`` from the same bits).
- The switch touches no optimizer state of a parameter that has none yet (the package's ``train()`` creates empty
  entries, which stop ``torch.distributed.checkpoint`` from loading a full optimizer state dict into a fresh
  optimizer).
- ``schedulefree_adamw`` rejects arguments outside their domain (the package accepts any); ``beta1`` must be
  positive, as ``x`` is recovered from ``y`` by dividing by it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from schedulefree import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree

from composer_algos.algorithms.common import ReprMixin
from composer_algos.registry import ConfigError

__all__ = [
    'ScheduleFree',
    'add_schedule_free',
    'is_schedule_free',
    'schedulefree_adamw',
    'to_eval_weights',
    'to_train_weights',
]

log = logging.getLogger(__name__)

# The package's optimizers that keep x, y and z this way (the closure variants have no train/eval modes).
SCHEDULE_FREE_OPTIMIZERS = (AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree)

# Algorithms that change beta1 during training: schedule-free's beta1 is the interpolation constant of y, not a
# momentum, and x = lerp(y, z, 1 - 1 / beta1) holds only while it stays fixed.
_CHANGES_BETA1 = ('MomentumDecay',)


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of the ``schedulefree`` package's optimizers with train and eval modes."""
    return isinstance(optimizer, SCHEDULE_FREE_OPTIMIZERS)


def schedulefree_adamw(
    params: Iterable[Any],
    lr: float = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    foreach: bool | None = None,
) -> AdamWScheduleFree:
    """The ``schedulefree`` package's ``AdamWScheduleFree`` with its arguments checked.

    Args:
        params: the parameters (or parameter groups) to optimise.
        lr: the learning rate after warm-up (no schedule follows it).
        betas: ``(beta1, beta2)``: beta1 in (0, 1] interpolates ``y`` between ``z`` and ``x``; beta2 in [0, 1)
            averages the squared gradients.
        eps: added to the denominator.
        weight_decay: decoupled weight decay, applied at ``y``.
        warmup_steps: optimizer steps of linear learning-rate warm-up.
        r: the average weighs step ``t`` by ``t^r`` as well.
        weight_lr_power: the average weighs step ``t`` by ``lr_t^weight_lr_power`` (2 in the paper).
        foreach: the package's foreach implementation; ``None`` uses it where PyTorch has it.

    Example:
        >>> optimizer = schedulefree_adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3, warmup_steps=100)
        >>> optimizer.param_groups[0]['warmup_steps']
        100
    """
    if not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f'lr must be non-negative and finite, got {lr}.')
    if len(betas) != 2:
        raise ValueError(f'betas must be two numbers (beta1, beta2), got {list(betas)}.')
    beta1, beta2 = (float(b) for b in betas)
    if not 0.0 < beta1 <= 1.0:
        raise ValueError(
            f'betas[0] (beta1) must be in (0, 1]: the evaluation weights are recovered by dividing by it; got {beta1}.'
        )
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f'betas[1] (beta2) must be in [0, 1), got {beta2}.')
    for name, value in (('eps', eps), ('weight_decay', weight_decay), ('r', r), ('weight_lr_power', weight_lr_power)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f'{name} must be non-negative and finite, got {value}.')
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f'warmup_steps must be a non-negative whole number of optimizer steps, got {warmup_steps}.')
    if foreach is None:
        foreach = hasattr(torch, '_foreach_mul_')
    return AdamWScheduleFree(
        params,
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        warmup_steps=int(warmup_steps),
        r=r,
        weight_lr_power=weight_lr_power,
        foreach=foreach,
    )


def _interpolation(group: dict[str, Any]) -> float:
    """The constant ``beta`` of ``y = (1 - beta) z + beta x``: Adam-type ``betas[0]``, SGD's ``momentum``."""
    return float(group['betas'][0]) if 'betas' in group else float(group['momentum'])


def _switch(optimizer: torch.optim.Optimizer, to_train: bool) -> bool:
    changed = False
    for group in optimizer.param_groups:
        if group['train_mode'] == to_train:
            continue
        beta = _interpolation(group)
        weight = 1.0 - beta if to_train else 1.0 - 1.0 / beta
        for p in group['params']:
            # .get: the optimizer's state is a defaultdict, and an empty entry is not harmless (module docstring).
            state = optimizer.state.get(p)
            if state and 'z' in state:  # without z the parameter was never stepped: x and y are the same
                p.lerp_(end=state['z'].to(p.device), weight=weight)
        group['train_mode'] = to_train
        changed = True
    return changed


@torch.no_grad()
def to_eval_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Put the evaluation weights ``x = lerp(y, z, 1 - 1 / beta1)`` in the parameters (the package's ``eval()``); a
    no-op in eval mode. Returns whether the mode changed.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = schedulefree_adamw(model.parameters())
        >>> to_train_weights(optimizer), to_eval_weights(optimizer), to_eval_weights(optimizer)
        (True, True, False)
    """
    return _switch(optimizer, to_train=False)


@torch.no_grad()
def to_train_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Put the training weights ``y = lerp(x, z, 1 - beta1)`` in the parameters (the package's ``train()``); a
    no-op in train mode. Returns whether the mode changed."""
    return _switch(optimizer, to_train=True)


class ScheduleFree(ReprMixin, Algorithm):
    """Keeps a schedule-free optimizer's training weights ``y`` in the model for training steps and its evaluation
    weights ``x`` at every other moment of a Composer run.

    Which weights each part of a run sees:

    - every training forward and backward, and the optimizer step: ``y``. Switched in by a pre-hook of
      ``optimizer.step`` (Composer runs the batch's forwards and backwards inside ``step`` as its closure, after
      ``BATCH_START``, when Composer's EMA has already swapped its averaged weights back out) and, for the runs that
      take no closure (AMP fp16), at ``BEFORE_TRAIN_BATCH``.
    - everything after the step: ``x``, switched in by a post-hook of ``optimizer.step``, so before any algorithm or
      callback at ``BATCH_END`` whatever the order of the algorithm list. An EMA update averages ``x``; FID and
      sample grids sample ``x`` (or the EMA of ``x``); evaluation sees ``x`` (or its EMA); a checkpoint holds ``x``
      as the model's weights (or, with Composer's EMA, its average of ``x``, while the EMA keeps ``x``).
    - ``BATCH_END``, ``EPOCH_END``, ``EVAL_START``, ``EVAL_STANDALONE_START``, ``PREDICT_START``, ``FIT_START`` and
      ``FIT_END`` put ``x`` in as well, in case a step was skipped (AMP's grad scaler skips steps with infinite
      gradients) or evaluation runs outside ``fit``; each is a no-op when ``x`` is already in.
    - before training (``INIT``, before a checkpoint is loaded) the optimizer is put in train mode with its
      parameters untouched (they have no ``z`` yet): ``torch.distributed.checkpoint`` steps a fresh optimizer once
      to load into it, and the package's optimizer refuses to step in eval mode.

    A checkpoint thus holds ``x`` as the model's weights and, in the optimizer's state, ``z``, the squared-gradient
    average, the step count ``k``, the sums of the averaging weights and ``train_mode=False``. The resumed run puts
    ``y = lerp(x, z, 1 - beta1)`` in before its first step, as the uninterrupted run did after saving, from the same
    bits. An algorithm that changes beta1 (``MomentumDecay``) is an error at ``INIT``: beta1 is here the
    interpolation constant of ``y``, not a momentum. Without a schedule-free optimizer the algorithm does nothing (a
    ``NoEffectWarning``).

    Example:
        >>> ScheduleFree()
        ScheduleFree()
    """

    def __init__(self):
        self._hooks: list[Any] = []

    def match(self, event: Event, state: State) -> bool:
        return event in (
            Event.INIT,
            Event.FIT_START,
            Event.BEFORE_TRAIN_BATCH,
            Event.BATCH_END,
            Event.EPOCH_END,
            Event.EVAL_START,
            Event.EVAL_STANDALONE_START,
            Event.PREDICT_START,
            Event.FIT_END,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        optimizers = [o for o in state.optimizers or () if is_schedule_free(o)]
        if event == Event.INIT:
            self._check(state, optimizers)
            for optimizer in optimizers:
                # No z yet: only the mode changes, which a checkpoint load needs (class docstring).
                to_train_weights(optimizer)
            return
        if event == Event.BEFORE_TRAIN_BATCH:
            for optimizer in optimizers:
                to_train_weights(optimizer)
            return
        if event == Event.FIT_START:
            self._install_hooks(optimizers)
        for optimizer in optimizers:
            to_eval_weights(optimizer)
        if event == Event.FIT_END:
            self._remove_hooks()

    def _check(self, state: State, optimizers: list[Any]) -> None:
        if not optimizers:
            names = ', '.join(type(o).__name__ for o in state.optimizers or ()) or 'none'
            warnings.warn(
                NoEffectWarning(
                    f'ScheduleFree found no schedule-free optimizer (optimizers: {names}); it does nothing.'
                ),
                stacklevel=2,
            )
            return
        for algorithm in state.algorithms:
            if any(cls.__name__ in _CHANGES_BETA1 for cls in type(algorithm).__mro__):
                raise ConfigError(
                    f'{type(algorithm).__name__} does not apply to {type(optimizers[0]).__name__}: a '
                    "schedule-free optimizer's beta1 is the constant that interpolates its training "
                    'weights between z and the evaluation weights, not a momentum; remove '
                    f'{type(algorithm).__name__}.'
                )

    def _install_hooks(self, optimizers: list[Any]) -> None:
        self._remove_hooks()  # fit() may run again on the same Trainer

        def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            to_train_weights(optimizer)

        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            to_eval_weights(optimizer)

        for optimizer in optimizers:
            self._hooks += [
                optimizer.register_step_pre_hook(before_step),
                optimizer.register_step_post_hook(after_step),
            ]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def add_schedule_free(optimizers: Any | Iterable[Any], algorithms: list[Any]) -> list[Any]:
    """``algorithms`` with a :class:`ScheduleFree` in front when an optimizer is schedule-free and none is there yet
    (recipes get the switching without listing it)."""
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    if any(is_schedule_free(o) for o in optimizers) and not any(isinstance(a, ScheduleFree) for a in algorithms):
        log.info('Adding the ScheduleFree algorithm for the schedule-free optimizer.')
        return [ScheduleFree(), *algorithms]
    return algorithms
