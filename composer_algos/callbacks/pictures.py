"""Pictures during training: sample grids and a heatmap of the timestep distribution over training."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import format_name_with_dist
from composer.utils.misc import create_interval_scheduler

from composer_algos.callbacks.periodic import DEFAULT_FOLDER, SamplingEvaluation
from composer_algos.diffusion.contract import get_diffusion_model
from composer_algos.diffusion.utils import device_batch
from composer_algos.distributed import all_reduce
from composer_algos.evaluation.generation import gather_by_index, rank_world
from composer_algos.evaluation.plots import captioned_grid, image_grid, prompt_rows, save_png, timestep_heatmap_png

__all__ = ['SampleGrid', 'TimestepHeatmap']

log = logging.getLogger(__name__)


class SampleGrid(SamplingEvaluation):
    """Write a PNG grid of samples (EMA weights, fixed seed) at each evaluation and log it as an image.

    Files are ``folder/samples_ba<step>.png``; the same noise is used every time, so the grids show one set of
    samples evolving. A text-conditioned model's grid has one row per prompt, its caption written beside it, and
    the prompts also listed, one a line, in ``folder/samples_ba<step>.txt``.

    Args:
        num_samples: images in the grid.
        num_steps: DDIM steps; ``eta``: 0 for deterministic DDIM; ``seed``: noise seed.
        batch_size: samples per denoiser call.
        scale: each pixel is repeated ``scale`` times (8x8 digits need it to be visible).
        interval: ``None`` to run after each evaluation, or a time string.
        num_classes: for class-conditional models, sample ``i`` gets label ``i % num_classes``.
        sample_shape: shape of one sample; ``None`` infers it from the current batch.
        use_ema: sample from the EMA weights when an ``EMA`` algorithm is active.
        folder: where the PNGs are written (``{run_name}`` is filled in).
        prompts: a text-conditioned model's prompts, one row each (``num_samples`` a multiple of their number);
            ``None``: the captions of the first ``sqrt(num_samples)`` evaluation examples.
        guidance_scale: classifier-free guidance of the samples (1: none).
    """

    recipe_name = 'sample_grid'

    def __init__(
        self,
        num_samples: int = 64,
        num_steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int = 256,
        scale: int = 4,
        interval: str | Time | None = None,
        num_classes: int | None = None,
        sample_shape: tuple[int, ...] | None = None,
        use_ema: bool = True,
        folder: str = DEFAULT_FOLDER,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
    ):
        super().__init__(
            num_samples,
            num_steps,
            eta,
            seed,
            batch_size,
            num_classes,
            sample_shape,
            use_ema,
            interval,
            folder,
            prompts=prompts,
            guidance_scale=guidance_scale,
        )
        if prompts is not None and num_samples % len(prompts):
            raise ValueError(
                f'num_samples={num_samples} must be a multiple of the {len(prompts)} prompts (one row each).'
            )
        if scale < 1:
            raise ValueError(f'scale must be positive, got {scale}.')
        self.scale = int(scale)
        self.last_path: str | None = None

    def __repr__(self) -> str:
        return f'SampleGrid(num_samples={self.num_samples}, num_steps={self.num_steps}, interval={self.interval!r})'

    def prompt_count(self) -> int:
        # One row per prompt, as many rows as columns (the number of samples divides by it).
        rows = math.isqrt(self.num_samples)
        while self.num_samples % rows:
            rows -= 1
        return rows

    def evaluate(self, state: State, logger: Logger) -> None:
        model = self.diffusion_model(state)
        self.shape = self.sample_shape(state, model, self.shape)
        prompts = self.resolve_prompts(state, model)
        samples: torch.Tensor | None
        indices, samples = self.generate(state)
        samples = gather_by_index(indices, samples)
        if samples is None:
            return
        name = f'samples_ba{self.step(state):07d}'
        if prompts:
            grid = captioned_grid(prompt_rows(samples, len(prompts)), prompts, scale=self.scale)
        else:
            grid = image_grid(samples, scale=self.scale)
        self.last_path = save_png(grid, self.output_path(state, f'{name}.png'))
        if prompts:
            with open(self.output_path(state, f'{name}.txt'), 'w') as f:
                f.write(''.join(f'row {row}: {prompt}\n' for row, prompt in enumerate(prompts)))
        logger.log_images(grid, name='samples', channels_last=True)


class TimestepHeatmap(Callback):
    """Record the active timestep distribution every ``interval`` and draw it as a heatmap over training.

    Every ``interval`` (at ``BATCH_END``) it evaluates ``model.timestep_distribution(x0)`` on the first
    ``max_images`` images of the current batch: the marginal over t of whichever sampler (and curriculum priors)
    is active, averaged over ranks. After each evaluation and at the end of training it writes
    ``folder/timestep_heatmap.png`` (x: t, y: training step, colour: T * p(t), the probability relative to uniform,
    on a log scale) and ``folder/timestep_heatmap.npz`` (``steps``, ``probs``), and logs the PNG as an image. The
    record is saved in checkpoints, so a resumed run continues the same picture.

    Args:
        interval: how often to record (a time string).
        max_images: images of the batch given to per-sample samplers.
        folder: output folder (``{run_name}`` is filled in).
    """

    # The members of the model contract (composer_algos.diffusion.contract) the heatmap uses.
    needs = ('images', 'timestep_distribution', 'timestep_sampler', 'timestep_sampler_owner')

    def __init__(self, interval: str | Time = '100ba', max_images: int = 64, folder: str = DEFAULT_FOLDER):
        if max_images < 1:
            raise ValueError(f'max_images must be positive, got {max_images}.')
        self.interval = interval
        self.max_images = int(max_images)
        self.folder = folder
        self._due = create_interval_scheduler(
            interval, include_end_of_training=True, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self.steps: list[int] = []
        self.rows: list[torch.Tensor] = []
        self.last_path: str | None = None

    def __repr__(self) -> str:
        return f'TimestepHeatmap(interval={self.interval!r}, max_images={self.max_images})'

    @property
    def probs(self) -> torch.Tensor:
        """``(records, T)``: one distribution per recorded step."""
        return torch.stack(self.rows) if self.rows else torch.empty(0, 0)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self._due(state, Event.BATCH_END):
            return
        model = get_diffusion_model(state.model, self, self.needs)
        x0 = model.images(device_batch(state))[: self.max_images]
        _, world_size = rank_world()
        probs = (all_reduce(model.timestep_distribution(x0).detach().double()) / world_size).cpu()
        step = int(state.timestamp.batch)
        if self.steps and self.steps[-1] == step:
            return
        self.steps.append(step)
        self.rows.append(probs.float())

    def _write(self, state: State, logger: Logger) -> None:
        from composer.utils import dist

        if not self.rows or dist.get_global_rank() != 0:
            return
        folder = format_name_with_dist(self.folder, state.run_name)
        os.makedirs(folder, exist_ok=True)
        np.savez(os.path.join(folder, 'timestep_heatmap.npz'), steps=np.asarray(self.steps), probs=self.probs.numpy())
        path = os.path.join(folder, 'timestep_heatmap.png')
        model = get_diffusion_model(state.model, self, self.needs)
        owner = getattr(model, 'timestep_sampler_owner', None)
        sampler = owner or type(getattr(model, 'timestep_sampler', None)).__name__
        image = timestep_heatmap_png(self.steps, self.probs, path, title=f'timestep distribution ({sampler})')
        self.last_path = path
        logger.log_images(image, name='timestep_heatmap', channels_last=True)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._write(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._write(state, logger)

    def state_dict(self) -> dict[str, Any]:
        # Lists, not tensors: the record grows, and a sharded (FSDP) checkpoint loads tensors in place, into tensors
        # of the shape the fresh callback has; Python objects are stored whole.
        return {'steps': list(self.steps), 'probs': [row.tolist() for row in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state['steps']]
        self.rows = [torch.tensor(row, dtype=torch.float32) for row in state['probs']]
