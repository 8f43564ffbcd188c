"""Conditioning as a component: what the denoiser is told about each sample, caption dropout and guidance.

A :class:`Conditioner` turns a batch into the denoiser's keyword arguments. ``none`` gives none, ``class_label`` the
batch's labels under one keyword (what ``DiffusionModel(label_key=...)`` did before conditioners existed, exactly),
and ``text`` (:mod:`composer_algos.diffusion.text_conditioning`) runs captions through a text encoder. A conditioner
with an unconditional input (the empty caption) supports classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598): training replaces a sample's condition by the unconditional one with probability ``drop_prob``
(:func:`caption_drop_mask`, keyed like every training draw, so a resumed run drops the same samples), and sampling
combines the two predictions, ``uncond + s (cond - uncond)`` (:class:`Guidance`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from composer_algos.diffusion.draw import CAPTION_STREAM
from composer_algos.distributed import global_positions
from composer_algos.registry import ConfigError
from composer_algos.seeding import keyed_generator

__all__ = [
    'ClassLabelConditioner',
    'Conditioner',
    'Guidance',
    'NoConditioner',
    'batch_entry',
    'caption_drop_mask',
    'check_denoiser_keywords',
    'check_guidance_scale',
]


def batch_entry(batch: Any, key: Any) -> Any:
    """``batch[key]`` for a mapping; for a tuple or list, ``'image'`` is entry 0 and ``'label'`` entry 1; a bare
    tensor is the images. A missing key is an error naming the keys there are."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(
                f'Batch has no key {key!r} (keys: {sorted(batch)}); set image_key/label_key to match the dataset.'
            )
        return batch[key]
    if isinstance(batch, (tuple, list)):
        index = 0 if key == 'image' else 1 if key == 'label' else key
        return batch[index]
    if key in ('image', 0):
        return batch
    raise TypeError(f'Cannot read {key!r} from a batch of type {type(batch).__name__}.')


def caption_drop_mask(seed: int, index: int, batch_size: int, prob: float) -> torch.Tensor:
    """``(B,)`` bool: which samples of training draw ``index`` train on the unconditional input.

    Sample ``i`` of this rank's batch is dropped when a uniform keyed by ``(seed, CAPTION_STREAM, index, its position
    in the global batch)`` is below ``prob``: the same samples on any number of ranks, resumed or not, and no other
    draw of the run changes (the stream is its own).
    """
    if prob <= 0.0:
        return torch.zeros(batch_size, dtype=torch.bool)
    u = [
        float(torch.rand((), generator=keyed_generator(seed, CAPTION_STREAM, index, position), dtype=torch.float64))
        for position in global_positions(batch_size)
    ]
    return torch.tensor(u, dtype=torch.float64) < prob


def check_guidance_scale(guidance_scale: float, conditioner: Conditioner | None, key: str = 'guidance_scale') -> float:
    """``guidance_scale`` as a float, checked: at least 1, and above 1 only for a conditioner with an unconditional
    input (a :class:`ConfigError` naming ``key`` and the fix otherwise)."""
    scale = float(guidance_scale)
    if not scale >= 1.0:
        raise ConfigError(f'{key}={guidance_scale}: it must be at least 1 (1 samples without guidance).')
    if scale != 1.0 and not getattr(conditioner, 'has_unconditional', False):
        kind = getattr(conditioner, 'kind', None) or 'none'
        raise ConfigError(
            f'{key}={guidance_scale} needs a model with an unconditional input (a text conditioner, '
            f"trained with caption_drop_prob > 0); this model's conditioning is {kind}: set {key}=1."
        )
    return scale


def _accepted_keywords(denoiser: nn.Module) -> set[str] | None:
    """The keyword names ``denoiser``'s forward takes, ``None`` for any (a ``**kwargs`` that reaches no wrapped
    ``model`` whose forward says more)."""
    target: Any = denoiser
    while True:
        parameters = inspect.signature(target.forward).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return {p.name for p in parameters}
        inner = getattr(target, 'model', None)
        if not isinstance(inner, nn.Module):
            return None
        target = inner


def check_denoiser_keywords(denoiser: nn.Module, conditioner: Conditioner, key: str = 'model.conditioner') -> None:
    """A :class:`ConfigError` naming ``key`` and the fix when ``denoiser`` does not take the keywords ``conditioner``
    passes (a text conditioner in front of an unconditional UNet, say): caught when the model is built, not at the
    first batch."""
    accepted = _accepted_keywords(denoiser)
    missing = [k for k in conditioner.denoiser_keywords if accepted is not None and k not in accepted]
    if missing:
        raise ConfigError(
            f'{key} ({conditioner.kind}) passes {", ".join(missing)} to the denoiser, which '
            f'{type(denoiser).__name__} does not take: choose a denoiser that does (unet_condition, '
            'sd3_transformer, pixart_transformer for text), or set the keywords (preset, keywords).'
        )


