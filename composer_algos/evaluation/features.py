"""Feature extractors for FID: Inception-v3 (2048) from a local weights file, and small digit classifiers.

Every extractor here is an ``nn.Module`` with a ``num_features`` attribute that takes images as floats in
[-1, 1] of shape ``(N, C, H, W)`` and returns ``(N, num_features)``; torchmetrics'
``FrechetInceptionDistance(feature=module)`` accepts it as is.

The digit classifiers of the digits and MNIST tiers ship with the package (``weights/``, written by
``recipes/train_feature_extractors.py``), like Inception's released weights: training them again on another machine
gives other weights (CPU kernels round differently on other instruction sets), and with them another FID scale.
A classifier of any other configuration is trained on first use and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_algos import registry
from composer_algos.pixels import from_uint8, to_uint8

__all__ = [
    'DigitClassifier',
    'DigitFeatures',
    'InceptionFeatures',
    'INCEPTION_WEIGHTS_URL',
    'DEFAULT_DIGIT_CLASSIFIER_CONFIG',
    'MNIST_CLASSIFIER_CONFIG',
    'CLASSIFIER_CONFIGS',
    'SHIPPED_WEIGHTS_DIR',
    'shipped_classifiers',
    'weights_sha256',
    'build_feature_extractor',
    'FEATURE_CHOICES',
    'FEATURE_EXTRACTORS',
    'default_cache_dir',
    'digits_arrays',
    'digit_classifier_path',
    'mnist5k_arrays',
    'load_or_train_digit_classifier',
    'train_and_save_classifier',
    'train_digit_classifier',
]

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_URL = (
    'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth'
)

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
# The MNIST tier's classifier (``recipes/convert_dataset.py --dataset mnist5k``): trained on the 4000 training
# digits at the tier's image size (set ``image_size``; 28 is the native size).
MNIST_CLASSIFIER_CONFIG: dict[str, Any] = {
    'version': 1,
    'dataset': 'mnist5k',
    'image_size': 28,
    'width': 32,
    'num_features': 64,
    'epochs': 15,
    'batch_size': 64,
    'lr': 3e-3,
    'weight_decay': 1e-4,
    'max_shift': 1,
    'seed': 0,
}
CLASSIFIER_CONFIGS = {'digits': DEFAULT_DIGIT_CLASSIFIER_CONFIG, 'mnist5k': MNIST_CLASSIFIER_CONFIG}


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

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        if weights_path is not None:
            weights_path = os.path.expanduser(weights_path)
            if not os.path.isfile(weights_path):
                raise FileNotFoundError(
                    f'Inception weights file {weights_path!r} does not exist. On a machine with internet, download '
                    f'{INCEPTION_WEIGHTS_URL} (for example with `curl -L -o weights-inception-2015-12-05-6726825d.pth '
                    f'<url>`), copy it to this path, and point inception_weights at it. Leave inception_weights '
                    'unset to let torch-fidelity download it (needs internet).'
                )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name='inception-v3-compat', features_list=['2048'], feature_extractor_weights_path=weights_path
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f'Inception features need 1 or 3 channels, got {images.shape[1]}.')
        return self.net(to_uint8(images)).reshape(images.shape[0], -1)


# --------------------------------------------------------------------------------------------------- digits
class DigitClassifier(nn.Module):
    """A small CNN for square grayscale digits (8x8 by default); :meth:`features` is the FID feature space.

    Two 2x max-pools, so ``image_size // 4`` pixels a side reach the penultimate layer.
    """

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10, image_size: int = 8):
        super().__init__()
        if image_size < 4:
            raise ValueError(f'image_size must be at least 4 (two 2x poolings), got {image_size}.')
        self.num_features = num_features
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitFeatures(nn.Module):
    """FID features of a trained :class:`DigitClassifier` for ``(N, 1, S, S)`` images in [-1, 1] (S its size).

    ``accuracy`` is the classifier's accuracy on its dataset's validation split, measured when it was trained;
    ``cache_path`` the file it was loaded from; ``sha256`` names its weights (:func:`weights_sha256`), the FID scale
    a run was measured on; ``shipped`` tells whether they are the package's own.
    """

    def __init__(
        self,
        classifier: DigitClassifier,
        accuracy: float = float('nan'),
        cache_path: str | None = None,
        sha256: str | None = None,
        shipped: bool = False,
    ):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features
        self.accuracy = float(accuracy)
        self.cache_path = cache_path
        self.sha256 = sha256 or weights_sha256(classifier.state_dict())
        self.shipped = shipped

    def train(self, mode: bool = True) -> DigitFeatures:
        # The extractor is fixed: a parent's .train() must not switch it out of evaluation mode.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.classifier.image_size
        if images.shape[1:] == (3, size, size):
            images = images.mean(1, keepdim=True)
        if images.shape[1:] != (1, size, size):
            raise ValueError(
                f'This digit classifier takes (N, 1, {size}, {size}) images, got {tuple(images.shape)}; '
                "use feature='inception' for other data."
            )
        return self.classifier.features(images.float())


def _as_tensors(pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(PIL image, label)]`` -> ``(N, 1, H, W)`` floats in [-1, 1] as the MDS loaders give them, and labels."""
    import numpy as np

    images = torch.from_numpy(np.stack([np.asarray(img, dtype=np.uint8) for img, _ in pairs]))[:, None]
    labels = torch.tensor([label for _, label in pairs], dtype=torch.long)
    return from_uint8(images), labels


