"""Speed-ups between FID curves: steps to reach a target, paired per seed, with bootstrap intervals and power.

A curve is a list of evaluation steps and the FID at each. A method's speed-up at a target is the steps the
reference curve needs to reach the target divided by the steps the method's curve needs (linear interpolation
between evaluations, the same rule for both). Paired per seed, each seed's method curve is measured against the
same seed's reference; their geometric mean, a bootstrap interval of it, and the smallest speed-up that a number of
seeds can detect are what a leaderboard reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    'geomean_ci',
    'log_fid_area',
    'min_detectable_speedup',
    'paired_speedup',
    'speedup_at',
    'steps_to_reach',
    'value_at',
]


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> float | None:
    """First step where the curve is at or below ``target``, linearly interpolated between evaluations."""
    for i, (s, v) in enumerate(zip(steps, values, strict=False)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v) if v0 != v else float(s)
    return None


def value_at(steps: Sequence[int], values: Sequence[float], step: float) -> float | None:
    """The curve's value at ``step``, linearly interpolated between evaluations; ``None`` outside them."""
    if not steps or step < steps[0] or step > steps[-1]:
        return None
    for i in range(1, len(steps)):
        if step <= steps[i]:
            s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return float(values[0])


def speedup_at(
    ref_steps: Sequence[int], ref: Sequence[float], steps: Sequence[int], values: Sequence[float], step: float
) -> dict[str, float | None]:
    """How much sooner a curve reaches the reference curve's value at ``step``.

    Returns the target (the reference's FID at ``step``), the first step at which each curve reaches it (the same
    rule for both, so a noisy reference that dips early is matched against itself) and their ratio
    ``reference steps / curve steps`` (``None`` when the curve never reaches it, or ``step`` is outside the
    reference's evaluations).
    """
    target = value_at(ref_steps, ref, step)
    if target is None:
        return {'target': None, 'reference_steps': None, 'steps': None, 'speedup': None}
    ref_reach = steps_to_reach(ref_steps, ref, target)
    reach = steps_to_reach(steps, values, target)
    return {
        'target': target,
        'reference_steps': ref_reach,
        'steps': reach,
        'speedup': (ref_reach / reach) if (reach and ref_reach) else None,
    }


def paired_speedup(
    ref_steps: Sequence[int],
    ref: Sequence[float],
    steps: Sequence[int],
    values: Sequence[float],
    step: float,
    budget: float,
) -> tuple[float | None, bool]:
    """:func:`speedup_at`, with a curve that never reaches the target counted as reaching it at ``budget``.

    Returns ``(speed-up, reached)``. Counting a miss at the budget's end is conservative: the curve would have got
    there later, if ever, so the true speed-up is at most this. ``None`` only when the reference itself has no
    target at ``step``.
    """
    at = speedup_at(ref_steps, ref, steps, values, step)
    if at['reference_steps'] is None:
        return None, False
    if at['steps'] is None:
        return at['reference_steps'] / budget, False
    return at['reference_steps'] / at['steps'], True


def geomean_ci(
    ratios: Sequence[float], confidence: float = 0.95, resamples: int = 9999, seed: int = 0
) -> tuple[float, float, float]:
    """Geometric mean of positive ``ratios`` and a bootstrap interval of it (BCa over the seeds, on the logs).

    With one ratio, or all equal, the interval is the point itself. With 5 seeds a percentile bootstrap is known to
    be narrow; BCa corrects part of that, and the interval stays an estimate to read beside the per-seed values.
    """
    from scipy import stats

    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / len(logs)
    if len(logs) < 2 or max(logs) - min(logs) < 1e-12:
        return math.exp(mean), math.exp(mean), math.exp(mean)
    result = stats.bootstrap(
        (logs,),
        lambda x, axis=-1: x.mean(axis=axis),
        confidence_level=confidence,
        n_resamples=resamples,
        method='BCa',
        random_state=seed,
    )
    low, high = result.confidence_interval
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa degenerates on some tiny samples
        result = stats.bootstrap(
            (logs,),
            lambda x, axis=-1: x.mean(axis=axis),
            confidence_level=confidence,
            n_resamples=resamples,
            method='percentile',
            random_state=seed,
        )
        low, high = result.confidence_interval
    return math.exp(mean), math.exp(low), math.exp(high)


def min_detectable_speedup(sd_log: float, seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest paired speed-up a two-sided t-test over ``seeds`` paired log-ratios detects with ``power``.

    ``sd_log`` is the standard deviation of one seed's log speed-up when nothing differs (measured by an A/A race,
    or predicted from FID's noise and the curve's slope). The effect is ``(t_{1 - alpha/2} + t_{power}) sd / sqrt(n)``
    on the log scale, with ``n - 1`` degrees of freedom.
    """
    from scipy import stats

    df = seeds - 1
    effect = (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd_log / math.sqrt(seeds)
    return math.exp(effect)


def log_fid_area(steps: Sequence[int], values: Sequence[float], floor: float = 1.0) -> float:
    """Area under ``ln(FID / floor)`` from the first to the last evaluation (trapezoid rule), per step.

    With the real-vs-real floor as ``floor`` this is the mean log-distance of the curve above what real data
    reaches, so a ratio of two areas does not depend on the feature space's scale (``ln FID`` alone would carry
    the constant ``ln floor``, which hides differences between methods). Divided by the span, so curves of the
    same evaluations compare directly.
    """
    if len(steps) < 2:
        return math.log(values[0] / floor)
    logs = [math.log(v / floor) for v in values]
    area = sum((s1 - s0) * (a + b) / 2 for s0, s1, a, b in zip(steps, steps[1:], logs, logs[1:], strict=False))
    return area / (steps[-1] - steps[0])
