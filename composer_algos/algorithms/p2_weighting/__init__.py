"""P2 loss weighting (Choi et al., 2022)."""

from composer_algos.algorithms.p2_weighting.p2_weighting import P2Weighting, p2_weight

__all__ = ['P2Weighting', 'p2_weight']
