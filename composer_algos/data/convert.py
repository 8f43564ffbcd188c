"""Write image datasets as MDS shards (mosaicml-streaming) with columns ``image`` (PNG) and ``label`` (int)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional

import numpy as np
from PIL import Image

__all__ = ['MDS_COLUMNS', 'write_mds', 'digits_images', 'cifar10_images', 'folder_images', 'convert_digits',
           'DIGITS_TRAIN_FRACTION']

log = logging.getLogger(__name__)

MDS_COLUMNS = {'image': 'png', 'label': 'int'}
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff')
# The first 80% of scikit-learn's 1797 digits train; the rest is the validation/FID reference split.
DIGITS_TRAIN_FRACTION = 0.8


def write_mds(samples: Iterable[tuple[Image.Image, int]], out: str, size_limit: str | int = '64mb',
              total: Optional[int] = None, progress: bool = True, compression: Optional[str] = None) -> int:
    """Write ``(image, label)`` pairs to ``out`` (a local folder or a remote URL streaming can upload to)."""
    from streaming import MDSWriter
    from tqdm import tqdm
    count = 0
    with MDSWriter(out=out, columns=MDS_COLUMNS, size_limit=size_limit, compression=compression) as writer:
        for image, label in tqdm(samples, total=total, disable=not progress, desc=f'writing {out}'):
            writer.write({'image': image, 'label': int(label)})
            count += 1
    if count == 0:
        raise ValueError(f'No images were written to {out}: the source is empty.')
    return count


def digits_images(split: str) -> list[tuple[Image.Image, int]]:
    """scikit-learn's bundled 8x8 digits (no download) as grayscale PIL images scaled 0..16 -> 0..255."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    n_train = int(len(digits.images) * DIGITS_TRAIN_FRACTION)
    index = slice(0, n_train) if split == 'train' else slice(n_train, None)
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    images = np.clip(np.round(digits.images[index] * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return [(Image.fromarray(img, mode='L'), int(y)) for img, y in zip(images, digits.target[index])]


def cifar10_images(root: str, split: str) -> Iterator[tuple[Image.Image, int]]:
    """CIFAR-10 through torchvision (downloads to ``root`` when missing; needs internet)."""
    from torchvision.datasets import CIFAR10
    data = CIFAR10(root=root, train=(split == 'train'), download=True)
    for image, label in data:
        yield image, label


def folder_images(root: str, workers: int = 8) -> tuple[Iterator[tuple[Image.Image, int]], int, list[str]]:
    """Images under ``root``; sub-folders are classes (sorted), a flat folder is one class 0.

    Returns ``(iterator, count, class_names)``; files are decoded by ``workers`` threads, in a stable order.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f'Image folder {root!r} does not exist.')
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files: list[tuple[str, int]] = []
    for label, directory in enumerate(classes or ['']):
        base = os.path.join(root, directory)
        for dirpath, _, names in sorted(os.walk(base)):
            files += [(os.path.join(dirpath, n), label) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f'No images ({", ".join(IMAGE_SUFFIXES)}) found under {root!r}.')

    def load(item: tuple[str, int]) -> tuple[Image.Image, int]:
        with Image.open(item[0]) as img:
            return img.convert('RGB'), item[1]

    def iterate() -> Iterator[tuple[Image.Image, int]]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # map keeps the file order while decoding in parallel.
            yield from pool.map(load, files)

    return iterate(), len(files), classes or ['images']


def convert_digits(out_root: str, progress: bool = False) -> None:
    """Write ``out_root/{train,val}`` MDS shards of the digits unless they already exist."""
    for split in ('train', 'val'):
        out = os.path.join(out_root, split)
        if os.path.exists(os.path.join(out, 'index.json')):
            continue
        samples = digits_images(split)
        write_mds(samples, out, total=len(samples), progress=progress)
        log.info('Wrote %d digits to %s', len(samples), out)
