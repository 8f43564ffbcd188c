"""PNG pictures: sample grids, the timestep-distribution heatmap and metric curves (matplotlib, Agg canvas)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from composer_algos.pixels import to_uint8

__all__ = [
    'captioned_grid',
    'figure_to_array',
    'image_grid',
    'metric_curve_png',
    'prompt_rows',
    'save_png',
    'side_by_side_grid',
    'timestep_heatmap_png',
]


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """``(N, C, H, W)`` images in [-1, 1] -> one ``(H', W', 3)`` uint8 grid, ``nrow`` images per row (default
    about sqrt(N)), each pixel repeated ``scale`` times (small images stay visible)."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(images, nrow=nrow, padding=padding * scale, pad_value=0.0)
    return to_uint8(grid).permute(1, 2, 0).numpy()


def prompt_rows(samples: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Samples whose sample ``i`` had prompt ``i % num_prompts``, reordered prompt by prompt: row ``p`` of a grid of
    ``len(samples) / num_prompts`` columns holds prompt ``p``'s samples."""
    order = sorted(range(samples.shape[0]), key=lambda i: (i % num_prompts, i))
    return samples[order]


def captioned_grid(images: torch.Tensor, captions: Sequence[str], scale: int = 1, padding: int = 1) -> np.ndarray:
    """:func:`image_grid` with one row per caption (``len(images)`` a multiple of ``len(captions)``, rows in caption
    order) and each caption written to the right of its row (PIL's built-in font, black on white)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = len(captions)
    if rows == 0 or images.shape[0] % rows:
        raise ValueError(f'{images.shape[0]} images cannot fill {rows} rows of one caption each.')
    grid = image_grid(images, nrow=images.shape[0] // rows, padding=padding, scale=scale)
    font = ImageFont.load_default()
    row_height = grid.shape[0] / rows
    text_width = max(int(font.getlength(c)) for c in captions) + 8
    canvas = Image.new('RGB', (grid.shape[1] + text_width, grid.shape[0]), 'white')
    canvas.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, caption in enumerate(captions):
        top, bottom = font.getbbox(caption)[1::2]
        draw.text(
            (grid.shape[1] + 4, row * row_height + (row_height - (bottom - top)) / 2 - top),
            caption,
            fill='black',
            font=font,
        )
    return np.asarray(canvas)


def side_by_side_grid(
    left: torch.Tensor, right: torch.Tensor, nrow: int | None = None, scale: int = 1, gap: int = 4
) -> np.ndarray:
    """Two grids of the same layout next to each other: cell ``i`` of the left grid pairs with cell ``i`` of the
    right one."""
    a = image_grid(left, nrow, scale=scale)
    b = image_grid(right, nrow, scale=scale)
    bar = np.full((a.shape[0], gap * scale, 3), 255, dtype=np.uint8)  # white: unlike any grid padding
    return np.concatenate([a, bar, b], axis=1)


def save_png(array: np.ndarray, path: str) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def figure_to_array(fig) -> np.ndarray:
    """An Agg-backed matplotlib figure rendered to ``(H, W, 3)`` uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _figure(figsize: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def timestep_heatmap_png(
    steps: Sequence[int],
    probs: torch.Tensor,
    path: str,
    title: str = '',
    figsize: tuple[float, float] = (7.0, 4.5),
    dpi: int = 100,
) -> np.ndarray:
    """Heatmap of the timestep distribution over training: x = t, y = training step, colour = T * p(t).

    ``probs`` is ``(len(steps), T)``, one distribution per recorded step. The colour is the probability relative to
    uniform (``T * p(t)``: white is uniform, red more likely, blue less) on a log scale symmetric about 1, so that a
    sampler that moves mass by tens of percent is as visible as one that concentrates it. Writes ``path`` and returns
    the RGB image.
    """
    from matplotlib.colors import LogNorm

    probs = torch.as_tensor(probs, dtype=torch.float32).cpu()
    steps = list(steps)
    if probs.dim() != 2 or probs.shape[0] != len(steps):
        raise ValueError(f'probs must be (len(steps), T) = ({len(steps)}, T), got {tuple(probs.shape)}.')
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    T = probs.shape[1]
    relative = (probs * T).numpy()
    # The colour range covers the largest departure from uniform either way (at least 2x, at most 100x).
    positive = relative[relative > 0]
    spread = float(max(positive.max(), 1 / max(positive.min(), 1e-6))) if positive.size else 2.0
    spread = min(max(spread, 2.0), 100.0)
    lo, hi = (steps[0], steps[-1]) if steps else (0, 1)
    half = (hi - lo) / max(len(steps) - 1, 1) / 2 if len(steps) > 1 else 0.5
    image = ax.imshow(
        relative.clip(1 / spread, spread),
        aspect='auto',
        origin='lower',
        interpolation='nearest',
        cmap='RdBu_r',
        norm=LogNorm(vmin=1 / spread, vmax=spread),
        extent=(-0.5, T - 0.5, lo - half, hi + half),
    )
    ax.set_xlabel('timestep t')
    ax.set_ylabel('training step (batches)')
    ax.set_title(title or 'timestep distribution p(t) over training')
    fig.colorbar(image, ax=ax, label='T * p(t)  (1 = uniform)')
    fig.tight_layout()
    array = figure_to_array(fig)
    save_png(array, path)
    return array


def metric_curve_png(
    steps: Sequence[int],
    values: Sequence[float],
    path: str,
    name: str = 'FID',
    floor: float | None = None,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> np.ndarray:
    """Line plot of a metric against training step (with the real-vs-real floor as a dashed line if given)."""
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(steps), list(values), marker='o', label=name)
    if floor is not None and math.isfinite(floor):
        ax.axhline(floor, linestyle='--', color='grey', label=f'{name} real vs real ({floor:.3g})')
    if values and min(values) > 0 and max(values) / max(min(values), 1e-12) > 30:
        ax.set_yscale('log')
    ax.set_xlabel('training step (batches)')
    ax.set_ylabel(name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    array = figure_to_array(fig)
    save_png(array, path)
    return array
