"""Min-SNR-gamma loss weighting (Hang et al., 2023)."""

from composer_algos.algorithms.min_snr_weighting.min_snr_weighting import MinSNRWeighting, min_snr_weight

__all__ = ['MinSNRWeighting', 'min_snr_weight']