class Conditioner(nn.Module):
    """Base class: a batch -> the denoiser's keyword arguments (``{}`` for none).

    Composer's FSDP wraps every direct child of the model unless it says otherwise (``_fsdp_wrap``); a conditioner is
    left whole, and one with trained parameters marks the module that holds them for wrapping itself.

    Class attributes:
        kind: its registry name.
        has_unconditional: it has an unconditional input (dropout in training, classifier-free guidance).
    """

    kind: ClassVar[str] = ''
    has_unconditional: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._fsdp_wrap = False
        # Probability of training a sample on the unconditional input (classifier-free guidance).
        self.drop_prob = 0.0

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch keys it reads (besides the images)."""
        return ()

    @property
    def label_key(self) -> Any | None:
        """The batch key of class labels, ``None`` unless the condition is a class label."""
        return None

    @property
    def denoiser_keywords(self) -> tuple[str, ...]:
        """The denoiser's keywords it passes in training."""
        return ()

    def forward(self, batch: Any, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The denoiser's keyword arguments for ``batch``; ``drop`` (``(B,)`` bool) marks the samples that get the
        unconditional input instead."""
        return {}

    def for_generation(
        self,
        num_samples: int,
        device: torch.device,
        labels: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The keyword arguments that condition ``num_samples`` samples on ``labels`` or ``prompts``."""
        if prompts is not None:
            raise ConfigError(
                f'prompts were given, but this model is conditioned on {self.kind or "nothing"}: '
                'prompts need model.conditioner.name: text.'
            )
        return {}

    def unconditional(self, num_samples: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The unconditional keyword arguments of ``num_samples`` samples (what training drops to)."""
        raise ConfigError(
            f'This model is conditioned on {self.kind or "nothing"}, which has no unconditional input; '
            'classifier-free guidance needs model.conditioner.name: text.'
        )

    def example_batch(self, batch_size: int) -> dict[str, Any]:
        """Batch entries (besides the images) of ``batch_size`` placeholder samples, for a dry run."""
        return {}


class NoConditioner(Conditioner):
    """No conditioning: an unconditional model.

    Args:
        kwarg: the denoiser's keyword for labels passed to generation anyway (as before conditioners existed, they
            reach the denoiser, which may ignore them).
    """

    kind = 'none'

    def __init__(self, kwarg: str = 'class_labels'):
        super().__init__()
        self.kwarg = kwarg

    def for_generation(
        self,
        num_samples: int,
        device: torch.device,
        labels: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        super().for_generation(num_samples, device, None, prompts)
        return {} if labels is None else {self.kwarg: labels.to(device)}


class ClassLabelConditioner(NoConditioner):
    """The batch's class labels under one keyword of the denoiser.

    Args:
        label_key: the batch key of the labels.
        kwarg: the denoiser's keyword (``class_labels`` for diffusers models).

    Example:
        >>> ClassLabelConditioner('label')({'label': torch.tensor([3, 1])})
        {'class_labels': tensor([3, 1])}
    """

    kind = 'class_label'

    def __init__(self, label_key: Any = 'label', kwarg: str = 'class_labels'):
        super().__init__(kwarg)
        self._label_key = label_key

    @property
    def label_key(self) -> Any:
        return self._label_key

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return (self._label_key,)

    @property
    def denoiser_keywords(self) -> tuple[str, ...]:
        return (self.kwarg,)

    def forward(self, batch: Any, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {self.kwarg: batch_entry(batch, self._label_key)}

    def example_batch(self, batch_size: int) -> dict[str, Any]:
        return {self._label_key: torch.zeros(batch_size, dtype=torch.long)}

    def extra_repr(self) -> str:
        return f'label_key={self._label_key!r}, kwarg={self.kwarg!r}'


@dataclasses.dataclass
class Guidance:
    """Classifier-free guidance: the prediction at ``conditional`` pushed away from the one at ``unconditional``,
    ``uncond + scale (cond - uncond)``, from one denoiser call on both (a batch twice the size).

    It applies to whatever the denoiser predicts (noise, velocity, v or x0): each is affine in the score. At
    ``scale == 1`` it is the conditional prediction alone, one call of the usual size.
    """

    conditional: dict[str, torch.Tensor]
    unconditional: dict[str, torch.Tensor]
    scale: float

    def __call__(
        self, denoise: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor], x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        if self.scale == 1.0:
            return denoise(x, t, self.conditional)
        both = {key: torch.cat([value, self.unconditional[key]]) for key, value in self.conditional.items()}
        conditional, unconditional = denoise(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
