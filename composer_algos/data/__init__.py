"""Data: MDS conversion and streaming image loaders."""

from composer_algos.data.convert import convert_digits, write_mds
from composer_algos.data.streaming import StreamingImageDataset, build_streaming_image_dataloader
from composer_algos.registry import datasets

datasets.register('streaming_image', func=build_streaming_image_dataloader)

__all__ = ['StreamingImageDataset', 'build_streaming_image_dataloader', 'convert_digits', 'write_mds']
