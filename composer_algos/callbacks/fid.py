"""FID of EMA samples against real images during training, through torchmetrics' FrechetInceptionDistance."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from composer.core import State, Time
from composer.loggers import Logger
from torch import nn

from composer_algos.callbacks.periodic import DEFAULT_FOLDER, SamplingEvaluation
from composer_algos.distributed import all_reduce
from composer_algos.evaluation.features import FEATURE_CHOICES, build_feature_extractor
from composer_algos.evaluation.fid import fid_metric, floor_at, update_fid
from composer_algos.evaluation.generation import rank_world
from composer_algos.evaluation.plots import metric_curve_png
from composer_algos.seeding import keyed_generator

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ['FID']

log = logging.getLogger(__name__)


class FID(SamplingEvaluation):
    """Generate ``num_samples`` samples with DDIM from the EMA weights and log their FID against real images.

    Sample ``i`` starts from the noise of ``(seed, i)``, so every evaluation scores the same noise and successive
    FIDs are comparable; under ``composer -n N`` rank ``r`` generates samples ``r::N`` and torchmetrics sums the
    feature statistics over ranks, so the value equals the one-process FID (with ``eta=0``). Real features are
    computed once from the real loader and kept. The real-vs-real floor, the FID a perfect model would score at
    these sample sizes, is logged once as ``<metric_name>_real_vs_real``: the FID of two random halves of the real
    images, scaled to ``num_samples`` samples against all the real images (see
    :func:`~composer_algos.evaluation.fid.floor_at`); the halves' own value is logged as
    ``<metric_name>_real_vs_real_halves``. The feature extractor's weights are named in the hyperparameters
    (``<metric_name>/feature_sha256``, when it has one), with the digit classifier's validation accuracy as
    ``<metric_name>_classifier_val_accuracy``. At the end of training a plot of FID against step is written to
    ``folder/fid.png`` and logged as an image.

    Composer's ``EMA`` algorithm swaps its weights in only during evaluation; this callback swaps them in for
    sampling itself (and back), so it works at any interval. Without an ``EMA`` algorithm, or before it starts,
    the live weights are used.

    Args:
        num_samples: generated samples per evaluation (all ranks together).
        num_steps: DDIM steps.
        eta: 0 for deterministic DDIM (needed for rank-count-independent results).
        seed: seed of the starting noise.
        batch_size: samples per denoiser call.
        interval: ``None`` to run after each evaluation, or a time string (see :class:`PeriodicEvaluation`).
        feature: ``'auto'`` (the digit classifier for 1x8x8 images, else Inception), ``'digits'``, ``'mnist'``
            (the classifier of the bundled MNIST digits at the images' size), ``'inception'`` or an ``nn.Module``
            with ``num_features`` taking images in [-1, 1].
        inception_weights: local file of the Inception weights (air-gapped machines); see
            :class:`~composer_algos.evaluation.InceptionFeatures`.
        classifier_cache_dir: cache folder of the digit classifiers (default ``$COMPOSER_ALGOS_CACHE`` or
            ``~/.cache/composer_algos``).
        real_loader: dataset config of the real images (as ``eval_loader`` in a recipe); ``None`` uses the
            Trainer's first eval dataloader.
        max_real_samples: read at most this many real images (all ranks together).
        num_classes: for class-conditional models, sample ``i`` gets label ``i % num_classes``.
        sample_shape: shape of one sample; ``None`` infers it from the real images.
        use_ema: sample from the EMA weights when an ``EMA`` algorithm is active.
        metric_name: the logged name.
        folder: where the FID curve is written.
        prompts: a text-conditioned model's prompts, sample ``i`` getting ``prompts[i % len(prompts)]``; ``None``:
            the captions of the first ``num_samples`` real images, so that the samples follow the real data's mix.
        guidance_scale: classifier-free guidance of the samples (1: none).
    """

    recipe_name = 'fid'

    def __init__(
        self,
        num_samples: int = 1000,
        num_steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int = 256,
        interval: str | Time | None = None,
        feature: str | nn.Module = 'auto',
        inception_weights: str | None = None,
        classifier_cache_dir: str | None = None,
        real_loader: dict[str, Any] | None = None,
        max_real_samples: int | None = None,
        num_classes: int | None = None,
        sample_shape: tuple[int, ...] | None = None,
        use_ema: bool = True,
        metric_name: str = 'FID',
        folder: str = DEFAULT_FOLDER,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
    ):
        # At least 2 samples: the features' covariance needs them.
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
            min_samples=2,
            prompts=prompts,
            guidance_scale=guidance_scale,
        )
        if not isinstance(feature, (nn.Module, str)):
            raise ValueError(
                f'feature must be one of {", ".join(FEATURE_CHOICES)}, a name in the features registry '
                f'or an nn.Module, got {feature!r}.'
            )
        self.feature = feature
        self.inception_weights = inception_weights
        self.classifier_cache_dir = classifier_cache_dir
        self.real_loader = real_loader
        self.max_real_samples = max_real_samples
        self.metric_name = metric_name
        self.steps: list[int] = []
        self.values: list[float] = []
        self.floor: float | None = None
        self.feature_sha256: str | None = None
        self._metric: FrechetInceptionDistance | None = None

    def __repr__(self) -> str:
        feature = self.feature if isinstance(self.feature, str) else type(self.feature).__name__
        guidance = f', guidance_scale={self.guidance_scale}' if self.guidance_scale != 1.0 else ''
        return (
            f'FID(num_samples={self.num_samples}, num_steps={self.num_steps}, eta={self.eta}, seed={self.seed}, '
            f'interval={self.interval!r}, feature={feature!r}{guidance})'
        )

    def prompt_loader(self) -> Any:
        return self.real_loader

    # ------------------------------------------------------------------------------------------- real images
    def _prepare(self, state: State, logger: Logger, model: Any) -> None:
        if self._metric is not None:
            return
        if getattr(model, 'encoder', None) is not None:
            raise ValueError(
                'FID on a latent diffusion model needs a decoder to turn samples into images; the FID '
                'callback supports pixel-space models only.'
            )
        device = next(model.parameters()).device
        loader = self.resolve_loader(state, self.real_loader, 'callbacks.fid.real_loader')
        rank, world_size = rank_world()
        cap = None if self.max_real_samples is None else math.ceil(self.max_real_samples / world_size)
        metric: FrechetInceptionDistance | None = None
        floor: FrechetInceptionDistance | None = None
        accuracy = None
        count = halves = 0
        gen = keyed_generator(self.seed, rank)
        for batch in loader:
            images = model.images(batch).detach().float()
            if cap is not None:
                images = images[: cap - count]
            if metric is None:
                self.shape = self.shape or tuple(images.shape[1:])
                feature = build_feature_extractor(
                    self.feature, tuple(images.shape[1:]), self.inception_weights, self.classifier_cache_dir
                )
                accuracy = getattr(feature, 'accuracy', None)
                self.feature_sha256 = getattr(feature, 'sha256', None)
                metric, floor = fid_metric(feature, device), fid_metric(feature, device)
            assert floor is not None  # made with the metric
            update_fid(metric, images, real=True, batch_size=self.batch_size)
            # Split each batch at random between the two halves of the real-vs-real floor (datasets are often
            # ordered by class, so a fixed alternation would compare different class mixes).
            order = torch.randperm(images.shape[0], generator=gen)
            half = images.shape[0] // 2
            update_fid(floor, images[order[:half]], real=True, batch_size=self.batch_size)
            update_fid(floor, images[order[half:]], real=False, batch_size=self.batch_size)
            halves += half
            count += images.shape[0]
            if cap is not None and count >= cap:
                break
        if metric is None:
            raise ValueError('The FID real-image loader yielded no images.')
        if self.floor is None:
            assert floor is not None  # made with the metric
            halves_fid = float(floor.compute())
            # The sizes of all ranks together, as torchmetrics sums the statistics over ranks.
            n_real, n_half = all_reduce(torch.tensor([count, halves], dtype=torch.float64)).tolist()
            self.floor = floor_at(halves_fid, n_half, n_real - n_half, self.num_samples, n_real)
            once = {
                f'{self.metric_name}_real_vs_real': self.floor,
                f'{self.metric_name}_real_vs_real_halves': halves_fid,
            }
            if self.feature_sha256 is not None:
                logger.log_hyperparameters({f'{self.metric_name}/feature_sha256': self.feature_sha256})
            if accuracy is not None:
                # The digit classifier's validation accuracy: how much its feature space can be trusted.
                once[f'{self.metric_name}_classifier_val_accuracy'] = float(accuracy)
            logger.log_metrics(once)
        self._metric = metric

    # ------------------------------------------------------------------------------------------- evaluation
    def score(self, state: State, logger: Logger, noise_seed: int | None = None) -> float:
        """FID of the current (EMA) weights' samples, from the noise of ``noise_seed`` (default: the callback's
        seed), without logging or recording it: another noise seed on the same weights measures FID's sampling
        noise."""
        model = self.diffusion_model(state)
        self._prepare(state, logger, model)
        assert self._metric is not None and self.shape is not None
        seed = self.seed
        self.seed = self.seed if noise_seed is None else int(noise_seed)
        try:
            _, samples = self.generate(state)
        finally:
            self.seed = seed
        self._metric.reset()
        update_fid(self._metric, samples, real=False, batch_size=self.batch_size)
        return float(self._metric.compute())

    def evaluate(self, state: State, logger: Logger) -> None:
        value = self.score(state, logger)
        step = self.step(state)
        if self.steps and self.steps[-1] == step:
            self.values[-1] = value
        else:
            self.steps.append(step)
            self.values.append(value)
        logger.log_metrics({self.metric_name: value})

    def fit_end(self, state: State, logger: Logger) -> None:
        if not self.steps or not self.is_writer():
            return
        image = metric_curve_png(
            self.steps, self.values, self.output_path(state, 'fid.png'), self.metric_name, self.floor
        )
        logger.log_images(image, name=f'{self.metric_name}_curve', channels_last=True)

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {'steps': list(self.steps), 'values': list(self.values), 'floor': self.floor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state.get('steps', [])]
        self.values = [float(v) for v in state.get('values', [])]
        floor = state.get('floor')
        self.floor = None if floor is None else float(floor)
