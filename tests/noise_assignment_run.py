"""Pair one global batch's noise on every rank of a process group, as a training step does, and save each rank's part.

    composer -n 2 tests/noise_assignment_run.py OUT_DIR

The global batch (16 images, class labels 0-2) and its keyed noise are the same on any number of ranks; rank ``r``
holds positions ``r, r + W, ...``. Writes ``OUT_DIR/rank{r}.pt`` with, per setting of ``scope`` and ``by_condition``,
the noise each of its samples got and the pairing's ``source``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as torch_dist

from composer_algos.algorithms.noise_assignment import NoiseAssignment
from composer_algos.diffusion.draw import NoiseDraw, training_randoms
from composer_algos.distributed import destroy_process_group

SETTINGS = {
    'global': {'scope': 'global'},
    'global_by_condition': {'scope': 'global', 'by_condition': True},
    'rank': {'scope': 'rank'},
}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, labels)`` of the global batch, the same on every rank."""
    gen = torch.Generator().manual_seed(3)
    return torch.randn((16, 1, 6, 6), generator=gen), torch.arange(16) % 3


def pair(rank: int, world_size: int) -> dict:
    """What each setting gives this rank's samples of the global batch (draw index 5 of seed 11)."""
    x0, labels = global_batch()
    x0, labels = x0[rank::world_size], labels[rank::world_size]
    _, noise = training_randoms(11, 5, x0)
    results = {}
    for name, kwargs in SETTINGS.items():
        new_noise, pairing = NoiseAssignment(**kwargs)(NoiseDraw(x0, noise, labels, 11, 5))
        results[name] = {'noise': new_noise, 'source': pairing.source}
    return results


def main() -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group('gloo')
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.save(pair(rank, world_size), os.path.join(out, f'rank{rank}.pt'))
    destroy_process_group()


if __name__ == '__main__':
    main()
