"""Exponential moving average of the weights with a warm-up, resumable under FSDP2."""

from composer_algos.algorithms.ema.warmup_ema import WarmupEMA, warmup_smoothing
from composer_algos.registry import algorithms

algorithms.register('ema', func=WarmupEMA)

__all__ = ['WarmupEMA', 'warmup_smoothing']
