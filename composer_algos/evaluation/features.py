"""Feature extractors for FID: Inception-v3 (2048) from a local weights file, and a small digit classifier.

Every extractor here is an ``nn.Module`` with a ``num_features`` attribute that takes images as floats in
[-1, 1] of shape ``(N, C, H, W)`` and returns ``(N, num_features)``; torchmetrics'
``FrechetInceptionDistance(feature=module)`` accepts it as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'DigitClassifier',
    'DigitFeatures',
    'InceptionFeatures',
    'INCEPTION_WEIGHTS_URL',
    'DEFAULT_DIGIT_CLASSIFIER_CONFIG',
    'build_feature_extractor',
    'default_cache_dir',
    'digits_arrays',
    'digit_classifier_path',
    'load_or_train_digit_classifier',
    'train_digit_classifier',
    'to_uint8',
]

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_URL = ('https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
                         'weights-inception-2015-12-05-6726825d.pth')

# Everything that determines the trained classifier; its hash names the cache file, so changing any entry (or the
# version, when the code changes) trains a new one instead of reusing a stale file.
DEFAULT_DIGIT_CLASSIFIER_CONFIG: dict[str, Any] = {
    'version': 1,
    'width': 16,
    'num_features': 64,
    'epochs': 30,
    'batch_size': 64,
    'lr': 3e-3,
    'weight_decay': 1e-4,
    'max_shift': 1,
    'seed': 0,
}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (the inverse of the loaders' ``x / 127.5 - 1``)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def default_cache_dir() -> str:
    """``$COMPOSER_ALGOS_CACHE`` or ``~/.cache/composer_algos``."""
    return os.environ.get('COMPOSER_ALGOS_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'composer_algos'))


# --------------------------------------------------------------------------------------------------- Inception
class InceptionFeatures(nn.Module):
    """The 2048-d pool features of torch-fidelity's ``FeatureExtractorInceptionV3`` (the standard FID network).

    Grayscale images are repeated to RGB and converted to uint8 before the network's own resize to 299x299.

    Args:
        weights_path: local file of the converted TensorFlow Inception weights (``weights-inception-2015-12-05``).
            ``None`` lets torch-fidelity download them into torch's hub cache on first use, which needs internet.
    """

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        if weights_path is not None:
            weights_path = os.path.expanduser(weights_path)
            if not os.path.isfile(weights_path):
                raise FileNotFoundError(
                    f'Inception weights file {weights_path!r} does not exist. On a machine with internet, download '
                    f'{INCEPTION_WEIGHTS_URL} (for example with `curl -L -o weights-inception-2015-12-05-6726825d.pth '
                    f'<url>`), copy it to this path, and point inception_weights at it. Leave inception_weights '
                    'unset to let torch-fidelity download it (needs internet).')
        from torchmetrics.image.fid import NoTrainInceptionV3
        self.net = NoTrainInceptionV3(name='inception-v3-compat', features_list=['2048'],
                                      feature_extractor_weights_path=weights_path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f'Inception features need 1 or 3 channels, got {images.shape[1]}.')
        return self.net(to_uint8(images)).reshape(images.shape[0], -1)


# --------------------------------------------------------------------------------------------------- digits
class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits; :meth:`features` is the penultimate layer used as the FID feature space."""

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * width, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitFeatures(nn.Module):
    """FID features of a trained :class:`DigitClassifier` for ``(N, 1, 8, 8)`` images in [-1, 1].

    ``accuracy`` is the classifier's accuracy on the digits validation split, measured when it was trained;
    ``cache_path`` the file it was loaded from.
    """

    def __init__(self, classifier: DigitClassifier, accuracy: float = float('nan'), cache_path: Optional[str] = None):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features
        self.accuracy = float(accuracy)
        self.cache_path = cache_path

    def train(self, mode: bool = True) -> 'DigitFeatures':
        # The extractor is fixed: a parent's .train() must not switch it out of evaluation mode.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] == (3, 8, 8):
            images = images.mean(1, keepdim=True)
        if images.shape[1:] != (1, 8, 8):
            raise ValueError(f'The digit classifier takes (N, 1, 8, 8) images, got {tuple(images.shape)}; use '
                             "feature='inception' for other data.")
        return self.classifier.features(images.float())


