"""Exponential moving average of the weights with a warm-up, resumable under FSDP2."""

from composer_algos.algorithms.ema.ema import WarmupEMA, warmup_smoothing

__all__ = ['WarmupEMA', 'warmup_smoothing']
