"""How well samples follow their conditioning: prompt accuracy by a classifier, CLIPScore, and the captions of data.

Prompt accuracy: samples generated from prompts that each name a class (``"a handwritten seven"``), scored by a
classifier of those classes; the share it assigns to the named class. The digits' classifier is the one FID uses
(:mod:`composer_algos.evaluation.features`), so its own accuracy on real validation digits bounds what a perfect
model can score. CLIPScore (torchmetrics) compares each sample with its prompt in a CLIP model's embedding space,
for real images and a full CLIP model (text and vision) saved in a local folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from composer_algos.distributed import is_distributed
from composer_algos.evaluation.features import load_or_train_digit_classifier
from composer_algos.pixels import to_uint8

__all__ = [
    'CLASSIFIERS',
    'build_classifier',
    'class_accuracy',
    'clip_score',
    'collect_captions',
    'distinct',
    'load_clip_score_model',
]

log = logging.getLogger(__name__)

# Classifiers of the bundled data, by name: what prompt accuracy scores samples with.
CLASSIFIERS = ('digits', 'mnist')


def build_classifier(
    classifier: str | nn.Module, image_shape: Sequence[int] | None = None, cache_dir: str | None = None
) -> nn.Module:
    """A module from images in [-1, 1] to class logits: ``'digits'`` (the shipped 8x8 digit classifier, FID's),
    ``'mnist'`` (the bundled MNIST tier's at the images' size) or a module given as is. Its ``accuracy`` attribute, if
    any, is its own accuracy on real validation images."""
    if isinstance(classifier, nn.Module):
        return classifier
    if classifier not in CLASSIFIERS:
        raise ValueError(f'classifier must be one of {", ".join(CLASSIFIERS)} or an nn.Module, got {classifier!r}.')
    config = None
    if classifier == 'mnist':
        if image_shape is None:
            raise ValueError("classifier='mnist' needs the images' shape (its classifier is trained at their size).")
        config = {'dataset': 'mnist5k', 'image_size': int(image_shape[-1])}
    features = load_or_train_digit_classifier(cache_dir, config)
    module = features.classifier
    module.accuracy = features.accuracy  # type: ignore[assignment]  # torch types attributes as tensors or modules
    return module


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """The share of ``images`` (in [-1, 1]) that ``classifier`` assigns to their ``labels``."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f'{images.shape[0]} images for {labels.shape[0]} labels; give one label per image.')
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device).float()
        if chunk.shape[1] == 3:
            chunk = chunk.mean(1, keepdim=True)  # the digit classifiers read one channel
        predicted = classifier(chunk).argmax(1).cpu()
        correct += int((predicted == labels[start : start + batch_size].cpu()).sum())
    return correct / images.shape[0]


def load_clip_score_model(path: str) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local folder (``save_pretrained`` of both), never downloading: what
    torchmetrics' ``CLIPScore`` takes through its callable form (its ``model_name_or_path`` string form accepts only
    hub names)."""
    import os

    from transformers import CLIPModel, CLIPProcessor

    from composer_algos.registry import ConfigError

    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise ConfigError(
            f'clip_score_model={path}: no config.json there; save a full CLIP model and its processor '
            "with save_pretrained (e.g. CLIPModel.from_pretrained('openai/clip-vit-base-patch16') and "
            'CLIPProcessor likewise, on a machine with internet) and point clip_score_model at it.'
        )
    return CLIPModel.from_pretrained(path, local_files_only=True), CLIPProcessor.from_pretrained(
        path, local_files_only=True
    )


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_model_path: str, batch_size: int = 64) -> float:
    """torchmetrics' CLIPScore (100 times the cosine of image and text embeddings, floored at 0, averaged) of
    ``images`` (in [-1, 1], 1 or 3 channels) against their ``prompts``, with the CLIP model saved at
    ``clip_model_path``."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if images.shape[0] != len(prompts):
        raise ValueError(f'{images.shape[0]} images for {len(prompts)} prompts; give one prompt per image.')
    metric = CLIPScore(model_name_or_path=lambda: load_clip_score_model(clip_model_path))
    pixels = to_uint8(images.detach().cpu().float())
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    for start in range(0, pixels.shape[0], batch_size):
        metric.update(list(pixels[start : start + batch_size]), list(prompts[start : start + batch_size]))
    return float(metric.compute())


def collect_captions(loader: Iterable[Any], count: int, key: str = 'caption') -> list[str]:
    """The captions of the first ``count`` examples of ``loader`` in the order of the global dataset: under
    ``composer -n N`` every rank reads its share (sample ``i * N + rank`` of the global batch is row ``i`` of that
    rank's) and gets all of them, so every rank gives the same prompts to the same sample indices."""
    from composer.utils import dist

    world = dist.get_world_size() if is_distributed() else 1
    mine: list[str] = []
    for batch in loader:
        if not isinstance(batch, dict) or key not in batch:
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f'The loader gives no {key!r} (batch keys: {found}); its shards need a caption column '
                '(recipes/convert_dataset.py writes one with --captions or --dataset digits_captions).'
            )
        mine += list(batch[key])
        if len(mine) * world >= count:
            break
    if world == 1:
        return mine[:count]
    shares = dist.all_gather_object(mine)
    ordered = [share[i] for i in range(max(map(len, shares))) for share in shares if i < len(share)]
    return ordered[:count]


def distinct(captions: Iterable[str], count: int) -> list[str]:
    """The first ``count`` distinct ``captions``, in order (fewer if there are not as many)."""
    seen: list[str] = []
    for caption in captions:
        if caption not in seen:
            seen.append(caption)
            if len(seen) == count:
                break
    return seen
