"""Build a gloo process group, gather through it and destroy it at once, round after round, on each rank.

    composer -n 2 tests/gloo_teardown_run.py OUT_DIR {package,torch} ROUNDS

``package`` gathers with ``composer_algos.distributed.all_gather`` and tears down with its
``destroy_process_group``; ``torch`` calls ``torch.distributed`` directly, as most scripts do. A long GIL switch
interval keeps this process from handing the GIL to gloo's worker threads while it runs Python code, which turns
torch 2.7's rare teardown hang (a worker freeing a Python tensor needs the GIL that the group's destructor holds)
into a likely one. Each finished round appends a line to ``OUT_DIR/rank{r}.txt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as torch_dist

from composer_algos.distributed import all_gather, destroy_process_group


def main() -> None:
    out, mode, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.setswitchinterval(0.5)
    torch.set_num_threads(1)
    rank = int(os.environ['RANK'])
    for i in range(rounds):
        store = torch_dist.FileStore(os.path.join(out, f'store{i}'), 2)
        torch_dist.init_process_group('gloo', store=store, rank=rank, world_size=2)
        for _ in range(3):
            if mode == 'package':
                gathered = all_gather(torch.full((1000,), float(rank)))
            else:
                gathered = [torch.empty(1000) for _ in range(2)]
                torch_dist.all_gather(gathered, torch.full((1000,), float(rank)))
            assert [float(g[0]) for g in gathered] == [0.0, 1.0]
            del gathered
        if mode == 'package':
            destroy_process_group()
        else:
            torch_dist.destroy_process_group()
        with open(os.path.join(out, f'rank{rank}.txt'), 'a') as f:
            f.write(f'{i}\n')


if __name__ == '__main__':
    main()
