"""Image batches streamed from MDS shards with mosaicml-streaming's StreamingDataset."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from composer.utils import dist
from streaming import StreamingDataset
from torch.utils.data import DataLoader

__all__ = ['StreamingImageDataset', 'build_streaming_image_dataloader']


class StreamingImageDataset(StreamingDataset):
    """Yields ``{'image': float tensor in [-1, 1] of shape (C, H, W), 'label': int}`` from MDS shards.

    With ``latents=True`` the shards hold precomputed latents (column ``latents``, written by
    ``recipes/convert_dataset.py --encode-latents``) and ``image`` is those latents as stored, with no [-1, 1]
    scaling; set ``model.encoder.precomputed: true`` (no VAE runs; ``model.latent_scale`` still applies).

    Args:
        local: local folder of the shards (or cache folder for ``remote``).
        remote: optional remote URL (``s3://``, ``gs://``, ``oci://``, ...); shards are cached into ``local``.
        split: sub-folder of ``local``/``remote``.
        batch_size: the per-device batch size (streaming uses it to partition and resume exactly).
        shuffle: shuffle samples (deterministically from ``shuffle_seed``).
        random_flip: flip horizontally with probability 1/2, as a deterministic function of (seed, index).
        channels: convert images to 1 (L) or 3 (RGB) channels; ``None`` keeps them.
        image_size: if set, an image (or latent) of another size is an error.
        seed: seed of the flips and, by default, of the shuffle.
        latents: read the ``latents`` column (precomputed latents) instead of ``image``.
        **streaming_kwargs: passed to ``StreamingDataset`` (``num_canonical_nodes``, ``cache_limit``, ...).
    """

    def __init__(self, local: Optional[str] = None, remote: Optional[str] = None, split: Optional[str] = None,
                 batch_size: Optional[int] = None, shuffle: bool = True, random_flip: bool = False,
                 channels: Optional[int] = None, image_size: Optional[int] = None, seed: int = 17,
                 shuffle_seed: Optional[int] = None, latents: bool = False, **streaming_kwargs: Any):
        if remote is None:
            path = os.path.join(local, split) if (local and split) else local
            if path is None or not os.path.exists(os.path.join(path, 'index.json')):
                raise FileNotFoundError(
                    f'No MDS dataset at {path!r} (index.json missing). Create it with '
                    f'`python recipes/convert_dataset.py --dataset digits --out {local or "<dir>"}`, '
                    'or set remote: to stream it from object storage.')
        if channels not in (None, 1, 3) and not latents:
            raise ValueError(f'channels must be 1, 3 or None, got {channels!r}.')
        if latents and random_flip:
            raise ValueError('random_flip is not available with latents: a flipped latent is not the latent of the '
                             'flipped image. Encode images on the fly (model.encoder) to train with flips.')
        super().__init__(local=local, remote=remote, split=split, shuffle=shuffle, batch_size=batch_size,
                         shuffle_seed=shuffle_seed if shuffle_seed is not None else seed, **streaming_kwargs)
        self.random_flip = random_flip
        self.channels = channels
        self.image_size = image_size
        self.flip_seed = seed
        self.latents = latents

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if self.latents:
            return {'image': self._latents(sample, index), 'label': int(sample['label'])}
        if 'image' not in sample:
            hint = (' These shards hold precomputed latents: set latents: true in the loader and '
                    'model.encoder.precomputed: true.'
                    if 'latents' in sample else '')
            raise ValueError(f'Sample {index} has no image column (columns: {sorted(sample)}).{hint}')
        image = sample['image']
        if self.channels == 1 and image.mode != 'L':
            image = image.convert('L')
        elif self.channels == 3 and image.mode != 'RGB':
            image = image.convert('RGB')
        array = np.asarray(image, dtype=np.float32)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.image_size is not None and array.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f'Image {index} has size {array.shape[1:]} but image_size={self.image_size}; resize '
                             'the images when converting, or set image_size to match.')
        tensor = torch.from_numpy(np.ascontiguousarray(array)) / 127.5 - 1.0
        # The flip is a function of (seed, index) so that it replays exactly on resume.
        if self.random_flip and np.random.default_rng([self.flip_seed, index]).integers(2):
            tensor = tensor.flip(-1)
        return {'image': tensor, 'label': int(sample['label'])}

    def _latents(self, sample: dict[str, Any], index: int) -> torch.Tensor:
        if 'latents' not in sample:
            raise ValueError(f'Sample {index} has no latents column (columns: {sorted(sample)}); write the shards with '
                           '`recipes/convert_dataset.py --encode-latents VAE_PATH`, or set latents: false for images.')
        array = np.asarray(sample['latents'], dtype=np.float32)
        if array.ndim != 3:
            raise ValueError(f'Latents {index} have shape {array.shape}; expected (channels, height, width).')
        if self.image_size is not None and array.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f'Latents {index} have size {array.shape[1:]} but image_size={self.image_size}.')
        if self.channels is not None and array.shape[0] != self.channels:
            raise ValueError(f'Latents {index} have {array.shape[0]} channels but channels={self.channels}.')
        return torch.from_numpy(np.ascontiguousarray(array))


def build_streaming_image_dataloader(global_batch_size: int, local: Optional[str] = None,
                                     remote: Optional[str] = None, split: Optional[str] = None,
                                     num_workers: int = 0, drop_last: bool = True, shuffle: bool = True,
                                     **dataset_kwargs: Any) -> DataLoader:
    """A DataLoader over a :class:`StreamingImageDataset` with the per-device batch size streaming expects."""
    world_size = dist.get_world_size()
    if global_batch_size % world_size != 0:
        raise ValueError(f'Global batch size {global_batch_size} is not divisible by the world size {world_size}.')
    device_batch_size = global_batch_size // world_size
    dataset = StreamingImageDataset(local=local, remote=remote, split=split, batch_size=device_batch_size,
                                    shuffle=shuffle, **dataset_kwargs)
    return DataLoader(dataset, batch_size=device_batch_size, num_workers=num_workers, drop_last=drop_last,
                      persistent_workers=num_workers > 0)