def digits_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits split as the MDS loaders see them: ``(N, 1, 8, 8)`` floats in [-1, 1] and labels."""
    import numpy as np

    from composer_algos.data.convert import digits_images
    pairs = digits_images(split)
    images = torch.from_numpy(np.stack([np.asarray(img, dtype=np.float32) for img, _ in pairs]))[:, None]
    labels = torch.tensor([label for _, label in pairs], dtype=torch.long)
    return images / 127.5 - 1.0, labels


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def digit_classifier_path(cache_dir: Optional[str] = None, config: Optional[dict[str, Any]] = None) -> str:
    """Cache file of the classifier trained with ``config`` (merged over the default)."""
    full = {**DEFAULT_DIGIT_CLASSIFIER_CONFIG, **(config or {})}
    return os.path.join(cache_dir or default_cache_dir(), f'digit_classifier-{_config_hash(full)}.pt')


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def _random_shift(images: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels in x and y, filling with the background (-1)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), value=-1.0)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def train_digit_classifier(config: Optional[dict[str, Any]] = None) -> tuple[DigitClassifier, float]:
    """Train a :class:`DigitClassifier` on the digits training split; return it and its validation accuracy.

    Deterministic for a given config and thread count: initialisation, shuffling and the random one-pixel shifts
    (the only augmentation) come from one seeded generator.
    """
    cfg = {**DEFAULT_DIGIT_CLASSIFIER_CONFIG, **(config or {})}
    train_x, train_y = digits_arrays('train')
    val_x, val_y = digits_arrays('val')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg['seed'])
        model = DigitClassifier(width=cfg['width'], num_features=cfg['num_features'])
    gen = torch.Generator().manual_seed(cfg['seed'])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    steps_per_epoch = -(-len(train_x) // cfg['batch_size'])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg['lr'],
                                                    total_steps=cfg['epochs'] * steps_per_epoch)
    shift = cfg['max_shift']
    for _ in range(cfg['epochs']):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), cfg['batch_size']):
            index = order[start:start + cfg['batch_size']]
            x = train_x[index]
            if shift > 0:
                x = _random_shift(x, shift, gen)
            loss = F.cross_entropy(model(x), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    accuracy = _accuracy(model, val_x, val_y)
    return model.eval().requires_grad_(False), accuracy


def load_or_train_digit_classifier(cache_dir: Optional[str] = None, config: Optional[dict[str, Any]] = None,
                                   min_accuracy: float = 0.95) -> DigitFeatures:
    """The digit classifier's :class:`DigitFeatures`, loaded from ``cache_dir`` or trained and cached there.

    The cache file is named by a hash of the full config. Under ``composer -n N`` the local rank 0 of each node
    trains and writes (atomically) while the others wait, then everyone loads the same file.

    Raises:
        RuntimeError: if the trained classifier's validation accuracy is below ``min_accuracy``.
    """
    from composer.utils import dist
    path = digit_classifier_path(cache_dir, config)
    cfg = {**DEFAULT_DIGIT_CLASSIFIER_CONFIG, **(config or {})}
    if not os.path.isfile(path) and dist.get_local_rank() == 0:
        log.info('Training the digit classifier for FID features (cached at %s).', path)
        model, accuracy = train_digit_classifier(cfg)
        if accuracy < min_accuracy:
            raise RuntimeError(f'The digit classifier reached {accuracy:.3f} validation accuracy, below '
                               f'{min_accuracy}; its features would make a poor FID. Config: {cfg}.')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
        os.close(fd)
        torch.save({'config': cfg, 'state_dict': model.state_dict(), 'accuracy': accuracy}, tmp)
        os.replace(tmp, path)
    if dist.get_world_size() > 1 and dist.is_initialized():
        dist.barrier()
    saved = torch.load(path, map_location='cpu', weights_only=True)
    model = DigitClassifier(width=saved['config']['width'], num_features=saved['config']['num_features'])
    model.load_state_dict(saved['state_dict'])
    return DigitFeatures(model, saved['accuracy'], path)


def build_feature_extractor(feature: Union[str, nn.Module] = 'auto', image_shape: Optional[tuple[int, ...]] = None,
                            inception_weights: Optional[str] = None,
                            classifier_cache_dir: Optional[str] = None) -> nn.Module:
    """Resolve a feature choice to a module: ``'digits'``, ``'inception'``, ``'auto'`` or a module.

    ``'auto'`` picks the digit classifier for ``(1, 8, 8)`` images and Inception otherwise.
    """
    if isinstance(feature, nn.Module):
        if not hasattr(feature, 'num_features'):
            raise ValueError('A custom FID feature module needs a num_features attribute (its output dimension).')
        return feature
    if feature == 'auto':
        feature = 'digits' if image_shape is not None and tuple(image_shape) == (1, 8, 8) else 'inception'
    if feature == 'digits':
        return load_or_train_digit_classifier(classifier_cache_dir)
    if feature == 'inception':
        return InceptionFeatures(inception_weights)
    raise ValueError(f"feature must be 'auto', 'digits', 'inception' or an nn.Module, got {feature!r}.")
