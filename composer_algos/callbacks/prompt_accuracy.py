"""Prompt accuracy during training: samples from prompts that name a class, scored by a classifier of the classes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from composer.core import State, Time
from composer.loggers import Logger
from torch import nn

from composer_algos.callbacks.periodic import DEFAULT_FOLDER, SamplingEvaluation
from composer_algos.data.convert import digit_prompts
from composer_algos.diffusion.conditioning import check_guidance_scale
from composer_algos.distributed import is_distributed
from composer_algos.evaluation.conditioning import build_classifier, class_accuracy
from composer_algos.registry import ConfigError

__all__ = ['PromptAccuracy']

log = logging.getLogger(__name__)


class PromptAccuracy(SamplingEvaluation):
    """Generate ``num_samples`` samples from ``prompts`` (EMA weights, fixed noise) at each guidance scale and log the
    share a classifier assigns to the class each prompt names, as ``prompt_accuracy/guidance_<scale>``.

    Sample ``i`` gets prompt ``i % len(prompts)`` and the noise of ``(seed, i)``, so every evaluation scores the
    same noise. The default prompts are every phrasing of every digit of the bundled captioned digits, scored by
    the shipped digit classifier (FID's, whose own accuracy on real validation digits, logged once as
    ``prompt_accuracy/classifier_val_accuracy``, bounds what a perfect model scores). Under ``composer -n N`` rank
    ``r`` generates samples ``r::N`` and the accuracy is over all of them.

    Args:
        prompts: the prompts; ``labels`` the class each names (both default to the digits').
        labels: one class index per prompt.
        guidance_scales: the classifier-free guidance scales to score (1: none).
        num_samples: samples per scale (all ranks together).
        num_steps, eta, seed, batch_size, use_ema, sample_shape, interval, folder: as for
            :class:`~composer_algos.callbacks.fid.FID`.
        classifier: ``'digits'``, ``'mnist'`` (at the images' size) or an ``nn.Module`` giving class logits for
            images in [-1, 1].
        classifier_cache_dir: cache folder of a classifier trained on first use (the shipped ones are not).
    """

    recipe_name = 'prompt_accuracy'
    prompts: list[str]  # given, or the digits'

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        guidance_scales: Sequence[float] = (1.0, 3.0),
        num_samples: int = 500,
        num_steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int = 256,
        interval: str | Time | None = None,
        classifier: str | nn.Module = 'digits',
        classifier_cache_dir: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        use_ema: bool = True,
        folder: str = DEFAULT_FOLDER,
    ):
        if (prompts is None) != (labels is None):
            raise ValueError(
                "Give prompts and labels together (one class index per prompt), or neither for the digits' prompts."
            )
        if prompts is None:
            prompts, labels = digit_prompts()
        assert labels is not None  # given with the prompts (checked above)
        if len(prompts) != len(labels) or not prompts:
            raise ValueError(f'{len(prompts)} prompts for {len(labels)} labels; give one label per prompt.')
        if not guidance_scales or any(not float(s) >= 1 for s in guidance_scales):
            raise ValueError(f'guidance_scales must list scales of at least 1, got {list(guidance_scales)}.')
        super().__init__(
            num_samples,
            num_steps,
            eta,
            seed,
            batch_size,
            None,
            sample_shape,
            use_ema,
            interval,
            folder,
            prompts=prompts,
            guidance_scale=max(float(s) for s in guidance_scales),
        )
        self.labels = [int(label) for label in labels]
        self.guidance_scales = [float(s) for s in guidance_scales]
        self.classifier = classifier
        self.classifier_cache_dir = classifier_cache_dir
        self.classifier_accuracy: float | None = None
        self.steps: list[int] = []
        self.values: dict[float, list[float]] = {s: [] for s in self.guidance_scales}
        self._classifier: nn.Module | None = None

    def __repr__(self) -> str:
        return (
            f'PromptAccuracy(prompts={len(self.prompts)}, guidance_scales={self.guidance_scales}, '
            f'num_samples={self.num_samples}, interval={self.interval!r})'
        )

    def fit_start(self, state: State, logger: Logger) -> None:
        super(SamplingEvaluation, self).fit_start(state, logger)
        conditioner = getattr(self.diffusion_model(state), 'conditioner', None)
        kind = getattr(conditioner, 'kind', None)
        if kind != 'text':
            raise ConfigError(
                f'callbacks.prompt_accuracy scores samples generated from prompts; this model is '
                f'conditioned on {"nothing" if kind in (None, "", "none") else kind}: remove the '
                'callback, or condition the model on text (model.conditioner.name: text).'
            )
        for scale in self.guidance_scales:
            check_guidance_scale(scale, conditioner, 'callbacks.prompt_accuracy.guidance_scales')

    @staticmethod
    def metric(scale: float) -> str:
        """The logged name of the accuracy at guidance ``scale``."""
        return f'prompt_accuracy/guidance_{scale:g}'

    def targets(self, count: int | None = None) -> torch.Tensor:
        """The class each of the first ``count`` (default ``num_samples``) samples is asked for."""
        count = self.num_samples if count is None else count
        return torch.tensor([self.labels[i % len(self.labels)] for i in range(count)])

    def evaluate(self, state: State, logger: Logger) -> None:
        model = self.diffusion_model(state)
        self.shape = self.sample_shape(state, model, self.shape)
        if self._classifier is None:
            self._classifier = build_classifier(self.classifier, self.shape, self.classifier_cache_dir)
            self._classifier.to(next(model.parameters()).device).eval()
            accuracy = getattr(self._classifier, 'accuracy', None)
            if accuracy is not None and self.classifier_accuracy is None:
                self.classifier_accuracy = float(accuracy)
                logger.log_metrics({'prompt_accuracy/classifier_val_accuracy': self.classifier_accuracy})
        step = self.step(state)
        if self.steps and self.steps[-1] == step:
            return
        metrics = {}
        for scale in self.guidance_scales:
            indices, samples = self.generate(state, guidance_scale=scale)
            samples = _all_samples(indices, samples)
            metrics[self.metric(scale)] = class_accuracy(
                self._classifier, samples, self.targets(len(samples)), self.batch_size
            )
        self.steps.append(step)
        for scale in self.guidance_scales:
            self.values[scale].append(metrics[self.metric(scale)])
        logger.log_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            'steps': list(self.steps),
            'values': {str(s): list(v) for s, v in self.values.items()},
            'classifier_accuracy': self.classifier_accuracy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state.get('steps', [])]
        saved = {float(s): [float(x) for x in v] for s, v in state.get('values', {}).items()}
        self.values = {s: saved.get(s, []) for s in self.guidance_scales}
        accuracy = state.get('classifier_accuracy')
        self.classifier_accuracy = None if accuracy is None else float(accuracy)


def _all_samples(indices: list[int], samples: torch.Tensor) -> torch.Tensor:
    """Every rank's ``(indices, samples)`` on every rank, in index order: each rank scores all of them and logs the
    same number."""
    if not is_distributed():
        return samples[torch.tensor(list(indices)).argsort()]
    from composer.utils import dist

    gathered = dist.all_gather_object((list(indices), samples.cpu()))
    order = torch.tensor([i for idx, _ in gathered for i in idx]).argsort()
    return torch.cat([s for _, s in gathered])[order]
