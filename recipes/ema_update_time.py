"""Time one EMA update per step on a sharded model: Composer's ``compute_ema`` against ``WarmupEMA``'s foreach update.

    FSDP_VERSION=2 composer -n 2 recipes/ema_update_time.py [RECIPE.yaml] [--steps N]

Builds the recipe's denoiser (default: the CIFAR-10 DDPM UNet of ``yamls/cifar10/base.yaml``) on the CPU, shards
it with FSDP2 across the ranks, and times ``--steps`` updates of each kind, interleaved, on the same shards. Prints
the median milliseconds per update of each and their ratio (rank 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('recipe', nargs='?', default=os.path.join(ROOT, 'yamls', 'cifar10', 'base.yaml'))
    parser.add_argument('--steps', type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from composer.algorithms.ema.ema import EMAParameters, compute_ema
    from composer.utils import dist
    from torch.distributed.fsdp import fully_shard

    from composer_algos.algorithms.ema.ema import _local_pairs
    from composer_algos.config import load_config
    from composer_algos.registry import denoisers, resolve

    dist.initialize_dist('cpu')
    cfg = dict(load_config(args.recipe)['model']['denoiser'])
    torch.manual_seed(0)
    net = resolve(denoisers, cfg.pop('name', 'unet'), 'denoiser')(**cfg)
    ema = EMAParameters(net)  # full copies, as Composer makes them before wrapping
    fully_shard(net)
    from torch.distributed.tensor import distribute_tensor

    live = dict(net.named_parameters())
    sharded = EMAParameters(None)
    sharded.named_parameters_dict = {
        n: distribute_tensor(t, live[n].device_mesh, live[n].placements) for n, t in ema.named_parameters_dict.items()
    }
    sharded.named_buffers_dict = dict(ema.named_buffers_dict)
    pairs = _local_pairs(sharded, net)
    composer_times, foreach_times = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        compute_ema(net, sharded, smoothing=0.999)
        composer_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            for emas, lives in pairs.values():
                torch._foreach_lerp_(emas, lives, 1.0 - 0.999)
        foreach_times.append(time.perf_counter() - start)
    if dist.get_global_rank() == 0:
        params = sum(p.numel() for p in net.parameters())
        a, b = statistics.median(composer_times) * 1e3, statistics.median(foreach_times) * 1e3
        print(
            f'{len(live)} parameter tensors, {params:,} values, {dist.get_world_size()} ranks: '
            f'compute_ema {a:.2f} ms, foreach on local shards {b:.2f} ms per update'
        )
        print(f'ratio {a / b:.1f}')


if __name__ == '__main__':
    main()