def digits_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits split as the MDS loaders see them: ``(N, 1, 8, 8)`` floats in [-1, 1] and labels."""
    from composer_algos.data.convert import digits_images

    return _as_tensors(digits_images(split))


def mnist5k_arrays(split: str, image_size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled MNIST split (see :func:`~composer_algos.data.convert.mnist5k_images`) as the loaders see it."""
    from composer_algos.data.convert import mnist5k_images

    return _as_tensors(mnist5k_images(split, image_size))


def _dataset_arrays(cfg: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.get('dataset', 'digits') == 'digits':
        return digits_arrays(split)
    return mnist5k_arrays(split, cfg['image_size'])


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _full_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """``config`` merged over the default of its dataset (``config['dataset']``, digits when absent)."""
    dataset = (config or {}).get('dataset', 'digits')
    if dataset not in CLASSIFIER_CONFIGS:
        raise ValueError(
            f"The digit classifier's dataset must be one of {sorted(CLASSIFIER_CONFIGS)}, got {dataset!r}."
        )
    return {**CLASSIFIER_CONFIGS[dataset], **(config or {})}


def digit_classifier_path(cache_dir: str | None = None, config: dict[str, Any] | None = None) -> str:
    """Cache file of the classifier trained with ``config`` (merged over its dataset's default)."""
    full = _full_config(config)
    prefix = 'digit_classifier' if full.get('dataset', 'digits') == 'digits' else f'{full["dataset"]}_classifier'
    return os.path.join(cache_dir or default_cache_dir(), f'{prefix}-{_config_hash(full)}.pt')


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


def train_digit_classifier(config: dict[str, Any] | None = None) -> tuple[DigitClassifier, float]:
    """Train a :class:`DigitClassifier` on its dataset's training split only; return it and its validation accuracy.

    ``config['dataset']`` is ``'digits'`` (the default) or ``'mnist5k'`` (at ``config['image_size']``). The
    validation split is never trained on: it is the FID reference, and the accuracy on it says how far the
    feature space can be trusted. Deterministic for a given config: it trains on one thread, and initialisation,
    shuffling and the random shifts (the only augmentation) come from one seeded generator.
    """
    cfg = _full_config(config)
    threads = torch.get_num_threads()
    # One thread: parallel reductions change the last bits, so the weights would depend on the machine's cores.
    torch.set_num_threads(1)
    try:
        return _train_classifier(cfg)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(cfg: dict[str, Any]) -> tuple[DigitClassifier, float]:
    train_x, train_y = _dataset_arrays(cfg, 'train')
    val_x, val_y = _dataset_arrays(cfg, 'val')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg['seed'])
        model = DigitClassifier(
            width=cfg['width'], num_features=cfg['num_features'], image_size=cfg.get('image_size', 8)
        )
    gen = torch.Generator().manual_seed(cfg['seed'])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    steps_per_epoch = -(-len(train_x) // cfg['batch_size'])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg['lr'], total_steps=cfg['epochs'] * steps_per_epoch
    )
    shift = cfg['max_shift']
    for _ in range(cfg['epochs']):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), cfg['batch_size']):
            index = order[start : start + cfg['batch_size']]
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


