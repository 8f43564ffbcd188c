"""The CosMap loss weighting of flow matching (diffusers' SD3 scripts)."""

from composer_algos.algorithms.cosmap_weighting.cosmap_weighting import CosMapWeighting, cosmap_weight

__all__ = ['CosMapWeighting', 'cosmap_weight']
