"""Composer Algorithms for faster diffusion training; importing this module registers them by name."""

from composer.algorithms import EMA, GradientClipping

from composer_algos.registry import algorithms

algorithms.register('ema', func=EMA)
algorithms.register('gradient_clipping', func=GradientClipping)

# Each algorithm package registers itself when imported below.
