"""Shared machinery of the evaluation callbacks: when they run, where they read data and write pictures."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist
from composer.utils.misc import create_interval_scheduler

from composer_algos import registry
from composer_algos.diffusion.conditioning import check_guidance_scale
from composer_algos.diffusion.contract import get_diffusion_model
from composer_algos.diffusion.utils import device_batch
from composer_algos.evaluation.conditioning import collect_captions
from composer_algos.evaluation.generation import ema_weights, eval_mode, generate_share

__all__ = ['PeriodicEvaluation', 'SamplingEvaluation', 'DEFAULT_FOLDER']

log = logging.getLogger(__name__)

DEFAULT_FOLDER = 'runs/{run_name}/eval'


class PeriodicEvaluation(Callback):
    """Base class: run :meth:`evaluate` at every evaluation or on its own interval.

    Args:
        interval: ``None`` runs after every evaluation (Composer's ``EVAL_AFTER_ALL``, so it follows the Trainer's
            ``eval_interval`` and needs an ``eval_dataloader``); a time string such as ``'500ba'`` or ``'1ep'`` runs
            on that interval during training and at its end, with or without evaluators.
        folder: where PNGs are written (rank 0); ``{run_name}`` is filled in.
    """

    # The members of the model contract (composer_algos.diffusion.contract) the evaluation uses.
    needs: tuple[str, ...] = ('images',)

    def __init__(self, interval: str | Time | None = None, folder: str = DEFAULT_FOLDER):
        self.interval = interval
        self.folder = folder
        self._due = (
            None
            if interval is None
            else create_interval_scheduler(
                interval,
                include_end_of_training=True,
                checkpoint_events=False,
                final_events={Event.BATCH_END, Event.EPOCH_END},
            )
        )

    def __repr__(self) -> str:
        return f'{type(self).__name__}(interval={self.interval!r})'

    # ------------------------------------------------------------------------------------------- scheduling
    def fit_start(self, state: State, logger: Logger) -> None:
        if self.interval is None and not state.evaluators:
            raise ValueError(
                f'{type(self).__name__} runs after each evaluation (interval=None) but the Trainer has '
                "no eval_dataloader. Add one (eval_loader: in a recipe) or set interval, e.g. '500ba'."
            )

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if self.interval is None:
            self.evaluate(state, logger)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._due is not None and self._due(state, Event.BATCH_END):
            self.evaluate(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._due is not None and self._due(state, Event.EPOCH_END):
            self.evaluate(state, logger)

    def evaluate(self, state: State, logger: Logger) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- helpers
    def diffusion_model(self, state: State) -> Any:
        """The diffusion model behind ``state.model``, checked for the contract members this evaluation ``needs``."""
        return get_diffusion_model(state.model, self, self.needs)

    @staticmethod
    def step(state: State) -> int:
        return int(state.timestamp.batch)

    @contextlib.contextmanager
    def sampling_model(self, state: State, use_ema: bool):
        """The diffusion model in eval mode, with Composer's EMA weights swapped in when ``use_ema``."""
        model = self.diffusion_model(state)
        with ema_weights(state) if use_ema else contextlib.nullcontext(False) as ema_active, eval_mode(model):
            yield model, ema_active

    def output_path(self, state: State, filename: str) -> str:
        return os.path.join(format_name_with_dist(self.folder, state.run_name), filename)

    @staticmethod
    def is_writer() -> bool:
        return dist.get_global_rank() == 0

    @staticmethod
    def resolve_loader(state: State, loader: Any, where: str) -> Iterable[Any]:
        """``loader`` itself (any iterable of batches), or built from its config by the ``datasets`` registry, else
        the Trainer's first evaluator's dataloader."""
        if isinstance(loader, dict):
            return registry.build(registry.datasets, loader, 'dataset', where, default='streaming_image')
        if loader is not None:
            return loader
        if not state.evaluators:
            raise ValueError(
                f'{where}: no loader configured and the Trainer has no eval_dataloader; set {where} '
                'to a dataset config (e.g. the validation split) or give the Trainer an eval_dataloader.'
            )
        return state.evaluators[0].dataloader.dataloader

    @staticmethod
    def sample_shape(state: State, model: Any, given: tuple[int, ...] | None) -> tuple[int, ...]:
        if given is not None:
            return tuple(int(s) for s in given)
        if state.batch is None:
            raise ValueError('Cannot infer the sample shape before any batch was seen; set sample_shape.')
        return tuple(model.images(device_batch(state)).shape[1:])


