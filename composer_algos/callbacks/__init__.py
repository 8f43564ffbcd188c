"""Monitoring callbacks: FID, bits/dim, loss per timestep band, sample grids and the timestep heatmap.

Importing this module registers them by name in the ``callbacks`` registry.
"""

from composer_algos.callbacks.fid import FID
from composer_algos.callbacks.likelihood import BitsPerDim, LossBands
from composer_algos.callbacks.periodic import PeriodicEvaluation
from composer_algos.callbacks.pictures import SampleGrid, TimestepHeatmap
from composer_algos.registry import callbacks

callbacks.register('fid', func=FID)
callbacks.register('bits_per_dim', func=BitsPerDim)
callbacks.register('loss_bands', func=LossBands)
callbacks.register('sample_grid', func=SampleGrid)
callbacks.register('timestep_heatmap', func=TimestepHeatmap)

__all__ = ['BitsPerDim', 'FID', 'LossBands', 'PeriodicEvaluation', 'SampleGrid', 'TimestepHeatmap']
