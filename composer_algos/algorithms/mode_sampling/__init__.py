"""SD3's mode timestep sampling with heavy tails."""

from composer_algos.algorithms.mode_sampling.mode_sampling import ModeSampling

__all__ = ['ModeSampling']
