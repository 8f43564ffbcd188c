"""What a finished run measured and where it left its files, in a few lines for the end of a training script."""

from __future__ import annotations

import os
from typing import Any

from composer.utils import format_name_with_dist

__all__ = ['run_summary']


def _here(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to read and to copy)."""
    relative = os.path.relpath(path)
    return path if relative.startswith('..') else relative


def run_summary(trainer: Any) -> list[str]:
    """Lines that say what ``trainer``'s run reached and where its files are: the last and best FID against the
    real-vs-real floor at the same sample sizes (what a perfect model would score), prompt accuracy (text-conditioned
    models), bits/dim, and the paths of the
    latest sample grid, the FID curve, the timestep heatmap, the checkpoints and the log."""
    from composer.loggers import FileLogger

    from composer_algos.callbacks.fid import FID
    from composer_algos.callbacks.likelihood import BitsPerDim
    from composer_algos.callbacks.pictures import SampleGrid, TimestepHeatmap
    from composer_algos.callbacks.prompt_accuracy import PromptAccuracy

    state = trainer.state
    lines = [f'Run {state.run_name!r} finished at step {int(state.timestamp.batch)}.']
    files = []
    for callback in state.callbacks:
        if isinstance(callback, FID) and callback.values:
            best = min(range(len(callback.values)), key=callback.values.__getitem__)
            text = (
                f'FID {callback.values[-1]:.2f} at step {callback.steps[-1]} (best {callback.values[best]:.2f} at '
                f'step {callback.steps[best]}, {callback.num_samples} samples)'
            )
            if callback.floor is not None:
                text += (
                    f'; real-vs-real floor at these sample sizes {callback.floor:.2f} (a perfect model scores '
                    'about that)'
                )
            lines.append(text + '.')
            curve = callback.output_path(state, 'fid.png')
            if os.path.exists(curve):
                files.append(f'FID curve: {_here(curve)}')
        elif isinstance(callback, PromptAccuracy) and callback.steps:
            scores = ', '.join(
                f'{100 * callback.values[s][-1]:.1f}% at guidance {s:g}' for s in sorted(callback.values, reverse=True)
            )
            text = (
                f'Prompt accuracy {scores} at step {callback.steps[-1]} ({callback.num_samples} samples from '
                f'{len(callback.prompts)} prompts'
            )
            if callback.classifier_accuracy is not None:
                text += f'; the classifier scores {100 * callback.classifier_accuracy:.1f}% on real validation images'
            lines.append(text + ').')
        elif isinstance(callback, BitsPerDim) and callback.values:
            lines.append(f'Bits/dim {callback.values[-1]:.3f} at step {callback.steps[-1]}.')
        elif isinstance(callback, SampleGrid) and (path := getattr(callback, 'last_path', None)):
            files.append(f'samples: {_here(path)}')
        elif isinstance(callback, TimestepHeatmap) and (path := getattr(callback, 'last_path', None)):
            files.append(f'timestep distribution: {_here(path)}')
    saver = getattr(trainer, '_checkpoint_saver', None)
    if saver is not None:
        folder = format_name_with_dist(saver.folder, state.run_name)
        files.append(f'checkpoints: {_here(folder)}' if '://' not in folder else f'checkpoints: {folder}')
    files.extend(
        f'log: {_here(destination.filename)}'
        for destination in trainer.logger.destinations
        if isinstance(destination, FileLogger)
    )
    return lines + files
