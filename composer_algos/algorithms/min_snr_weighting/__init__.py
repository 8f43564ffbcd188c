"""Min-SNR-gamma loss weighting (Hang et al., 2023)."""

from composer_algos.algorithms.min_snr_weighting.min_snr_weighting import MinSNRWeighting, min_snr_weight
from composer_algos.registry import algorithms

algorithms.register('min_snr_weighting', func=MinSNRWeighting)

__all__ = ['MinSNRWeighting', 'min_snr_weight']
