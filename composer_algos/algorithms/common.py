"""Mechanisms every algorithm here shares: the draw record, the objective, clean reprs, spans of training time."""

from __future__ import annotations

import inspect
from typing import Any

from composer.core import State, Time, TimeUnit

from composer_algos.diffusion.contract import record_of
from composer_algos.diffusion.draw import DrawRecord

__all__ = ['draw_record', 'objective_of', 'ReprMixin', 'parse_time', 'span_fraction']


def draw_record(state: State, algorithm: Any) -> DrawRecord:
    """The :class:`~composer_algos.diffusion.DrawRecord` the model's forward published for the current micro-batch
    (``state.outputs['draw']``): what was drawn, from which distribution, and the per-sample loss there. An error
    naming ``algorithm`` when the outputs hold none."""
    return record_of(state.outputs, type(algorithm).__name__)


def objective_of(model: Any) -> str:
    """The objective a model trains: its ``objective`` (``'ddpm'`` or ``'flow_matching'``); ``'ddpm'`` for a model
    implementing the contract without saying."""
    return getattr(model, 'objective', 'ddpm')


class ReprMixin:
    """``__repr__`` from the constructor's arguments, read back from attributes of the same names."""

    def __repr__(self) -> str:
        params = inspect.signature(type(self).__init__).parameters
        parts = [f'{name}={getattr(self, name)!r}' for name in params if name != 'self' and hasattr(self, name)]
        return f'{type(self).__name__}({", ".join(parts)})'


def parse_time(value: str | int | float | Time, name: str) -> Time:
    """A Composer Time from ``'0.5dur'``, ``'2000ba'``, ``'3ep'`` or a float fraction of the run."""
    if isinstance(value, Time):
        time = value
    elif isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        time = Time(float(value), TimeUnit.DURATION)
    else:
        try:
            time = Time.from_timestring(str(value))
        except ValueError as e:
            raise ValueError(f"{name}={value!r} is not a Composer time (e.g. '0.5dur', '2000ba', '3ep').") from e
    if time.value < 0:
        raise ValueError(f'{name} must not be negative, got {value!r}.')
    return time


def span_fraction(state: State, start: Time, end: Time) -> float:
    """Progress in [0, 1] through the span ``[start, end]`` of the run, in the span's own units."""

    def elapsed(unit_time: Time) -> float:
        if unit_time.unit == TimeUnit.DURATION:
            fraction = state.get_elapsed_duration()
            return float(fraction.value) if fraction is not None else 0.0
        return float(state.timestamp.get(unit_time.unit).value)

    def as_float(t: Time) -> float:
        return float(t.value)

    if start.unit != end.unit:
        raise ValueError(f'The span start {start} and end {end} must use the same time unit.')
    now = elapsed(end)
    width = as_float(end) - as_float(start)
    if width <= 0:
        return 1.0 if now >= as_float(end) else 0.0
    return float(min(max((now - as_float(start)) / width, 0.0), 1.0))
