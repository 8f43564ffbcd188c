"""Build one StreamingImageDataset on each of two ranks while another job's shared memory goes away mid-scan.

    composer -n 2 tests/shm_prefix_run.py MDS_ROOT OUT_DIR {package,unshared}

Streaming has every rank scan for the first free shared-memory prefix. Here rank 1's scan sees one more prefix in
use than rank 0's did, as when another job frees its prefix between the two scans. ``package`` builds the dataset
as the package does (the local leader's scan serves both ranks); ``unshared`` turns that sharing off, so each rank
scans for itself as streaming does. Each rank writes ``OUT_DIR/rank{r}.txt``: its prefix and the first batch's
labels, or ``error: ...``.
"""

from __future__ import annotations

import contextlib
import os
import sys

from streaming.base.shared import prefix

from composer_algos.data import StreamingImageDataset
from composer_algos.data import streaming as streaming_module


def main() -> None:
    root, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = int(os.environ['RANK'])
    if rank == 1:
        scan = prefix._check_and_find

        def later_scan(*args, **kwargs):
            return scan(*args, **kwargs) + 1

        prefix._check_and_find = later_scan
    if mode == 'unshared':
        streaming_module._leader_scans = contextlib.nullcontext
    try:
        dataset = StreamingImageDataset(
            local=root, split='train', shuffle=False, batch_size=8, channels=1, image_size=8, yield_batches=True
        )
        batch = next(iter(dataset))
        line = f'{dataset._shm_prefix_int} {batch["label"].tolist()}'
    except Exception as e:  # the test reads it
        line = f'error: {type(e).__name__}: {e}'
    with open(os.path.join(out, f'rank{rank}.txt'), 'w') as f:
        f.write(line)


if __name__ == '__main__':
    main()