class SamplingEvaluation(PeriodicEvaluation):
    """Base class of evaluations that generate samples (FID, sample grids): the sampling settings, in one place.

    Sample ``i`` starts from the noise of ``(seed, i)`` and, for class-conditional models, has label
    ``i % num_classes``, for text-conditioned ones prompt ``i % len(prompts)``; under ``composer -n N`` rank ``r``
    generates samples ``r::N`` (see :func:`~composer_algos.evaluation.generation.generate_share`).

    Args:
        num_samples: samples per evaluation (all ranks together); ``min_samples``: the least the subclass accepts.
        num_steps: sampler steps (DDIM); ``eta``: 0 for deterministic DDIM; ``seed``: noise seed.
        batch_size: samples per denoiser call.
        num_classes: for class-conditional models, sample ``i`` gets label ``i % num_classes``.
        sample_shape: shape of one sample; ``None`` lets the subclass infer it.
        use_ema: sample from the EMA weights when an ``EMA`` algorithm is active.
        interval, folder: see :class:`PeriodicEvaluation`.
        prompts: the prompts of a text-conditioned model; ``None`` takes the captions of the real (or evaluation)
            data's first examples (:meth:`resolve_prompts`).
        guidance_scale: classifier-free guidance of the samples (1: none).
    """

    needs = ('images', 'generate')
    # The callback's name in recipes (registry), for messages.
    recipe_name: ClassVar[str] = ''

    def __init__(
        self,
        num_samples: int,
        num_steps: int,
        eta: float,
        seed: int,
        batch_size: int,
        num_classes: int | None,
        sample_shape: tuple[int, ...] | None,
        use_ema: bool,
        interval: str | Time | None,
        folder: str,
        min_samples: int = 1,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
    ):
        super().__init__(interval, folder)
        if num_samples < min_samples:
            raise ValueError(f'num_samples must be at least {min_samples}, got {num_samples}.')
        if num_steps < 1 or batch_size < 1:
            raise ValueError(f'num_steps and batch_size must be positive, got {num_steps} and {batch_size}.')
        self.num_samples = int(num_samples)
        self.num_steps = int(num_steps)
        self.eta = float(eta)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_classes = num_classes
        self.shape = tuple(sample_shape) if sample_shape is not None else None
        self.use_ema = use_ema
        if prompts is not None and (isinstance(prompts, str) or not prompts):
            raise ValueError(f'prompts must be a non-empty list of strings, got {prompts!r}.')
        self.prompts = None if prompts is None else [str(p) for p in prompts]
        if not guidance_scale >= 1:
            raise ValueError(f'guidance_scale must be at least 1 (1: no guidance), got {guidance_scale}.')
        self.guidance_scale = float(guidance_scale)
        self._data_prompts: list[str] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        super().fit_start(state, logger)
        # Before the first step, not at the first evaluation: guidance on a model without an unconditional input.
        check_guidance_scale(
            self.guidance_scale,
            getattr(self.diffusion_model(state), 'conditioner', None),
            f'callbacks.{self.recipe_name}.guidance_scale',
        )

    def prompt_count(self) -> int:
        """How many captions of the data a text-conditioned model's samples cycle through, without ``prompts``."""
        return self.num_samples

    def prompt_loader(self) -> Any:
        """The loader (or its config) whose captions are the default prompts; ``None``: the Trainer's eval loader."""
        return None

    def resolve_prompts(self, state: State, model: Any) -> list[str] | None:
        """The prompts of the samples: ``prompts`` as given; for a text-conditioned model without them, the captions
        of the first :meth:`prompt_count` examples of :meth:`prompt_loader` (read once); ``None`` otherwise."""
        if self.prompts is not None or getattr(getattr(model, 'conditioner', None), 'kind', None) != 'text':
            return self.prompts
        if self._data_prompts is None:
            loader = self.resolve_loader(state, self.prompt_loader(), f'callbacks.{self.recipe_name}.prompts')
            self._data_prompts = collect_captions(loader, self.prompt_count(), model.conditioner.caption_key)
        return self._data_prompts

    def generate(
        self, state: State, guidance_scale: float | None = None, prompts: Sequence[str] | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """This rank's share of the samples, from the EMA weights in eval mode: ``(indices, samples)``
        (``guidance_scale`` and ``prompts``: others than the callback's)."""
        assert self.shape is not None, 'the subclass resolves the sample shape first (sample_shape)'
        with self.sampling_model(state, self.use_ema) as (model, _):
            scale = check_guidance_scale(
                self.guidance_scale if guidance_scale is None else guidance_scale, getattr(model, 'conditioner', None)
            )
            return generate_share(
                model,
                self.num_samples,
                self.shape,
                batch_size=self.batch_size,
                num_steps=self.num_steps,
                eta=self.eta,
                seed=self.seed,
                num_classes=self.num_classes,
                prompts=prompts or self.resolve_prompts(state, model),
                guidance_scale=scale,
            )