SHIPPED_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
_MANIFEST = 'manifest.json'


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order).

    Unlike a file's hash it does not change with how torch pickles, so it names the weights themselves.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def shipped_classifiers(folder: str | None = None) -> dict[str, dict[str, Any]]:
    """The shipped classifiers' manifest (in ``folder``, default :data:`SHIPPED_WEIGHTS_DIR`): name ->
    ``{'file', 'config', 'sha256', 'accuracy', 'trained_on'}``."""
    path = os.path.join(folder or SHIPPED_WEIGHTS_DIR, _MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _shipped_entry(cfg: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in shipped_classifiers().values() if e['config'] == cfg), None)


def _save_classifier(model: DigitClassifier, accuracy: float, cfg: dict[str, Any], path: str) -> None:
    """Write atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    os.close(fd)
    torch.save({'config': cfg, 'state_dict': model.state_dict(), 'accuracy': accuracy}, tmp)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide shipped weights from other users of an installed package
    os.replace(tmp, path)


def _load_classifier(path: str, expected_sha256: str | None = None) -> DigitFeatures:
    saved = torch.load(path, map_location='cpu', weights_only=True)
    sha256 = weights_sha256(saved['state_dict'])
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise RuntimeError(
            f'The shipped FID classifier {path} holds weights of sha256 {sha256[:16]}..., not the '
            f'{expected_sha256[:16]}... its manifest records: the file was changed. Restore it (reinstall the package '
            'or check it out again); FIDs on other weights are on another scale.'
        )
    model = DigitClassifier(
        width=saved['config']['width'],
        num_features=saved['config']['num_features'],
        image_size=saved['config'].get('image_size', 8),
    )
    model.load_state_dict(saved['state_dict'])
    return DigitFeatures(model, saved['accuracy'], path, sha256=sha256, shipped=expected_sha256 is not None)


def train_and_save_classifier(
    config: dict[str, Any] | None, path: str, min_accuracy: float = 0.95
) -> tuple[DigitClassifier, float]:
    """Train the classifier of ``config`` (see :func:`train_digit_classifier`) and save it to ``path``.

    Raises:
        RuntimeError: if its validation accuracy is below ``min_accuracy``.
    """
    cfg = _full_config(config)
    model, accuracy = train_digit_classifier(cfg)
    if accuracy < min_accuracy:
        raise RuntimeError(
            f'The digit classifier reached {accuracy:.3f} validation accuracy, below '
            f'{min_accuracy}; its features would make a poor FID. Config: {cfg}.'
        )
    _save_classifier(model, accuracy, cfg, path)
    return model, accuracy


def load_or_train_digit_classifier(
    cache_dir: str | None = None, config: dict[str, Any] | None = None, min_accuracy: float = 0.95
) -> DigitFeatures:
    """The digit classifier's :class:`DigitFeatures`: the shipped weights when ``config`` is one of theirs, else
    loaded from ``cache_dir`` or trained and cached there.

    ``config`` (merged over its dataset's default; see :data:`CLASSIFIER_CONFIGS`) chooses the dataset:
    ``{'dataset': 'mnist5k', 'image_size': 16}`` gives the MNIST tier's classifier. Shipped weights are checked
    against their recorded sha256 and never retrained here (``recipes/train_feature_extractors.py`` does that on
    request). Another config is trained on first use; its cache file is named by a hash of the full config, and
    under ``composer -n N`` the local rank 0 of each node trains and writes while the others wait. Its FIDs compare
    only with runs that used the same weights (``DigitFeatures.sha256``): trained on another machine, the weights
    differ.

    Raises:
        RuntimeError: if a trained classifier's validation accuracy is below ``min_accuracy``, or shipped weights
            do not match their sha256.
    """
    from composer.utils import dist

    cfg = _full_config(config)
    entry = _shipped_entry(cfg)
    if entry is not None:
        return _load_classifier(os.path.join(SHIPPED_WEIGHTS_DIR, entry['file']), entry['sha256'])
    path = digit_classifier_path(cache_dir, config)
    if not os.path.isfile(path) and dist.get_local_rank() == 0:
        log.warning(
            'No shipped FID classifier has this config; training one (cached at %s). Its FIDs compare only '
            'with runs on the same weights.',
            path,
        )
        train_and_save_classifier(cfg, path, min_accuracy)
    if dist.get_world_size() > 1 and dist.is_initialized():
        dist.barrier()
    return _load_classifier(path)


def digit_features(
    image_shape: tuple[int, ...] | None = None,
    inception_weights: str | None = None,
    classifier_cache_dir: str | None = None,
) -> nn.Module:
    """The classifier trained on scikit-learn's 8x8 digits."""
    return load_or_train_digit_classifier(classifier_cache_dir)


def mnist_features(
    image_shape: tuple[int, ...] | None = None,
    inception_weights: str | None = None,
    classifier_cache_dir: str | None = None,
) -> nn.Module:
    """The classifier trained on the bundled MNIST digits at the images' size (``image_shape`` is needed)."""
    if image_shape is None or len(image_shape) != 3 or image_shape[0] not in (1, 3) or image_shape[1] != image_shape[2]:
        raise ValueError(f"feature='mnist' needs square (1 or 3, S, S) images, got shape {image_shape}.")
    return load_or_train_digit_classifier(
        classifier_cache_dir, {'dataset': 'mnist5k', 'image_size': int(image_shape[-1])}
    )


def inception_features(
    image_shape: tuple[int, ...] | None = None,
    inception_weights: str | None = None,
    classifier_cache_dir: str | None = None,
) -> nn.Module:
    """Inception-v3's 2048 pool features (torchmetrics' FID network), from a local weights file if given."""
    return InceptionFeatures(inception_weights)


# The built-in feature extractors, each ``(image_shape, inception_weights, classifier_cache_dir) -> module``; other
# names resolve through the ``features`` registry.
FEATURE_EXTRACTORS = {'digits': digit_features, 'mnist': mnist_features, 'inception': inception_features}
FEATURE_CHOICES = ('auto', *FEATURE_EXTRACTORS)


def build_feature_extractor(
    feature: str | nn.Module = 'auto',
    image_shape: tuple[int, ...] | None = None,
    inception_weights: str | None = None,
    classifier_cache_dir: str | None = None,
) -> nn.Module:
    """Resolve a feature choice to a module: ``'digits'``, ``'mnist'``, ``'inception'``, ``'auto'``, a name in the
    ``features`` registry, or a module.

    ``'auto'`` picks the 8x8 digit classifier for ``(1, 8, 8)`` images and Inception otherwise: other grayscale
    images are not assumed to be MNIST.
    """
    if isinstance(feature, nn.Module):
        if not hasattr(feature, 'num_features'):
            raise ValueError('A custom FID feature module needs a num_features attribute (its output dimension).')
        return feature
    if feature == 'auto':
        feature = 'digits' if image_shape is not None and tuple(image_shape) == (1, 8, 8) else 'inception'
    builder = FEATURE_EXTRACTORS.get(feature) or registry.resolve(registry.features, feature, 'feature extractor')
    return builder(image_shape, inception_weights, classifier_cache_dir)
