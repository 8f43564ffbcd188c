"""The one pixel convention: images are uint8 0..255 on disk and floats in [-1, 1] in the model."""

from __future__ import annotations

import torch

__all__ = ['from_uint8', 'to_uint8']


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 (any dtype) -> float32 in [-1, 1]; a float32 input is converted in place.

    Example:
        >>> from_uint8(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-1.,  1.])
    """
    pixels = pixels if pixels.dtype == torch.float32 else pixels.float()
    return pixels.div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (clamped) -> uint8 0..255, rounded: the inverse of :func:`from_uint8`.

    Example:
        >>> to_uint8(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([  0, 128, 255], dtype=torch.uint8)
    """
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
