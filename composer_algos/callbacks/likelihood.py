"""Bits/dim from the variational bound and the validation loss per timestep band, logged during training."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from composer.core import Callback, State, Time
from composer.loggers import Logger

from composer_algos.callbacks.periodic import DEFAULT_FOLDER, PeriodicEvaluation
from composer_algos.diffusion.model import timestep_bands
from composer_algos.distributed import all_reduce, rank_world
from composer_algos.evaluation.fid import collect_images
from composer_algos.evaluation.generation import all_reduce_max
from composer_algos.evaluation.likelihood import bits_per_dim
from composer_algos.registry import ConfigError

__all__ = ['BitsPerDim', 'LossBands', 'band_names']

log = logging.getLogger(__name__)


class BitsPerDim(PeriodicEvaluation):
    """Log the mean bits/dim of a fixed validation subset (see :mod:`composer_algos.evaluation.likelihood`).

    The subset is the first ``num_images`` images of the loader (each rank takes its share of its own shard),
    read once; timesteps and noise are fixed by ``seed``, so successive values are comparable.

    Args:
        num_images: validation images (all ranks together).
        num_terms: timesteps of the stratified VLB estimate; ``None`` sums all T terms exactly.
        seed: seed of the strata and noise.
        batch_size: images per denoiser call.
        interval: ``None`` to run after each evaluation, or a time string.
        loader: dataset config of the images; ``None`` uses the Trainer's first eval dataloader.
        use_ema: evaluate the EMA weights when an ``EMA`` algorithm is active.
        metric_name: the logged name.
    """

    needs = ('images', 'conditioning', 'noise_schedule', 'vlb_terms', 'prior_term')

    def __init__(
        self,
        num_images: int = 256,
        num_terms: int | None = 100,
        seed: int = 0,
        batch_size: int = 256,
        interval: str | Time | None = None,
        loader: dict[str, Any] | None = None,
        use_ema: bool = True,
        metric_name: str = 'bits_per_dim',
    ):
        super().__init__(interval, DEFAULT_FOLDER)
        if num_images < 1:
            raise ValueError(f'num_images must be positive, got {num_images}.')
        if num_terms is not None and num_terms < 2:
            raise ValueError(f'num_terms must be None (all timesteps) or at least 2, got {num_terms}.')
        self.num_images = int(num_images)
        self.num_terms = num_terms
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.loader = loader
        self.use_ema = use_ema
        self.metric_name = metric_name
        self._data: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.steps: list[int] = []
        self.values: list[float] = []

    def __repr__(self) -> str:
        return f'BitsPerDim(num_images={self.num_images}, num_terms={self.num_terms}, interval={self.interval!r})'

    def fit_start(self, state: State, logger: Logger) -> None:
        if getattr(self.diffusion_model(state), 'objective', 'ddpm') == 'flow_matching':
            raise ConfigError(
                'bits_per_dim sums the variational bound of a DDPM model; a flow-matching model has none '
                'here. Remove the bits_per_dim callback from the recipe (FID, loss bands, sample grids and '
                'the timestep heatmap work for flow models).'
            )
        super().fit_start(state, logger)

    def evaluate(self, state: State, logger: Logger) -> None:
        model = self.diffusion_model(state)
        if self._data is None:
            _, world_size = rank_world()
            loader = self.resolve_loader(state, self.loader, 'callbacks.bits_per_dim.loader')
            self._data = collect_images(loader, model, math.ceil(self.num_images / world_size), with_conditioning=True)
        images, conditioning = self._data
        num_batches = all_reduce_max(math.ceil(images.shape[0] / self.batch_size))
        with self.sampling_model(state, self.use_ema) as (model, _):
            per_image = bits_per_dim(
                model,
                images,
                conditioning,
                num_terms=self.num_terms,
                seed=self.seed,
                batch_size=self.batch_size,
                num_batches=num_batches,
            )
        totals = all_reduce(torch.tensor([float(per_image.sum()), float(per_image.numel())], dtype=torch.float64))
        value = float(totals[0] / totals[1])
        self.steps.append(self.step(state))
        self.values.append(value)
        logger.log_metrics({self.metric_name: value})


def band_names(num_timesteps: int, num_bands: int) -> list[str]:
    """``t000-099``-style names of the bands of :class:`~composer_algos.diffusion.DiffusionLoss`
    (``band = t * num_bands // T``)."""
    t = torch.arange(num_timesteps)
    band = timestep_bands(t, num_bands, num_timesteps)
    width = len(str(num_timesteps - 1))
    names = []
    for b in range(num_bands):
        members = t[band == b]
        names.append(
            f't{int(members.min()):0{width}d}-{int(members.max()):0{width}d}' if members.numel() else f'band{b}-empty'
        )
    return names


class LossBands(Callback):
    """Log the validation loss of each timestep band under readable names.

    The model's ``DiffusionLossBands`` metric is a vector (one mean loss per band of t); Composer logs it as one
    tensor. This logs each entry as ``metrics/<eval label>/<metric_name>/t<lo>-<hi>``. It only reads the value
    Composer already computed, at ``EVAL_END``.

    Args:
        metric_name: the model's band metric.
    """

    def __init__(self, metric_name: str = 'DiffusionLossBands'):
        self.metric_name = metric_name
        self._warned = False

    def __repr__(self) -> str:
        return f'LossBands(metric_name={self.metric_name!r})'

    def eval_end(self, state: State, logger: Logger) -> None:
        label = state.dataloader_label
        metric = state.eval_metrics.get(label, {}).get(self.metric_name) if label is not None else None
        if metric is None:
            if not self._warned:
                log.warning('LossBands: evaluator %r has no metric %r; nothing to log.', label, self.metric_name)
                self._warned = True
            return
        values = torch.as_tensor(metric.compute()).flatten()
        # (torchmetrics' Metric types its attributes as tensors or modules, torch's Module typing.)
        names = band_names(int(metric.num_timesteps), int(metric.num_bands))  # type: ignore[arg-type]
        logger.log_metrics(
            {f'metrics/{label}/{self.metric_name}/{name}': float(v) for name, v in zip(names, values, strict=False)}
        )
