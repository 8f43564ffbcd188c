"""Random numbers keyed by what they are for, so a run draws the same numbers however it is split.

Every random number of a training run (a sample's timestep and noise, a probe's noise, an evaluation's starting
noise) comes from a ``torch.Generator`` seeded by :func:`derive_seed` of the run's seed and integer keys that name
it (a stream, a step counter, the sample's position in the global batch, ...). Nothing depends on which rank draws
it or on a generator's history: a resumed run draws what the uninterrupted run drew, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ['derive_seed', 'keyed_generator', 'keyed_uniform_and_normal']

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    # splitmix64's finaliser: every input bit changes about half of the output bits.
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and integer ``keys``; different key tuples give unrelated seeds.

    Example:
        >>> derive_seed(17, 3, 0) == derive_seed(17, 3, 0) != derive_seed(17, 0, 3)
        True
    """
    h = _mix(int(seed) & _MASK)
    for key in keys:
        h = _mix((h + 0x9E3779B97F4A7C15 + (int(key) & _MASK)) & _MASK)
    return h >> 1


def keyed_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``seed`` and ``keys``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def keyed_uniform_and_normal(
    seed: int, keys: Sequence[Sequence[int]], shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key tuple, one uniform in [0, 1) and one standard-normal tensor of ``shape``, on the CPU.

    Returns ``(u, noise)`` of shapes ``(N,)`` and ``(N, *shape)``; row ``i`` depends only on ``seed`` and
    ``keys[i]``, so it is the same whichever batch, rank or device it is drawn for.
    """
    u = torch.empty(len(keys), dtype=torch.float64)
    noise = torch.empty((len(keys), *shape), dtype=dtype)
    for row, key in enumerate(keys):
        gen = keyed_generator(seed, *key)
        u[row] = torch.rand((), generator=gen, dtype=torch.float64)
        noise[row] = torch.randn(tuple(shape), generator=gen, dtype=dtype)
    return u, noise
