"""Train recipes in turn in one process (group) and record, per rank, the final weights and algorithm states.

    python tests/fault_run.py RECIPE OUT_DIR [key=value ...] [-- RECIPE OUT_DIR [key=value ...] ...]
    composer -n 2 tests/fault_run.py ...

Writes ``OUT_DIR/rank{r}.pt``: ``{'model': this rank's weights (local shards under FSDP), 'algorithms': {class name:
state_dict}, 'losses': [...], 'batch': batches trained, 'start': batch resumed from}``. With ``STOP_RANK=r`` and
``STOP_BATCH=n`` in the environment, rank ``r`` stops in the middle of step ``n`` (after its backward pass, before
the optimizer step), writes its process id and its streaming shared-memory prefix to ``OUT_DIR/stopped-rank{r}``
and waits there to be killed. A killed process cannot release its shared memory: :func:`release_shared_memory`
does, for that prefix only (the machine's other streaming jobs keep theirs).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from composer.core import Callback
from composer.utils import dist

from composer_algos.config import build_trainer, load_config


class Recorder(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.losses: list[float] = []
        self.stop_rank = int(os.environ.get('STOP_RANK', -1))
        self.stop_batch = int(os.environ.get('STOP_BATCH', -1))

    def after_backward(self, state, logger):
        if dist.get_global_rank() == self.stop_rank and int(state.timestamp.batch) + 1 == self.stop_batch:
            with open(os.path.join(self.out_dir, f'stopped-rank{self.stop_rank}'), 'w') as f:
                f.write(f'{os.getpid()} {state.train_dataloader.dataset._shm_prefix_int}')
            while True:  # until kill -9
                time.sleep(1)

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss.detach()))


def plain(obj: Any) -> Any:
    """Tensors (DTensors as their local shard) cloned to CPU; containers recursively."""
    if hasattr(obj, 'to_local'):
        obj = obj.to_local()
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def run(recipe: str, out_dir: str, overrides: list[str]) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    trainer = build_trainer(load_config(recipe, overrides))
    start = int(trainer.state.timestamp.batch)
    recorder = Recorder(out_dir)
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    result = {
        'model': plain(trainer.state.model.state_dict()),
        'algorithms': {type(a).__name__: plain(a.state_dict()) for a in trainer.state.algorithms},
        'losses': recorder.losses,
        'batch': int(trainer.state.timestamp.batch),
        'start': start,
        'world_size': dist.get_world_size(),
    }
    torch.save(result, os.path.join(out_dir, f'rank{dist.get_global_rank()}.pt'))
    trainer.close()
    return result


def release_shared_memory(prefix: int) -> None:
    """Unlink the streaming shared memory and lock files of ``prefix``, left behind by processes killed with -9."""
    from multiprocessing import shared_memory
    from tempfile import gettempdir

    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared.prefix import SHM_TO_CLEAN

    for name in SHM_TO_CLEAN:
        try:
            shm = shared_memory.SharedMemory(name=f'{prefix:06}_{name}')
        except FileNotFoundError:
            continue
        shm.close()
        shm.unlink()
    for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
        path = os.path.join(gettempdir(), f'{prefix:06}_{name}')
        if os.path.exists(path):
            os.remove(path)


def flip_tensor_byte(path: str) -> None:
    """Flip one bit inside the stored bytes of the largest tensor of a ``torch.save`` file (a zip archive): damage
    that ``torch.load`` does not notice."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), 'little') for _ in range(2))
        f.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def main() -> None:
    torch.set_num_threads(1)
    args = sys.argv[1:]
    runs, current = [], []
    for arg in args + ['--']:
        if arg == '--':
            runs.append(current)
            current = []
        else:
            current.append(arg)
    for recipe, out_dir, *overrides in runs:
        run(recipe, out_dir, overrides)


if __name__ == '__main__':
    main()
