"""SD3's CosMap timestep sampling."""

from composer_algos.algorithms.cosmap_sampling.cosmap_sampling import CosMapSampling

__all__ = ['CosMapSampling']
