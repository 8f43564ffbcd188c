"""Monitoring callbacks: FID, bits/dim, loss per timestep band, sample grids and the timestep heatmap.

The package's entry points register them by name (``composer_algos/builtins.py``).
"""

from composer_algos.callbacks.fid import FID
from composer_algos.callbacks.likelihood import BitsPerDim, LossBands
from composer_algos.callbacks.periodic import PeriodicEvaluation
from composer_algos.callbacks.pictures import SampleGrid, TimestepHeatmap

__all__ = ['BitsPerDim', 'FID', 'LossBands', 'PeriodicEvaluation', 'SampleGrid', 'TimestepHeatmap']
