"""Composer's EMA with the warm-up of Tarvainen & Valpola (2017), and checkpoints that resume under FSDP2."""

from __future__ import annotations

from typing import Any

import torch
from composer.algorithms import EMA
from composer.core import Event, State
from composer.loggers import Logger

__all__ = ['WarmupEMA', 'warmup_smoothing']


def warmup_smoothing(smoothing: float, num_updates: int) -> float:
    """``min(smoothing, (1 + n) / (10 + n))``: early averages forget the random initialisation quickly."""
    return min(smoothing, (1.0 + num_updates) / (10.0 + num_updates))


class WarmupEMA(EMA):
    """Composer's :class:`~composer.algorithms.EMA` whose smoothing warms up as ``min(beta, (1 + n) / (10 + n))``.

    A plain EMA with a long half-life keeps most of the random initial weights for thousands of steps, so early
    evaluations measure its lag, not the model (on 8x8 digits, FID at step 1200 was 636 with a plain 0.999 EMA and
    20.9 with the warm-up). With ``warmup=False`` this is Composer's EMA.

    The checkpointed EMA weights are full tensors: under FSDP2 they are all-gathered in ``state_dict`` (every rank
    calls it) and re-sharded like the live parameters when training resumes, so a sharded checkpoint resumes on
    the same or another number of ranks. Composer's own EMA restores FSDP2 shards with mismatched shapes.

    Args:
        half_life: as Composer's EMA (``'50ba'``).
        smoothing: as Composer's EMA (instead of ``half_life``).
        ema_start: as Composer's EMA.
        update_interval: as Composer's EMA.
        warmup: apply the warm-up.

    Example:
        >>> ema = WarmupEMA(half_life='50ba')
    """

    def __init__(
        self,
        half_life: str | None = '1000ba',
        smoothing: float | None = None,
        ema_start: str = '0.0dur',
        update_interval: str | None = None,
        warmup: bool = True,
    ):
        super().__init__(half_life=half_life, smoothing=smoothing, ema_start=ema_start, update_interval=update_interval)
        self.warmup = warmup
        self.target_smoothing = float(self.smoothing)
        self.num_updates = 0
        self.serialized_attributes = [*self.serialized_attributes, 'num_updates']
        self._pending_full: dict[str, dict[str, torch.Tensor]] | None = None
        self._pairs: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def __repr__(self) -> str:
        return (
            f'WarmupEMA(half_life={self.half_life!r}, smoothing={self.target_smoothing:.6f}, '
            f'ema_start={str(self.ema_start)!r}, warmup={self.warmup})'
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event in (Event.FIT_START, Event.PREDICT_START):
            super().apply(event, state, logger)
            # Freshly made (full copies of the bare model at INIT) or loaded (full tensors): shard like the model.
            if self._pending_full is None:
                self._pending_full = {
                    kind: dict(getattr(self.ema_model, kind))
                    for kind in ('named_parameters_dict', 'named_buffers_dict')
                }
            self._shard_like_model(state.model)
            return
        if event in (Event.BATCH_END, Event.EPOCH_END):
            self.smoothing = (
                warmup_smoothing(self.target_smoothing, self.num_updates) if self.warmup else self.target_smoothing
            )
            self.num_updates += 1
            logger.log_metrics({'ema/smoothing': self.smoothing})
            self._update(state.model)
            return
        super().apply(event, state, logger)

    @torch.no_grad()
    def _update(self, model: torch.nn.Module) -> None:
        """``ema <- smoothing * ema + (1 - smoothing) * live`` on local shards, in one foreach call per dtype.

        Composer's ``compute_ema`` runs three ops and a copy per parameter, each dispatched through DTensor under
        FSDP2; the EMA tensors are sharded like the parameters (see :meth:`_shard_like_model`), so the update is
        local to each rank.
        """
        if self._pairs is None:
            self._pairs = _local_pairs(self.ema_model, model)
        for emas, lives in self._pairs.values():
            torch._foreach_lerp_(emas, lives, 1.0 - self.smoothing)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        ema = state.get('ema_model')
        if ema is not None:
            state['ema_model'] = {
                kind: {name: _full(t) for name, t in ema[kind].items()}
                for kind in ('named_parameters_dict', 'named_buffers_dict')
            }
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        super().load_state_dict(state, strict)
        self.smoothing = self.target_smoothing
        # The live model may be sharded by now; the tensors are placed like its parameters at FIT_START.
        self._pending_full = {
            kind: dict(getattr(self.ema_model, kind)) for kind in ('named_parameters_dict', 'named_buffers_dict')
        }

    def _shard_like_model(self, model: torch.nn.Module) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        pending, self._pending_full = self._pending_full, None
        self._pairs = None
        assert pending is not None and self.ema_model is not None
        for kind, live in (
            ('named_parameters_dict', dict(model.named_parameters())),
            ('named_buffers_dict', dict(model.named_buffers())),
        ):
            target = getattr(self.ema_model, kind)
            for name, full in pending[kind].items():
                ref = live.get(name)
                if isinstance(ref, DTensor) and not isinstance(full, DTensor):
                    target[name] = distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
                elif ref is not None:
                    target[name] = full.to(ref.device)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor().detach().cpu() if isinstance(tensor, DTensor) else tensor


def _local_pairs(
    ema_model: Any, model: torch.nn.Module
) -> dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The (EMA, live) tensors to average, as local shards, grouped by dtype (foreach ops need one dtype)."""
    from torch.distributed.tensor import DTensor

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for kind, live in (
        ('named_parameters_dict', model.named_parameters()),
        ('named_buffers_dict', model.named_buffers()),
    ):
        averaged = getattr(ema_model, kind)
        for name, tensor in live:
            if name in averaged and tensor.is_floating_point():
                # Views of the live storage (the EMA tensors are clones: same dtype, same sharding).
                ema, value = local(averaged[name]), local(tensor.detach())
                emas, lives = groups.setdefault(ema.dtype, ([], []))
                emas.append(ema)
                lives.append(value)
    return groups
